"""The one engine scorer: query gradients vs training gradients.

Shapes: ``query [q, d]``, ``train [n, d]`` (any float dtype, memory-mapped is fine),
scores ``[q', n]`` float32 with ``q' = q`` for ``aggregate="individual"`` and 1
otherwise. ``P`` is a :class:`~attribution_assets.engine.preconditioners.Preconditioner`
(damped, block-diagonal; ``None`` means identity).

Metrics:

- ``"cosine"`` (TrackStar default): ``s = cos(P^{-1/2} g_q, P^{-1/2} g_t)``. Both sides
  are preconditioned with power -1/2 and unit-normalized. A zero row scores 0.
- ``"inner_product"``: ``s = g_qᵀ P^{-1} g_t``. Power -1 is applied to the query side
  only, so preconditioning happens exactly once; training rows are used raw.

Aggregates:

- ``"individual"``: one row per query ``[q, n]``.
- ``"nearest"``: ``[1, n]``, the max over queries of the individual scores.
- ``"mean"`` / ``"sum"`` (LESS-style): the prepared (preconditioned) query rows are
  unit-normalized, then averaged/summed into one query vector ``[1, n]``. For cosine,
  mean of unit query vectors dotted with a unit training vector equals the mean of the
  individual cosines (no renormalization of the mean vector).

``unit_normalize`` (query side): cosine always normalizes (``False`` is an error);
for inner_product the default is off for individual/nearest and on for mean/sum.
Training rows are never normalized under inner_product.

Per-token rows: training rows may be per-token gradients (a document's gradient is
the sum of its token rows, loss summed over tokens). Inner-product token scores are
linear, so they sum exactly to the document score. Under cosine each token row is
preconditioned and normalized on its own, so token scores do not sum to the
document's cosine.

Sign: both sides are gradients of the loss, so a positive score means a gradient
step on the training row also lowers the query loss: higher score = the training
example supports / pushes the model toward the query (a proponent).

Streaming: ``prepare_queries`` once, then ``score_prepared`` per training block
(memory-mapped shards), in float32 torch matmuls chunked over training rows.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

from attribution_assets.engine.preconditioning.preconditioners import (
    Preconditioner,
    as_float32_tensor,
)

Metric = Literal["cosine", "inner_product"]
Aggregate = Literal["individual", "nearest", "mean", "sum"]
METRICS = ("cosine", "inner_product")
AGGREGATES = ("individual", "nearest", "mean", "sum")
CHUNK_BYTES = 64 << 20  # float32 training rows scored at a time (unless chunk_rows says)


def _check_options(metric: str, aggregate: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")


def _check_dims(x: np.ndarray, what: str, dims: int | None, other: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{what} must be 2-D [rows, dims], got shape {tuple(x.shape)}")
    if dims is not None and x.shape[1] != dims:
        raise ValueError(f"{what} has shape {tuple(x.shape)} but {other} has {dims} columns")


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalize rows; all-zero rows stay zero."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / norms.clamp_min(torch.finfo(x.dtype).tiny)


def prepare_queries(
    query: np.ndarray,
    preconditioner: Preconditioner | None = None,
    metric: Metric = "cosine",
    aggregate: Aggregate = "individual",
    *,
    unit_normalize: bool | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Query gradients ``[q, d]`` -> prepared float32 ``[q', d]`` (see module docstring).

    cosine: ``normalize(P^{-1/2} g_q)``; inner_product: ``P^{-1} g_q`` (optionally
    normalized); then mean/sum aggregation into one row. ``nearest`` keeps all rows
    (reduce with ``score_prepared(..., aggregate="nearest")``).
    """
    _check_options(metric, aggregate)
    dims = None if preconditioner is None else preconditioner.dims
    _check_dims(query, "query", dims, "the preconditioner layout")
    if query.shape[0] == 0:
        raise ValueError("query has no rows")
    if metric == "cosine" and unit_normalize is False:
        raise ValueError("cosine always unit-normalizes; use metric='inner_product'")
    if unit_normalize is None:
        unit_normalize = metric == "cosine" or aggregate in ("mean", "sum")
    device = torch.device(device or "cpu")
    x = as_float32_tensor(query, device)
    if preconditioner is not None:
        x = preconditioner.apply_torch(x, -0.5 if metric == "cosine" else -1.0)
    if unit_normalize:
        x = _normalize_rows(x)
    if aggregate == "mean":
        x = x.mean(dim=0, keepdim=True)
    elif aggregate == "sum":
        x = x.sum(dim=0, keepdim=True)
    return x.cpu().numpy()


def _prepare_train(t: torch.Tensor, preconditioner: Preconditioner | None, metric: Metric) -> torch.Tensor:
    if metric == "cosine":
        if preconditioner is not None:
            t = preconditioner.apply_torch(t, -0.5)
        t = _normalize_rows(t)
    return t


def prepare_train(
    train_block: np.ndarray,
    preconditioner: Preconditioner | None = None,
    metric: Metric = "cosine",
    *,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Training rows ``[n, d]`` as scores see them (and a FAISS index stores them), float32.

    cosine: ``normalize(P^{-1/2} g_t)``; inner_product: ``g_t`` unchanged. Then
    ``score_prepared(q, t) == prepared_queries @ prepare_train(t).T``.
    """
    _check_options(metric, "individual")
    dims = None if preconditioner is None else preconditioner.dims
    _check_dims(train_block, "training block", dims, "the preconditioner layout")
    device = torch.device(device or "cpu")
    return _prepare_train(as_float32_tensor(train_block, device), preconditioner, metric).cpu().numpy()


def score_prepared(
    prepared: np.ndarray,
    train_block: np.ndarray,
    preconditioner: Preconditioner | None = None,
    metric: Metric = "cosine",
    *,
    aggregate: Aggregate = "individual",
    chunk_rows: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Prepared queries ``[q', d]`` x training rows ``[n, d]`` -> float32 ``[q', n]``.

    cosine: each training row becomes ``normalize(P^{-1/2} g_t)``; inner_product: raw
    ``g_t``. ``aggregate="nearest"`` max-reduces over query rows to ``[1, n]``; any
    other value leaves the rows as prepared. Reads ``chunk_rows`` training rows at a time
    (default: 64 MiB of float32 rows).
    """
    _check_options(metric, aggregate)
    dims = None if preconditioner is None else preconditioner.dims
    _check_dims(prepared, "prepared queries", dims, "the preconditioner layout")
    _check_dims(train_block, "training block", prepared.shape[1], "the prepared queries")
    device = torch.device(device or "cpu")
    q = as_float32_tensor(prepared, device)
    n = train_block.shape[0]
    chunk_rows = chunk_rows or max(1, CHUNK_BYTES // (4 * prepared.shape[1]))
    out = np.empty((1 if aggregate == "nearest" else q.shape[0], n), dtype=np.float32)
    for start in range(0, n, chunk_rows):
        t = _prepare_train(as_float32_tensor(train_block[start : start + chunk_rows], device),
                           preconditioner, metric)
        s = q @ t.T
        if aggregate == "nearest":
            s = s.max(dim=0, keepdim=True).values
        out[:, start : start + t.shape[0]] = s.cpu().numpy()
    return out


def score(
    query: np.ndarray,
    train: np.ndarray,
    *,
    preconditioner: Preconditioner | None = None,
    metric: Metric = "cosine",
    aggregate: Aggregate = "individual",
    unit_normalize: bool | None = None,
    chunk_rows: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """``prepare_queries`` + ``score_prepared``: ``[q, d] x [n, d] -> [q', n]`` float32."""
    prepared = prepare_queries(
        query, preconditioner, metric, aggregate, unit_normalize=unit_normalize, device=device
    )
    return score_prepared(
        prepared,
        train,
        preconditioner,
        metric,
        aggregate=aggregate,
        chunk_rows=chunk_rows,
        device=device,
    )


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the ``k`` highest scores: ``(indices [q, k'], values [q, k'])``, ``k' = min(k, n)``.

    Descending by score; ties keep ascending index order; NaN ranks last.
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [queries, n], got shape {scores.shape}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    k = min(int(k), scores.shape[1])
    keys = np.where(np.isnan(scores), np.inf, -scores.astype(np.float64))
    indices = np.empty((scores.shape[0], k), dtype=np.int64)
    for row in range(scores.shape[0]):
        key = keys[row]
        if 0 < k < key.size:
            kth = np.partition(key, k - 1)[k - 1]
            candidates = np.flatnonzero(key <= kth)  # ascending indices, ties included
        else:
            candidates = np.arange(key.size)
        order = np.argsort(key[candidates], kind="stable")[:k]
        indices[row] = candidates[order]
    return indices, np.take_along_axis(scores, indices, axis=1)
