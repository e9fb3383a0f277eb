"""Score tables: long-format Parquet per shard (``query_id, doc_id, shard, score``, plus
``token`` in per-token tables), written atomically. Higher scores = stronger proponents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from attribution_assets.engine.io.atomic import atomic_file

SCORE_COLUMNS = ["query_id", "doc_id", "shard", "score"]


def score_query_ids(query_ids: Sequence[str], aggregate: str) -> list[str]:
    """Row labels of a score matrix: the query ids, or one ``__<aggregate>__`` row."""
    return list(query_ids) if aggregate == "individual" else [f"__{aggregate}__"]


def write_scores(path: Path, scores: np.ndarray, query_ids: Sequence[str], doc_ids: Sequence[str],
                 shard: str, top_k: int = 0) -> int:
    """Write ``scores [q, n]`` long-format (per query, the ``top_k`` best, 0 = all); return rows."""
    q, n = scores.shape
    if top_k and top_k < n:
        cols = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    else:
        cols = np.tile(np.arange(n), (q, 1))
    rows = np.repeat(np.arange(q), cols.shape[1])
    flat_cols = cols.reshape(-1)
    frame = pl.DataFrame({
        "query_id": pl.Series(np.asarray(query_ids, dtype=object)[rows], dtype=pl.String),
        "doc_id": pl.Series(np.asarray(doc_ids, dtype=object)[flat_cols], dtype=pl.String),
        "shard": pl.Series([shard] * len(rows), dtype=pl.String),
        "score": pl.Series(scores[rows, flat_cols].astype(np.float32), dtype=pl.Float32),
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
