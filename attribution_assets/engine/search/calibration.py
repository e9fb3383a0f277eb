"""Build-time calibration of an index's search parameter (IVF ``nprobe``, HNSW ``efSearch``).

What it measures: recall@k of ``FaissIndex.search`` against the exact inner-product top-k
of up to ``calibration_queries`` query rows (the caller's queries, else indexed
rows), the exact top-k being computed by brute force while ``build_index`` adds the rows.

Criterion: the chosen value is the smallest one whose mean recall@k over the calibration
queries minus ``CONFIDENCE_Z`` (1.645) standard errors, a one-sided 95 % lower bound,
reaches ``target_recall``, so that fresh queries from the same distribution reach it too.
Values are searched by doubling from the lowest (1, or k for efSearch), then bisection,
taking recall to grow with the value.

Unreachable target: when even the largest value (``nlist``, or ``EF_SEARCH_MAX`` capped at
the index size) misses it, e.g. because PQ or SQ codes bound the recall, the smallest value
whose mean recall is within ``UNREACHABLE_SLACK`` of the largest value's is kept and the
report says ``"reachable": False``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

CONFIDENCE_Z = 1.645  # calibration: one-sided 95 % lower bound on the mean recall
UNREACHABLE_SLACK = 0.01  # target out of reach: settle within this of the best recall
EF_SEARCH_MAX = 4096  # largest HNSW efSearch the calibration tries


def calibration_rows(calibration: np.ndarray | None, sample: np.ndarray, limit: int,
                     seed: int) -> tuple[np.ndarray, str]:
    """``(rows [m, d] float32, source)``: up to ``limit`` rows (seeded) of the
    caller's queries ``calibration [m', d]`` (source ``"queries"``), else of ``sample
    [s, d]`` (indexed rows, source ``"indexed rows"``); original row order is kept."""
    rows, source = (sample, "indexed rows") if calibration is None else (calibration, "queries")
    if len(rows) > limit:
        pick = np.random.default_rng(seed).choice(len(rows), limit, replace=False)
        rows = rows[np.sort(pick)]
    return np.ascontiguousarray(rows, dtype=np.float32), source


def check_calibration(calibration, dims: int) -> np.ndarray:
    """``calibration`` as an array, checked to be finite query rows ``[m >= 1, dims]``;
    raises ValueError otherwise."""
    calibration = np.asarray(calibration)
    if calibration.ndim != 2 or calibration.shape[1] != dims or not len(calibration):
        raise ValueError(f"calibration must be query rows [m >= 1, {dims}] as search will see "
                         f"them, got shape {calibration.shape}")
    if not np.isfinite(calibration).all():
        raise ValueError("calibration rows contain NaN or Inf")
    return calibration


class ExactTopK:
    """Exact inner-product top-k of ``queries [m, d]`` over rows streamed in index order;
    ``positions [m, min(k, rows seen)]`` are global row numbers (ties in any order).

    ``add(rows [n, d] float32)`` once per chunk, in the order the rows are added to the
    index; ``seconds`` accumulates the time spent there.
    """

    def __init__(self, queries: np.ndarray, source: str, k: int):
        self.queries, self.k, self.source = queries, k, source
        self.scores = np.empty((len(queries), 0), np.float32)
        self.positions = np.empty((len(queries), 0), np.int64)
        self.seen, self.seconds = 0, 0.0

    def add(self, rows: np.ndarray) -> None:
        t0 = time.perf_counter()
        scores = np.concatenate([self.scores, self.queries @ rows.T], axis=1)
        positions = np.concatenate([self.positions, np.broadcast_to(
            np.arange(self.seen, self.seen + len(rows)), (len(self.queries), len(rows)))], axis=1)
        if scores.shape[1] > self.k:
            top = np.argpartition(-scores, self.k - 1, axis=1)[:, :self.k]
            scores = np.take_along_axis(scores, top, axis=1)
            positions = np.take_along_axis(positions, top, axis=1)
        self.scores, self.positions = scores, positions
        self.seen += len(rows)
        self.seconds += time.perf_counter() - t0


def _smallest_setting(measure: Callable[[int], tuple[float, float]], lo: int, hi: int,
                      target: float) -> tuple[int, tuple[float, float], bool]:
    """Smallest ``v`` in ``[lo, hi]`` whose ``measure(v) = (recall, lower bound)`` has a lower
    bound reaching ``target``, taking recall to grow with ``v``: doubling from ``lo``, then
    bisection. If ``hi`` misses the target: the smallest ``v`` whose recall is within
    ``UNREACHABLE_SLACK`` of ``hi``'s. Returns ``(v, measure(v), reachable)``."""
    seen: dict[int, tuple[float, float]] = {}

    def at(v: int) -> tuple[float, float]:
        if v not in seen:
            seen[v] = measure(v)
        return seen[v]

    below, v = lo - 1, lo
    while at(v)[1] < target and v < hi:
        below, v = v, min(hi, 2 * v)
    reachable = at(v)[1] >= target
    goal = target if reachable else at(hi)[0] - UNREACHABLE_SLACK
    if not reachable:
        below = lo - 1

    def passes(u: int) -> bool:
        return at(u)[1 if reachable else 0] >= goal

    while v - below > 1:
        mid = (below + v) // 2
        below, v = (below, mid) if passes(mid) else (mid, v)
    return v, at(v), reachable


def calibrate(search: Callable[[int], Sequence[Sequence[str]]], truth: Sequence[set[str]],
              lo: int, hi: int, target: float, *, source: str, exact_seconds: float = 0.0) -> tuple[int, dict]:
    """The smallest search parameter in ``[lo, hi]`` whose recall@k reaches ``target`` by the
    module's criterion, and its report (``IndexInfo.calibration``).

    ``search(value)``: the ids found, ``[m][k]``, for the calibration queries with the index
    set to ``value``; ``truth``: per query, the ids of its exact top k (k = ``len(truth[0])``).
    The report's ``curve`` lists ``[value, recall, lower bound]`` of every value measured.
    """
    t0 = time.perf_counter()
    k = len(truth[0])
    curve: list[list[float]] = []  # [value, recall, lower bound] of every value measured

    def measure(value: int) -> tuple[float, float]:
        found = search(value)
        hits = np.array([len(want.intersection(row)) / k for row, want in zip(found, truth)])
        spread = hits.std(ddof=1) / math.sqrt(len(hits)) if len(hits) > 1 else 0.0
        curve.append([value, round(float(hits.mean()), 4), round(float(hits.mean() - CONFIDENCE_Z * spread), 4)])
        return float(hits.mean()), float(hits.mean() - CONFIDENCE_Z * spread)

    value, (recall, bound), reachable = _smallest_setting(measure, lo, hi, target)
    return value, {"target_recall": target, "recall@k": round(recall, 4),
                   "lower_bound": round(bound, 4), "k": k, "queries": len(truth),
                   "source": source, "reachable": reachable, "curve": sorted(curve),
                   "seconds": round(exact_seconds + time.perf_counter() - t0, 3)}
