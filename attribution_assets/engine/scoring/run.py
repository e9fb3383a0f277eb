"""Scoring a pipeline: its queries, prepared once, against each shard's training rows.

The one path from gradients to numbers for score tables, the Attributor's brute-force
search and the FAISS index input: :class:`QueryScorer` holds the prepared queries and
the preconditioner; training rows come from ``gradients.collect.training_rows``, stored
or streamed, so this stage never asks which.

Preconditioners: ``trackstar`` acts on projected rows (a :class:`Preconditioner` the scorer
applies); ``ekfac`` / ``kfac`` act on each query's full gradient before projection, so the
query rows come out of :func:`query_collector` already preconditioned (stored as
``kfac_query_gradients``) and the scorer sees no preconditioner: training rows stay
projected and raw, and the score tables, index and DuckDB views are the same code.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from attribution_assets.engine.gradients.collect import ShardRows, make_collector
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.store import GradientStore, document_rows
from attribution_assets.engine.io.digests import parts_digest
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.kfac import (
    CorrectionSums,
    KroneckerEigen,
    KroneckerPreconditioner,
)
from attribution_assets.engine.preconditioning.preconditioners import Preconditioner
from attribution_assets.engine.scoring.breakdown import breakdown_groups, contributions
from attribution_assets.engine.scoring.scorer import prepare_queries, prepare_train, score_prepared
from attribution_assets.engine.scoring.tables import (
    score_query_ids,
    top_columns,
    write_block_scores,
    write_scores,
    write_token_scores,
)
from attribution_assets.spec import PipelineSpec, ScoringSpec


def load_preconditioner(spec: PipelineSpec, paths: PipelinePaths) -> Preconditioner | None:
    """The pipeline's TrackStar preconditioner: None for ``none``, and for ``ekfac`` / ``kfac``
    (their query rows are preconditioned when collected: :func:`query_collector`)."""
    if spec.scoring.preconditioner != "trackstar":
        return None
    if not paths.preconditioner.exists():
        raise FileNotFoundError(f"{paths.preconditioner} does not exist; materialize "
                                f"{spec.name}/preconditioner first.")
    return Preconditioner.load(paths.preconditioner)


def load_kronecker(spec: PipelineSpec, paths: PipelinePaths) -> KroneckerPreconditioner:
    """The pipeline's EK-FAC (eigendecomposition + merged eigenvalue correction) or K-FAC
    (eigendecomposition) preconditioner, damped with ``scoring.damping``."""
    if not spec.scoring.kronecker:
        raise ValueError(f"Pipeline {spec.name!r} uses scoring.preconditioner "
                         f"{spec.scoring.preconditioner!r}, not ekfac or kfac.")
    eigen = KroneckerEigen.load(paths.kfac_eigendecomposition)
    correction = CorrectionSums.load(paths.ekfac_eigenvalues) if spec.scoring.preconditioner == "ekfac" else None
    return KroneckerPreconditioner(eigen, correction, spec.scoring.damping)


def query_collector(model, spec: PipelineSpec, paths: PipelinePaths | None = None,
                    device=None, autocast=None) -> GradientCollector:
    """The collector of query rows as the scorer takes them: the pipeline's collector, or for
    ``ekfac`` / ``kfac`` one that preconditions each query gradient (projected block, or full
    gradient before projecting); ``autocast`` as in ``GradientCollector``."""
    if not spec.scoring.kronecker:
        return make_collector(model, spec, paths, device, autocast)
    if paths is None:
        raise ValueError("an EK-FAC / K-FAC query collector reads its factors: pass the pipeline's paths")
    return GradientCollector(model, spec.gradients, device=device, autocast=autocast,
                             transform=load_kronecker(spec, paths))


def query_rows_path(spec: PipelineSpec, paths: PipelinePaths) -> Path:
    """The gradient store of the query rows the scorer takes (:func:`query_collector`'s)."""
    return paths.kfac_query_gradients if spec.scoring.kronecker else paths.query_gradients


@dataclass
class ShardScores:
    """What scoring one shard wrote: table rows, sizes, path, seconds and a content version."""

    shard: str
    rows: int
    queries: int
    documents: int
    path: Path
    seconds: float
    version: str
    block_rows: int = 0


class QueryScorer:
    """Query rows ``[q, dims]`` prepared once (preconditioned, normalized, aggregated as
    ``scoring`` says); :meth:`score` gives ``[q', n]`` for document rows ``[n, dims]``."""

    def __init__(self, rows: np.ndarray, query_ids: Sequence[str] | None,
                 preconditioner: Preconditioner | None, scoring: ScoringSpec, aggregate: str | None = None):
        self.scoring, self.preconditioner = scoring, preconditioner
        self.aggregate = aggregate or scoring.aggregate
        self.prepared = prepare_queries(rows, preconditioner, scoring.metric, self.aggregate)
        ids = [str(i) for i in range(len(rows))] if query_ids is None else query_ids
        self.query_ids = score_query_ids(ids, self.aggregate)
        self.query_info: dict | None = None  # the query store's info, when read from one

    @classmethod
    def for_pipeline(cls, spec: PipelineSpec, paths: PipelinePaths, aggregate: str | None = None,
                     preconditioner: Preconditioner | None = None) -> QueryScorer:
        """The pipeline's own queries (:func:`query_rows_path`) and preconditioner."""
        store = GradientStore(query_rows_path(spec, paths))
        precond = preconditioner if preconditioner is not None else load_preconditioner(spec, paths)
        scorer = cls(store.document_rows(), store.doc_ids, precond, spec.scoring, aggregate)
        scorer.query_info = store.info
        return scorer

    def score(self, doc_rows: np.ndarray) -> np.ndarray:
        return score_prepared(self.prepared, doc_rows, self.preconditioner, self.scoring.metric,
                              aggregate=self.aggregate)

    def breakdown(self, doc_rows: np.ndarray, layout: Sequence[dict], scores: np.ndarray, top_k: int,
                  level: str | None = None):
        """``(contributions [P, G], pair query ids, pair doc indices, groups)`` for the pairs a
        score table keeps (:func:`tables.top_columns` of ``scores [q', n]``), at ``level``
        (default ``scoring.breakdown``); contributions add up to each pair's score."""
        groups = breakdown_groups(layout, level or self.scoring.breakdown)
        cols = top_columns(scores, top_k)
        pair_rows = np.repeat(np.arange(scores.shape[0]), cols.shape[1])
        pair_docs = cols.reshape(-1)
        values = contributions(self.prepared, doc_rows, self.preconditioner, self.scoring.metric, groups,
                               pair_rows, pair_docs, nearest=self.aggregate == "nearest")
        return values, [self.query_ids[r] for r in pair_rows], pair_docs, groups

    def write_shard(self, rows: ShardRows, paths: PipelinePaths, top_k: int) -> ShardScores:
        """Score one shard and write its tables (``scores``; for per-token rows ``token_scores``;
        with ``scoring.breakdown``, ``block_scores`` for the same kept pairs, else none)."""
        start = time.perf_counter()
        doc_rows = rows.document_rows()
        matrix = self.score(doc_rows)
        n = write_scores(paths.scores(rows.shard), matrix, self.query_ids, rows.doc_ids, rows.shard, top_k)
        if rows.info.get("per_token"):
            write_token_scores(paths.token_scores(rows.shard), self.score(rows.array), self.query_ids,
                               rows.doc_ids, rows.info, rows.shard)
        block_rows, parts = 0, [matrix.tobytes()]
        if self.scoring.breakdown != "none":
            values, pair_queries, pair_docs, groups = self.breakdown(doc_rows, rows.info["modules"], matrix,
                                                                     top_k)
            block_rows = write_block_scores(paths.block_scores(rows.shard), values, pair_queries,
                                            [rows.doc_ids[j] for j in pair_docs], rows.shard, groups)
            parts.append(values.tobytes())
        else:
            paths.block_scores(rows.shard).unlink(missing_ok=True)  # from an earlier breakdown setting
        return ShardScores(rows.shard, n, len(self.query_ids), len(rows.doc_ids), paths.scores(rows.shard),
                           round(time.perf_counter() - start, 3), parts_digest(parts), block_rows)

    def score_shards(self, shards: Iterable[ShardRows], paths: PipelinePaths,
                     top_k: int) -> Iterator[ShardScores]:
        for rows in shards:
            yield self.write_shard(rows, paths, top_k)


def prepared_training_blocks(paths: PipelinePaths, shards: Sequence[str], preconditioner: Preconditioner | None,
                             metric: str) -> Iterator[tuple[list[str], np.ndarray]]:
    """``(doc_ids, rows)`` per stored shard, rows as scores see them (the FAISS index input)."""
    for shard in shards:
        store = GradientStore(paths.train_gradients(shard))
        yield store.doc_ids, prepare_train(document_rows(store.array, store.info), preconditioner, metric)
