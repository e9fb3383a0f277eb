"""Interactive attribution from a Python session: "why did the model say this?".

>>> attributor = Attributor.open(spec, storage_root)
>>> with attributor.trace(k=10) as result:
...     model(**batch, labels=labels).loss.backward()
>>> result[0]          # top-10 documents for the first example: [Hit(doc_id, score, text)]
>>> attributor.search([("Q: Where was Mara born? A: Mara was born in", " Lisbon")], k=5)

Query gradients go through the pipeline's own query collector (same projection, normalizer
and module selection as the training side; for EK-FAC / K-FAC it also preconditions each
gradient, :func:`scoring.run.query_collector`), then ``scoring.run.QueryScorer`` (same
preconditioning and normalization as the score table). Documents come from the
pipeline's FAISS index when one is built (``use_index``), plus a brute-force pass over
the shards the index does not cover yet (with a warning), else from a brute-force pass over
the gradient stores with the score table's own functions, so a ``Flat`` index, the
brute-force path and the score table give the same numbers. A streaming pipeline stores no
training rows: they are recomputed from the tokenized shards (slow, but exact).
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from attribution_assets.engine.gradients.collect import collect, make_collector, training_rows
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io import data
from attribution_assets.engine.io.models import load_pipeline_model
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.scoring.run import QueryScorer, load_preconditioner, query_collector
from attribution_assets.engine.scoring.scorer import top_k
from attribution_assets.engine.search.index import FaissIndex
from attribution_assets.spec import PipelineSpec


@dataclasses.dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float
    text: str


class Attributor:
    """Top-k training documents for new queries of one materialized pipeline."""

    def __init__(self, spec: PipelineSpec, paths: PipelinePaths, model=None, tokenizer=None,
                 device: str = "cpu", use_index: bool | None = None):
        self.spec, self.paths = spec, paths
        self.model, self.tokenizer = model, tokenizer
        if self.model is None or self.tokenizer is None:
            self.model, self.tokenizer = load_pipeline_model(spec, paths, device)
        self.collector = query_collector(self.model, spec, paths, device)
        self.preconditioner = load_preconditioner(spec, paths)
        want_index = paths.faiss_index.exists() if use_index is None else use_index
        self.index = FaissIndex.load(paths.faiss_index) if want_index else None
        if spec.scoring.mode == "streaming":  # no stored rows: recompute them from the tokens
            shards = paths.tokenized_shards()
            if not shards:
                raise FileNotFoundError(f"No tokenized shards under {paths.root}: materialize "
                                        f"{spec.name}/tokenized_shards first.")
        else:
            shards = paths.gradient_shards()
            if self.index is None and not shards:
                raise FileNotFoundError(f"No FAISS index and no gradient stores under {paths.root}: "
                                        f"materialize {spec.name}/train_gradients (and {spec.name}/faiss_index).")
        indexed = set() if self.index is None else {str(d) for part in self.index.ids for d in part}
        #: shards searched by brute force: all without an index, else those the index does not cover
        self.brute_force_shards = [s for s in shards if self.index is None or spec.scoring.mode == "streaming"
                                   or not set(GradientStore(paths.train_gradients(s)).doc_ids) <= indexed]
        if self.index is not None and self.brute_force_shards:
            warnings.warn(f"{len(self.brute_force_shards)} shard(s) of {spec.name} are newer than its FAISS index "
                          f"({', '.join(self.brute_force_shards)}): searched by brute force; re-materialize "
                          f"{spec.name}/faiss_index to index them.", stacklevel=2)
        self._texts: dict[str, str] | None = None

    @classmethod
    def open(cls, spec: PipelineSpec, storage_root: str | Path, **kwargs) -> Attributor:
        """The attributor of pipeline ``spec`` stored under ``storage_root``."""
        return cls(spec, PipelinePaths.under(storage_root, spec.name), **kwargs)

    def text(self, doc_id: str) -> str:
        if self._texts is None:
            frame = pl.read_parquet(self.paths.tokens_glob, columns=["doc_id", "text"])
            self._texts = dict(frame.iter_rows())
        return self._texts.get(doc_id, "")

    def top_k_rows(self, rows: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top-``k`` documents for query gradient rows ``[q, dims]`` (pipeline conventions)."""
        scorer = QueryScorer(rows, None, self.preconditioner, self.spec.scoring, aggregate="individual")
        best: list[list[tuple[float, str]]] = [[] for _ in range(len(rows))]
        if self.index is not None:
            ids, scores = self.index.search(scorer.prepared, k)
            for q, (row_ids, row_scores) in enumerate(zip(ids, scores)):
                best[q] += [(float(s), d) for d, s in zip(row_ids, row_scores) if d]
        for shard in training_rows(self.spec, self.paths, self.brute_force_shards,
                                   collector=self._training_collector):
            indices, values = top_k(scorer.score(shard.document_rows()), k)
            for q in range(len(rows)):
                best[q] += [(float(v), shard.doc_ids[i]) for i, v in zip(indices[q], values[q])]
        return [[Hit(d, s, self.text(d)) for s, d in sorted(row, key=lambda x: (-x[0], x[1]))[:k]] for row in best]

    def _training_collector(self):
        """The collector of streamed training rows: the pipeline's own (EK-FAC / K-FAC precondition
        only the query side)."""
        if self.spec.scoring.kronecker:
            return make_collector(self.model, self.spec, self.paths, self.collector.device)
        return self.collector

    @contextlib.contextmanager
    def trace(self, model=None, k: int = 10) -> Iterator[list[list[Hit]]]:
        """Within the block, run a forward and ``loss.backward()``; the yielded list then holds
        one top-``k`` list per example of the batch. ``model`` must be the pipeline's model."""
        if model is not None and model is not self.model:
            raise ValueError("trace() needs the attributor's own model object (Attributor(..., model=model)), "
                             "so that its hooks see the forward pass.")
        result: list[list[Hit]] = []
        with self.collector.trace() as rows:
            yield result
        result.extend(self.top_k_rows(rows[0], k))

    def search(self, queries: Sequence[str | tuple[str, str]], k: int = 10) -> list[list[Hit]]:
        """Top-``k`` documents for texts (loss on every token but the first) or
        ``(prompt, completion)`` pairs (loss on the completion, as TrackStar does)."""
        return self.top_k_rows(self.query_rows(queries), k)

    def query_rows(self, queries: Sequence[str | tuple[str, str]]) -> np.ndarray:
        """Query gradient rows ``[q, dims]`` of texts or ``(prompt, completion)`` pairs (:meth:`search`)."""
        docs = []
        for i, query in enumerate(queries):
            content = {"prompt": query[0], "completion": query[1]} if isinstance(query, tuple) else {"text": query}
            ids, mask = data.tokenize_content(content, self.tokenizer, self.spec.corpus, add_eos=False)
            if len(ids) < 2 or sum(mask) == 0:
                raise ValueError(f"Query {i} ({query!r}) has no target token; give a longer text or a completion.")
            section = "queries" if self.spec.queries is not None else "corpus"
            limit = getattr(self.spec, section).max_length
            if len(ids) > limit:
                raise ValueError(f"Query {i} is {len(ids)} tokens, longer than `{section}.max_length` ({limit}); "
                                 "shorten it, or raise the setting (at most the model's positions).")
            docs.append(data.TokenizedDoc(f"query-{i}", ids, mask, str(query)))
        array, _, _ = collect(self.collector, docs)
        return array

    def prepared(self, rows: np.ndarray) -> np.ndarray:
        """Query rows ``[q, dims]`` prepared as :meth:`top_k_rows` scores them (preconditioned,
        normalized for cosine scores)."""
        return QueryScorer(rows, None, self.preconditioner, self.spec.scoring, aggregate="individual").prepared
