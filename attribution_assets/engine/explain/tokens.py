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

People read words, not word pieces: :meth:`DocumentExplanation.words` sums the pieces of each
whole word (" Pav" + "el" -> " Pavel") and leaves special tokens (``<|endoftext|>``) out of the
text, their shares still counted in the score.
"""

from __future__ import annotations

import dataclasses
import json
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
    special: list[bool] = field(default_factory=list)  # per piece: a special token (none when empty)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def words(self) -> list[tuple[str, float]]:
        """``(text, share)`` per whole word, in order: pieces joined while letters or digits
        continue letters or digits and no whitespace starts the next piece (punctuation is a
        word of its own); special tokens left out. A word's text keeps its leading whitespace."""
        out: list[tuple[str, float]] = []
        previous = ""
        for i, (piece, share) in enumerate(zip(self.pieces, self.contributions)):
            if self.special and self.special[i]:
                previous = ""
                continue
            continues = (bool(out) and bool(previous) and bool(piece) and previous[-1].isalnum()
                         and piece[0].isalnum())
            if continues:
                out[-1] = (out[-1][0] + piece, out[-1][1] + share)
            else:
                out.append((piece, share))
            previous = piece
        return out

    def top_tokens(self, n: int = 3) -> list[int]:
        """Indices of the ``n`` tokens with the highest contributions (ties: first wins)."""
        order = np.argsort(-np.asarray(self.contributions, dtype=np.float64), kind="stable")
        return [int(i) for i in order[:n]]


@dataclass
class Explanation:
    """One query, its text and gold documents (None when unknown), its top documents; its
    ``prompt`` and ``answer`` (the completion the loss covers; empty for a plain text) and its
    first gold document's ``(rank, score)`` over every score (None: unknown or not kept)."""

    pipeline: str
    query_id: str
    query_text: str
    metric: str
    gold_doc_ids: list[str] | None
    documents: list[DocumentExplanation] = field(default_factory=list)
    prompt: str = ""
    answer: str = ""
    first_gold: tuple[int, float] | None = None


def query_parts(content: dict) -> tuple[str, str]:
    """``(prompt, answer)`` of a query's content: prompt and completion, a chat's text before and
    after its last assistant turn, or a plain text with no answer part."""
    if "prompt" in content:
        return content["prompt"], content.get("completion", "")
    if "messages" in content:
        messages = content["messages"]
        last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
        if last is not None:
            before = " ".join(m.get("content", "") for m in messages[:last])
            return before, messages[last].get("content", "")
        return " ".join(m.get("content", "") for m in messages), ""
    return content.get("text", ""), ""


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


def first_gold_rank(paths: PipelinePaths, query_id: str, gold: Sequence[str]) -> tuple[int, float] | None:
    """``(rank, score)`` of ``query_id``'s best gold document over every score table (rank 1 = the
    highest score, ties by ``doc_id``, as ``top_influences``); None when no gold document is kept."""
    if not gold:
        return None
    tables = sorted(paths.root.glob(str(paths.scores_glob.relative_to(paths.root))))
    if not tables:
        return None
    frames = []
    for shard in paths.tokenized_shards():
        names = pl.read_parquet_schema(paths.tokens(shard))
        frame = pl.read_parquet(paths.tokens(shard), columns=["doc_id"] + (
            ["source_doc_id"] if "source_doc_id" in names else []))
        frames.append(frame if "source_doc_id" in names else frame.with_columns(source_doc_id=pl.col("doc_id")))
    sources = pl.concat(frames).lazy() if frames else pl.LazyFrame(schema={"doc_id": pl.String,
                                                                          "source_doc_id": pl.String})
    ranked = (pl.scan_parquet([str(t) for t in tables]).filter(pl.col("query_id") == query_id)
              .select("doc_id", "score").sort(["score", "doc_id"], descending=[True, False])
              .with_row_index("rank", offset=1)
              .join(sources.select("doc_id", pl.coalesce("source_doc_id", "doc_id").alias("source")),
                    on="doc_id", how="left")
              .filter(pl.col("source").is_in(list(gold)) | pl.col("doc_id").is_in(list(gold)))
              .sort("rank").head(1).collect())
    return (int(ranked["rank"][0]), float(ranked["score"][0])) if ranked.height else None


def _token_docs(paths: PipelinePaths, hits: Sequence[dict]) -> dict[str, TokenizedDoc]:
    """The tokenized documents of ``hits`` (``doc_id``, and ``shard`` when known)."""
    wanted: dict[str | None, set[str]] = {}
    for hit in hits:
        wanted.setdefault(hit.get("shard"), set()).add(hit["doc_id"])
    docs = {}
    for shard, ids in wanted.items():
        for path in [paths.tokens(shard)] if shard else [paths.tokens(s) for s in paths.tokenized_shards()]:
            docs |= {d.doc_id: d for d in read_tokenized(path) if d.doc_id in ids}
    return docs


def shard_of(paths: PipelinePaths, doc_ids: Sequence[str]) -> dict[str, str]:
    """The tokenized shard of each of ``doc_ids`` (those found)."""
    wanted, found = set(doc_ids), {}
    for shard in paths.tokenized_shards():
        ids = pl.read_parquet(paths.tokens(shard), columns=["doc_id"])["doc_id"].to_list()
        found |= {d: shard for d in ids if d in wanted}
    return found


def explain_documents(spec: PipelineSpec, paths: PipelinePaths, prepared: np.ndarray, hits: Sequence[dict],
                      tokenizer, collector: GradientCollector, preconditioner: Preconditioner | None,
                      gold: Sequence[str] | None) -> list[DocumentExplanation]:
    """Per-token shares of ``hits`` (``{doc_id, shard, score}``, ranked) against one prepared
    query row ``prepared`` [dims] (the scorer's own preparation), recomputed with ``collector``
    (``per_token: positional``). Progress: step ``explain``, in documents."""
    if collector.gradients.per_token != "positional":
        raise ValueError("explaining documents needs a collector with gradients.per_token == 'positional'")
    docs = _token_docs(paths, hits)
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    with track("explain", len(hits), "documents") as tracker:
        for rank, hit in enumerate(hits, 1):
            doc = docs[hit["doc_id"]]
            rows, _ = collector.collect([(doc.input_ids, doc.loss_mask)])
            parts, total = token_contributions(rows, prepared, preconditioner, spec.scoring.metric)
            shown = np.zeros(len(doc.input_ids))
            shown[1:len(parts) + 1] = parts  # position t's share on token t + 1 (module docstring)
            out.append(DocumentExplanation(
                rank, doc.doc_id, hit["shard"], float(hit["score"]), total,
                None if gold is None else doc.source_id in gold or doc.doc_id in gold,
                token_pieces(tokenizer, doc.input_ids), shown.tolist(),
                [int(i) in special for i in doc.input_ids]))
            tracker.update(1, tokens=len(doc.input_ids))
    return out


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
    query = next(q for q in read_queries(paths.queries) if q["doc_id"] == query_id)
    gold = list(query["gold_doc_ids"]) if query.get("gold_doc_ids") else None
    prompt, answer = query_parts(json.loads(query["content"]))
    documents = explain_documents(spec, paths, prepared, hits, tokenizer, collector, scorer.preconditioner, gold)
    return Explanation(spec.name, query_id, query["text"], spec.scoring.metric, gold, documents, prompt, answer,
                       first_gold_rank(paths, query_id, gold or []))


def explain_samples(spec: PipelineSpec, paths: PipelinePaths, model, tokenizer, queries: int,
                    k: int) -> list[Explanation]:
    """:func:`explain_query` for ``queries`` queries spread evenly over the query table (so not
    all about one subject; queries with gold documents first), sharing one scorer and collector;
    none when the score tables rank an aggregate (``scoring.aggregate`` other than
    ``individual``), not single queries."""
    if spec.scoring.aggregate != "individual":
        return []
    scorer = QueryScorer.for_pipeline(spec, paths, aggregate="individual")
    table = [q for q in read_queries(paths.queries) if q["doc_id"] in scorer.query_ids]
    picked: list[str] = []
    for group in ([q for q in table if q.get("gold_doc_ids")], [q for q in table if not q.get("gold_doc_ids")]):
        want = min(queries - len(picked), len(group))
        if want > 0:
            step = len(group) / want  # one more per pick where it fits: a table ordered by subject,
            shifted = [int(i * step) + i for i in range(want)]  # then relation, varies both
            spots = shifted if shifted[-1] < len(group) else [int(i * step) for i in range(want)]
            picked += [group[i]["doc_id"] for i in spots]
    collector = positional_collector(model, spec, paths)
    return [explain_query(spec, paths, qid, k, model, tokenizer, scorer, collector) for qid in picked]
