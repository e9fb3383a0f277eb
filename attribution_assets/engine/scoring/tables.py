"""Score tables: long-format Parquet per shard (``query_id, doc_id, shard, score``, plus
``token`` in per-token tables; block tables ``query_id, doc_id, shard, module, layer, head, kind,
contribution``), written atomically. Higher scores = stronger proponents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from attribution_assets.engine.io.atomic import atomic_file

SCORE_COLUMNS = ["query_id", "doc_id", "shard", "score"]
BLOCK_COLUMNS = ["query_id", "doc_id", "shard", "module", "layer", "head", "kind", "contribution"]


def score_query_ids(query_ids: Sequence[str], aggregate: str) -> list[str]:
    """Row labels of a score matrix: the query ids, or one ``__<aggregate>__`` row."""
    return list(query_ids) if aggregate == "individual" else [f"__{aggregate}__"]


def top_columns(scores: np.ndarray, top_k: int = 0) -> np.ndarray:
    """``[q, k]`` column indices a score table keeps: per row the ``top_k`` highest scores
    (ties in column order), every column when ``top_k`` is 0 or at least ``n``.

    The order of a stable sort of ``-scores`` without sorting whole rows: a partition finds each
    row's k-th highest score, the columns above it and the first ties at it (in column order) are
    kept, and only those ``k`` are sorted (1,000 x 100k scores: ~20x faster than the full sort).
    Rows go in blocks of ~4M scores to bound memory; NaN scores take the full sort."""
    q, n = scores.shape
    if not top_k or top_k >= n:
        return np.tile(np.arange(n), (q, 1))
    if np.isnan(scores).any():
        return np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    out = np.empty((q, top_k), dtype=np.int64)
    step = max(1, (1 << 22) // n)
    for start in range(0, q, step):
        neg = -scores[start:start + step]
        kth = np.partition(neg, top_k - 1, axis=1)[:, top_k - 1:top_k]  # each row's k-th highest, negated
        keep = neg < kth
        ties = neg == kth
        wanted = top_k - keep.sum(axis=1, keepdims=True)  # ties to keep, the first in column order
        keep |= ties & (np.cumsum(ties, axis=1, dtype=np.int32) <= wanted)
        cols = np.nonzero(keep)[1].reshape(len(neg), top_k)  # per row, ascending columns
        order = np.argsort(np.take_along_axis(neg, cols, axis=1), axis=1, kind="stable")
        out[start:start + step] = np.take_along_axis(cols, order, axis=1)
    return out


def write_scores(path: Path, scores: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str],
                 shard: str | Sequence[str], top_k: int = 0) -> int:
    """Write ``scores [q, n]`` long-format (per query, the ``top_k`` best, 0 = all); return rows.
    ``shard``: of every document, or one per document (a table over several shards)."""
    cols = top_columns(scores, top_k)
    rows = np.repeat(np.arange(scores.shape[0]), cols.shape[1])
    flat_cols = cols.reshape(-1)
    shards = [shard] * len(rows) if isinstance(shard, str) else np.asarray(shard, dtype=object)[flat_cols]
    frame = pl.DataFrame({
        "query_id": pl.Series(np.asarray(query_ids, dtype=object)[rows], dtype=pl.String),
        "doc_id": pl.Series(np.asarray(doc_ids, dtype=object)[flat_cols], dtype=pl.String),
        "shard": pl.Series(shards, dtype=pl.String),
        "score": pl.Series(scores[rows, flat_cols].astype(np.float32), dtype=pl.Float32),
    })
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)
    return frame.height


def write_block_scores(path: Path, contributions: np.ndarray, pair_query_ids: Sequence[str],
                       pair_doc_ids: Sequence[str], shard: str, groups: Sequence) -> int:
    """Long-format Parquet of ``contributions [P, G]`` (pair ``i`` = ``(pair_query_ids[i],
    pair_doc_ids[i])``, group ``g`` = ``groups[g]``, a ``breakdown.Group``): one row per pair
    and group, ``query_id, doc_id, shard, module, layer, head, kind, contribution``."""
    n_pairs, n_groups = contributions.shape
    pair = np.repeat(np.arange(n_pairs), n_groups)
    group = np.tile(np.arange(n_groups), n_pairs)

    def labels(field: str, dtype):
        return pl.Series([getattr(g, field) for g in groups], dtype=dtype).gather(group)

    frame = pl.DataFrame({
        "query_id": pl.Series(np.asarray(pair_query_ids, dtype=object)[pair], dtype=pl.String),
        "doc_id": pl.Series(np.asarray(pair_doc_ids, dtype=object)[pair], dtype=pl.String),
        "shard": pl.Series([shard] * len(pair), dtype=pl.String),
        "module": labels("module", pl.String),
        "layer": labels("layer", pl.Int32),
        "head": labels("head", pl.Int32),
        "kind": labels("kind", pl.String),
        "contribution": pl.Series(contributions.reshape(-1).astype(np.float32), dtype=pl.Float32),
    })
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)
    return frame.height


def write_token_scores(path: Path, token_scores: np.ndarray, query_ids: Sequence[str],
                       doc_ids: Sequence[str], info: dict, shard: str) -> int:
    """Per-token Parquet ``query_id, doc_id, shard, token, score`` (rows of a per-token store)."""
    offsets = np.asarray(info["token_offsets"], dtype=np.int64)
    doc_of_row = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    q, n = token_scores.shape
    rows = np.repeat(np.arange(q), n)
    cols = np.tile(np.arange(n), q)
    frame = pl.DataFrame({
        "query_id": pl.Series(np.asarray(query_ids, dtype=object)[rows], dtype=pl.String),
        "doc_id": pl.Series(np.asarray(doc_ids, dtype=object)[doc_of_row[cols]], dtype=pl.String),
        "shard": pl.Series([shard] * len(rows), dtype=pl.String),
        "token": pl.Series(np.asarray(info["token_positions"], dtype=np.int32)[cols], dtype=pl.Int32),
        "score": pl.Series(token_scores[rows, cols].astype(np.float32), dtype=pl.Float32),
    })
    with atomic_file(path) as tmp:
        frame.write_parquet(tmp)
    return frame.height
