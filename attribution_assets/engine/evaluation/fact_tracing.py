"""Fact-tracing evaluation: each attribution method next to baselines, on queries with gold docs.

For every method, every query is scored against ALL training documents; the rank of
the query's first gold document gives recall@k and MRR (``metrics.recall_and_mrr``).
Rank convention: ``1 + #(non-gold documents scoring >= the best gold document)``, so
ties count against the method (a method that scores everything equal is ranked last).

Methods, their scores and the gradients they share: ``evaluation.methods``.

With ``evaluation.tail_patch_k > 0`` each row also gets ``tail_patch``: the mean increase of
the answer's log-probability after one training step on the method's top documents
(``tail_patch``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from attribution_assets.engine.evaluation.methods import (
    QUERY_LOSSES,
    GradientCache,
    Method,
    available_methods,
    configured_name,
    method_scores,
)
from attribution_assets.engine.evaluation.metrics import recall_and_mrr
from attribution_assets.engine.evaluation.tail_patch import (
    TailPatcher,
    sample_rows,
    tail_patch_increases,
)
from attribution_assets.engine.gradients.collect import optimizer_state_source
from attribution_assets.engine.io.atomic import atomic_file, write_text_atomic
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.progress import Tracker
from attribution_assets.spec import PipelineSpec


def first_gold_ranks(scores: np.ndarray, doc_ids: Sequence[str], query_ids: Sequence[str],
                     gold: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Rank of each query's best-scoring gold row among all ``n`` rows (ties pessimistic).

    ``doc_ids`` are the source document ids of the rows (a chunk counts for its document).
    Queries whose gold documents are all absent from ``doc_ids`` are left out.
    """
    columns: dict[str, list[int]] = {}
    for i, d in enumerate(doc_ids):
        columns.setdefault(d, []).append(i)
    ranks = {}
    for row, qid in enumerate(query_ids):
        cols = [c for g in gold.get(qid, ()) for c in columns.get(g, ())]
        if not cols:
            continue
        is_gold = np.zeros(len(doc_ids), dtype=bool)
        is_gold[cols] = True
        best = scores[row, cols].max()
        ranks[qid] = 1 + int(np.sum(scores[row, ~is_gold] >= best))
    return ranks


@dataclass
class FactTracingResult:
    """``frame`` (one row per method and query loss), its ``markdown`` (with the skipped
    methods and why), the raw ``scores[query_loss][method]`` ``[q, n]`` (columns in ``docs``
    order) and ``skipped`` ``{method: reason}``."""

    frame: pl.DataFrame
    markdown: str
    scores: dict[str, dict[str, np.ndarray]]
    skipped: dict[str, str]


def fact_tracing_table(model, spec: PipelineSpec, paths: PipelinePaths | None,
                       docs: Sequence[TokenizedDoc], queries: Sequence[TokenizedDoc],
                       gold: Mapping[str, Sequence[str]], methods: Sequence[Method] | None = None,
                       query_losses: Sequence[str] = QUERY_LOSSES,
                       ks: tuple[int, ...] = (1, 10, 50)) -> FactTracingResult:
    """Recall@k and MRR of each method, per query loss (BM25 once: it has no query loss).

    ``docs``: every training document (all shards); ``queries``: tokenized queries whose
    ``loss_mask`` marks the completion; ``gold``: query id -> gold doc ids. Frame columns:
    ``method, query_loss, configured, recall@k..., mrr, queries`` and, when
    ``spec.evaluation.tail_patch_k > 0``, ``tail_patch`` (mean log-probability increase).
    """
    methods, skipped = available_methods(spec, paths, methods)
    patch = _tail_patch_setup(model, spec, paths, queries)
    cache = GradientCache(model, spec, paths, docs, queries)
    doc_ids, query_ids = [d.source_id for d in docs], [q.doc_id for q in queries]
    mine = configured_name(spec, methods)
    rows, all_scores = [], {}
    once = ("bm25", "magic", "random")  # no query loss of their own: one row
    todos = {loss: [m for m in methods if m.kind not in once or loss == query_losses[0]] for loss in query_losses}
    tracker = Tracker("fact tracing", sum(map(len, todos.values())), "methods")
    for query_loss, todo in todos.items():
        all_scores[query_loss] = method_scores(todo, cache, query_loss)
        for m in todo:
            ranks = first_gold_ranks(all_scores[query_loss][m.name], doc_ids, query_ids, gold)
            loss_name = {"bm25": "full text", "random": "full text", "magic": "completion"}.get(m.kind, query_loss)
            row = {"method": m.name, "query_loss": loss_name,
                   "configured": m.name == mine, **recall_and_mrr(ranks, ks)}
            if patch is not None:
                patcher, sample = patch
                row["tail_patch"] = float(tail_patch_increases(
                    patcher, docs, queries, all_scores[query_loss][m.name], spec.evaluation.tail_patch_k,
                    sample).mean())
            rows.append(row)
            tracker.update()
    tracker.close()
    frame = pl.DataFrame(rows)
    markdown = markdown_table(frame) + "".join(f"\nSkipped `{name}`: {why}.\n" for name, why in skipped.items())
    if patch is not None:
        e = spec.evaluation
        markdown += (f"\n`tail_patch`: mean gain in the answer's log-probability after one {e.tail_patch_optimizer} "
                     f"step (lr {e.tail_patch_lr:g}) on each query's top {e.tail_patch_k} documents, over "
                     f"{len(patch[1])} of the {len(queries)} tokenized queries (`evaluation.tail_patch_queries`).\n")
    return FactTracingResult(frame, markdown, all_scores, skipped)


def _tail_patch_setup(model, spec: PipelineSpec, paths: PipelinePaths | None,
                      queries: Sequence[TokenizedDoc]) -> tuple[TailPatcher, list[int]] | None:
    """The patcher and the sampled query rows of ``spec.evaluation``'s tail patch (None: off)."""
    e = spec.evaluation
    if e.tail_patch_k == 0:
        return None
    state = None
    if e.tail_patch_optimizer == "adam":
        probe = dataclasses.replace(spec, gradients=dataclasses.replace(spec.gradients, normalizer="adam"))
        state = optimizer_state_source(probe, paths)
    patcher = TailPatcher(model, e.tail_patch_lr, e.tail_patch_optimizer, state)
    return patcher, sample_rows(len(queries), e.tail_patch_queries, e.lds_seed)


def markdown_table(frame: pl.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table of ``frame`` (floats rounded to ``digits``)."""
    def cell(value) -> str:
        if isinstance(value, float):
            return "nan" if np.isnan(value) else f"{value:.{digits}f}"
        return str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join(lines) + "\n"


def write_tables(frame: pl.DataFrame, markdown: str, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write ``<out_dir>/<name>.parquet`` and ``<name>.md`` atomically; return both paths."""
    parquet, md = Path(out_dir) / f"{name}.parquet", Path(out_dir) / f"{name}.md"
    with atomic_file(parquet) as tmp:
        frame.write_parquet(tmp)
    write_text_atomic(md, markdown)
    return parquet, md
