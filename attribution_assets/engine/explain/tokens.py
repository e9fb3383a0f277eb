"""Per-token explanations of one query's top documents: each document token's exact share of
the document's score, computed on the fly for just those documents.

A document's gradient row is the sum of its ``positional`` per-token rows ``r_t``
(``engine.gradients.collector``: ``r_t`` is position ``t``'s share ``L g_t a_tᵀ Rᵀ``, one
backward pass), and every score is linear in the document row up to its one normalization
(``engine.scoring.scorer``). With ``q̂`` the prepared query row:

- ``inner_product``: ``s = <q̂, g>``, token ``t`` contributes ``<q̂, r_t>``;
- ``cosine``: ``s = <q̂, P^{-1/2} g> / ||P^{-1/2} g||``, token ``t`` contributes
  ``<q̂, P^{-1/2} r_t> / ||P^{-1/2} g||`` (the document's norm, shared by all its tokens).

Either way the contributions sum to the document's score (float32 rounding aside), whatever
``gradients.per_token`` the stored pipeline uses. Position ``t`` reads token ``t`` and predicts
token ``t + 1``; its share is shown on token ``t + 1``, the token whose prediction it serves
(the first token, predicted by nothing, and positions after the last target get 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from attribution_assets.engine.gradients.collect import make_collector
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.io.corpus import read_queries
from attribution_assets.engine.io.data import TokenizedDoc, read_tokenized
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.preconditioners import (
    Preconditioner,
    as_float32_tensor,
)
from attribution_assets.engine.progress import track
from attribution_assets.engine.scoring.run import QueryScorer
from attribution_assets.spec import PipelineSpec


@dataclass
class DocumentExplanation:
    """One ranked document: its table score, the score recomputed from its token rows, and per
    token its text piece and contribution (``len(pieces) == len(contributions)``)."""

    rank: int
    doc_id: str
    shard: str
    score: float
    recomputed: float
    gold: bool | None
    pieces: list[str]
    contributions: list[float]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def top_tokens(self, n: int = 3) -> list[int]:
        """Indices of the ``n`` tokens with the highest contributions (ties: first wins)."""
        order = np.argsort(-np.asarray(self.contributions, dtype=np.float64), kind="stable")
        return [int(i) for i in order[:n]]


@dataclass
class Explanation:
    """One query, its text and gold documents (None when unknown), and its top documents."""

    pipeline: str
    query_id: str
    query_text: str
    metric: str
    gold_doc_ids: list[str] | None
    documents: list[DocumentExplanation] = field(default_factory=list)


def positional_collector(model, spec: PipelineSpec, paths: PipelinePaths | None = None,
                         device=None, autocast: torch.dtype | None = None) -> GradientCollector:
    """The pipeline's collector (projection, normalizer, modules) with ``per_token: positional``."""
    gradients = dataclasses.replace(spec.gradients, per_token="positional")
    return make_collector(model, spec, paths, device, autocast, gradients=gradients)


def token_contributions(token_rows: np.ndarray, prepared_query: np.ndarray,
                        preconditioner: Preconditioner | None, metric: str) -> tuple[np.ndarray, float]:
    """``(contributions [T], score)`` of one document from its per-token rows ``[T, dims]`` (rows
    summing to the document row) and one prepared query row ``[dims]`` (module docstring)."""
    q = torch.from_numpy(np.ascontiguousarray(prepared_query, dtype=np.float32))
    rows = as_float32_tensor(token_rows, torch.device("cpu"))
    if metric == "cosine":
        if preconditioner is not None:
            rows = preconditioner.apply_torch(rows, -0.5)
        norm = float(torch.linalg.vector_norm(rows.double().sum(dim=0)))
        parts = (rows @ q).double() / norm if norm > 0 else torch.zeros(rows.shape[0], dtype=torch.float64)
    elif metric == "inner_product":
        parts = (rows @ q).double()
    else:
        raise ValueError(f"metric must be 'cosine' or 'inner_product', got {metric!r}")
    return parts.numpy(), float(parts.sum())


def token_pieces(tokenizer, input_ids: Sequence[int]) -> list[str]:
    """Each token's text (the tokenizer's decoding of that id alone)."""
    return [tokenizer.decode([int(i)]) for i in input_ids]


def top_documents(paths: PipelinePaths, query_id: str, k: int) -> list[dict]:
    """The ``k`` highest-scoring ``{doc_id, shard, score}`` of ``query_id`` over every score table."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    tables = sorted(paths.root.glob(str(paths.scores_glob.relative_to(paths.root))))
    if not tables:
        raise FileNotFoundError(f"No score tables under {paths.root}; materialize the pipeline's `scores` first.")
    frame = (pl.scan_parquet([str(t) for t in tables]).filter(pl.col("query_id") == query_id)
             .sort(["score", "doc_id"], descending=[True, False]).head(k).collect())
    if frame.height == 0:
        known = (pl.scan_parquet([str(t) for t in tables]).select("query_id").unique()
                 .sort("query_id").head(5).collect()["query_id"].to_list())
        raise KeyError(f"Query {query_id!r} has no scores; known query ids include {known} "
                       "(`attribution scores` lists them; aggregated pipelines score `__<aggregate>__`).")
    return frame.to_dicts()


def _token_docs(paths: PipelinePaths, hits: Sequence[dict]) -> dict[str, TokenizedDoc]:
    wanted: dict[str, set[str]] = {}
    for hit in hits:
        wanted.setdefault(hit["shard"], set()).add(hit["doc_id"])
    docs = {}
    for shard, ids in wanted.items():
        docs |= {d.doc_id: d for d in read_tokenized(paths.tokens(shard)) if d.doc_id in ids}
    return docs


def explain_query(spec: PipelineSpec, paths: PipelinePaths, query_id: str, k: int, model, tokenizer,
                  scorer: QueryScorer | None = None, collector: GradientCollector | None = None
                  ) -> Explanation:
    """The top ``k`` documents of ``query_id`` (from the score tables) with per-token
    contributions, recomputed with ``collector`` (default: :func:`positional_collector` of
    ``model``) against the query row ``scorer`` prepares (default: the pipeline's own, scored
    individually). Progress: step ``explain``, in documents (``engine.progress``)."""
    scorer = scorer or QueryScorer.for_pipeline(spec, paths, aggregate="individual")
    if query_id not in scorer.query_ids:
        raise KeyError(f"Query {query_id!r} is not one of the pipeline's {len(scorer.query_ids)} queries "
                       f"(e.g. {scorer.query_ids[:3]}).")
    collector = collector or positional_collector(model, spec, paths)
    if collector.gradients.per_token != "positional":
        raise ValueError("explain_query needs a collector with gradients.per_token == 'positional'")
    prepared = scorer.prepared[scorer.query_ids.index(query_id)]
    hits = top_documents(paths, query_id, k)
    docs = _token_docs(paths, hits)
    query = next(q for q in read_queries(paths.queries) if q["doc_id"] == query_id)
    gold = list(query["gold_doc_ids"]) if query.get("gold_doc_ids") else None
    out = Explanation(spec.name, query_id, query["text"], spec.scoring.metric, gold)
    with track("explain", len(hits), "documents") as tracker:
        for rank, hit in enumerate(hits, 1):
            doc = docs[hit["doc_id"]]
            rows, _ = collector.collect([(doc.input_ids, doc.loss_mask)])
            parts, total = token_contributions(rows, prepared, scorer.preconditioner, spec.scoring.metric)
            shown = np.zeros(len(doc.input_ids))
            shown[1:len(parts) + 1] = parts  # position t's share on token t + 1 (module docstring)
            out.documents.append(DocumentExplanation(
                rank, doc.doc_id, hit["shard"], float(hit["score"]), total,
                None if gold is None else doc.source_id in gold or doc.doc_id in gold,
                token_pieces(tokenizer, doc.input_ids), shown.tolist()))
            tracker.update(1, tokens=len(doc.input_ids))
    return out


def explain_samples(spec: PipelineSpec, paths: PipelinePaths, model, tokenizer, queries: int,
                    k: int) -> list[Explanation]:
    """:func:`explain_query` for the first ``queries`` queries (in query-table order, those
    with gold documents first), sharing one scorer and collector; none when the score tables
    rank an aggregate (``scoring.aggregate`` other than ``individual``), not single queries."""
    if spec.scoring.aggregate != "individual":
        return []
    scorer = QueryScorer.for_pipeline(spec, paths, aggregate="individual")
    table = read_queries(paths.queries)
    order = sorted(table, key=lambda q: not q.get("gold_doc_ids"))  # stable: table order otherwise
    picked = [q["doc_id"] for q in order if q["doc_id"] in scorer.query_ids][:queries]
    collector = positional_collector(model, spec, paths)
    return [explain_query(spec, paths, qid, k, model, tokenizer, scorer, collector) for qid in picked]
