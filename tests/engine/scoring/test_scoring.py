"""Scoring engine vs brute-force NumPy (explicit block-diagonal matrices, float64)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from attribution_assets.engine.preconditioning.autocorrelation import AutocorrelationAccumulator
from attribution_assets.engine.preconditioning.preconditioners import Preconditioner
from attribution_assets.engine.scoring.scorer import prepare_queries, score, score_prepared, top_k

LAYOUT = [("a", 0, 4), ("b", 4, 10)]
DIMS = 10


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(37, DIMS)).astype(np.float32)
    query = rng.normal(size=(5, DIMS)).astype(np.float32)
    r_train = AutocorrelationAccumulator(LAYOUT).update(train).finalize()
    r_query = AutocorrelationAccumulator(LAYOUT).update(query).finalize()
    p = Preconditioner.from_autocorrelation(r_train, r_query, lam=0.4, damping=0.2)
    return train, query, p


def explicit_ops(p: Preconditioner | None) -> tuple[np.ndarray, np.ndarray]:
    """Full [d, d] P^{-1/2} and P^{-1} via scipy (block_diag, sqrtm, inv; no eigh)."""
    if p is None:
        return np.eye(DIMS), np.eye(DIMS)
    halves, invs = [], []
    for m in p.layout:
        r = p.matrices[m.name]
        damped = r + p.damping * np.trace(r) / len(r) * np.eye(len(r))
        halves.append(np.linalg.inv(scipy.linalg.sqrtm(damped).real))
        invs.append(np.linalg.inv(damped))
    return scipy.linalg.block_diag(*halves), scipy.linalg.block_diag(*invs)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(query, train, p, metric, aggregate):
    half, inv = explicit_ops(p)
    q, t = query.astype(np.float64), train.astype(np.float64)
    if metric == "cosine":
        qv, tv = unit(q @ half), unit(t @ half)
    else:
        qv, tv = q @ inv, t
        if aggregate in ("mean", "sum"):
            qv = unit(qv)
    if aggregate == "mean":
        qv = qv.mean(axis=0, keepdims=True)
    elif aggregate == "sum":
        qv = qv.sum(axis=0, keepdims=True)
    s = qv @ tv.T
    return s.max(axis=0, keepdims=True) if aggregate == "nearest" else s


@pytest.mark.parametrize("use_p", [True, False])
@pytest.mark.parametrize("aggregate", ["individual", "nearest", "mean", "sum"])
@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
def test_score_equals_brute_force(data, metric, aggregate, use_p):
    train, query, p = data
    p = p if use_p else None
    got = score(query, train, preconditioner=p, metric=metric, aggregate=aggregate, chunk_rows=8)
    expected = brute_force(query, train, p, metric, aggregate)
    assert got.dtype == np.float32
    assert got.shape == ((5 if aggregate == "individual" else 1), 37)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_streaming_blocks_equal_one_call(data, tmp_path):
    train, query, p = data
    np.save(tmp_path / "shard.npy", train)
    shard = np.load(tmp_path / "shard.npy", mmap_mode="r")
    for metric in ("cosine", "inner_product"):
        prepared = prepare_queries(query, p, metric, "nearest")
        blocks = [
            score_prepared(prepared, shard[a:b], p, metric, aggregate="nearest", chunk_rows=3)
            for a, b in [(0, 10), (10, 10), (10, 37)]
        ]
        full = score(query, train, preconditioner=p, metric=metric, aggregate="nearest")
        np.testing.assert_allclose(np.concatenate(blocks, axis=1), full, rtol=1e-6, atol=1e-6)


def test_preconditioning_applied_exactly_once():
    # R = diag(4, 1, 0.25), no damping: P^{-1} = diag(1/4, 1, 4), P^{-1/2} = diag(1/2, 1, 2).
    p = Preconditioner([("m", 0, 3)], {"m": np.diag([4.0, 1.0, 0.25])}, damping=0.0)
    g_q = np.array([[1.0, 1.0, 1.0]], dtype=np.float32)
    g_t = np.array([[2.0, 1.0, 1.0]], dtype=np.float32)
    ip = score(g_q, g_t, preconditioner=p, metric="inner_product")
    assert ip[0, 0] == pytest.approx(2.0 / 4 + 1.0 + 4.0, rel=1e-6)  # 5.5
    cos = score(g_q, g_t, preconditioner=p, metric="cosine")
    # a = [0.5, 1, 2], b = [1, 1, 2]
    assert cos[0, 0] == pytest.approx(5.5 / (np.sqrt(5.25) * np.sqrt(6.0)), rel=1e-6)


def test_mean_and_sum_of_unit_vectors_equal_mean_and_sum_of_cosines(data):
    train, query, p = data
    individual = score(query, train, preconditioner=p)
    mean = score(query, train, preconditioner=p, aggregate="mean")
    total = score(query, train, preconditioner=p, aggregate="sum")
    np.testing.assert_allclose(mean[0], individual.mean(axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(total[0], individual.sum(axis=0), rtol=1e-5, atol=1e-6)
    nearest = score(query, train, preconditioner=p, aggregate="nearest")
    np.testing.assert_array_equal(nearest[0], individual.max(axis=0))


def test_per_token_scores(data):
    _, query, p = data
    rng = np.random.default_rng(1)
    tokens = rng.normal(size=(12, DIMS)).astype(np.float32)
    doc_of_token = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 3, 3])
    docs = np.stack([tokens[doc_of_token == d].sum(axis=0) for d in range(4)])
    per_token = score(query, tokens, preconditioner=p, metric="inner_product")
    per_doc = score(query, docs, preconditioner=p, metric="inner_product")
    summed = np.stack([per_token[:, doc_of_token == d].sum(axis=1) for d in range(4)], axis=1)
    np.testing.assert_allclose(summed, per_doc, rtol=1e-4, atol=1e-4)
    # Cosine: every token row is normalized on its own.
    cos_tokens = score(query, tokens, preconditioner=p)
    for i in (0, 7):
        alone = score(query, tokens[i : i + 1], preconditioner=p)
        np.testing.assert_allclose(cos_tokens[:, i : i + 1], alone, rtol=1e-5, atol=1e-6)


def test_sign_convention_and_zero_rows(data):
    _, query, p = data
    g = query[:1]
    train = np.concatenate([g, -g, np.zeros_like(g), 2 * g]).astype(np.float32)
    cos = score(g, train, preconditioner=p)[0]
    np.testing.assert_allclose(cos, [1.0, -1.0, 0.0, 1.0], atol=1e-5)
    ip = score(g, train, preconditioner=p, metric="inner_product")[0]
    assert ip[3] == pytest.approx(2 * ip[0], rel=1e-5) and ip[0] > 0 > ip[1]
    assert top_k(ip[None], 1)[0][0, 0] == 3


def test_inner_product_unit_normalize_scales_query_only(data):
    train, query, p = data
    raw = score(query, train, preconditioner=p, metric="inner_product")
    normed = score(query, train, preconditioner=p, metric="inner_product", unit_normalize=True)
    norms = np.linalg.norm(p.apply(query, -1.0).astype(np.float64), axis=1, keepdims=True)
    np.testing.assert_allclose(normed, raw / norms, rtol=1e-4, atol=1e-6)


def test_top_k_is_descending_with_stable_ties():
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0, np.nan], [0.0, 0.0, 0.0, 0.0, 5.0, -1.0]])
    idx, val = top_k(scores, 3)
    np.testing.assert_array_equal(idx, [[1, 2, 4], [4, 0, 1]])
    np.testing.assert_array_equal(val, [[3.0, 3.0, 3.0], [5.0, 0.0, 0.0]])
    idx, _ = top_k(scores, 10)
    np.testing.assert_array_equal(idx, [[1, 2, 4, 3, 0, 5], [4, 0, 1, 2, 3, 5]])
    assert top_k(scores, 0)[0].shape == (2, 0)
    rng = np.random.default_rng(2)
    many = rng.integers(0, 5, size=(3, 200)).astype(np.float32)
    for k in (1, 7, 50, 199):
        idx, val = top_k(many, k)
        expected = np.argsort(-many, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(idx, expected)
        np.testing.assert_array_equal(val, np.take_along_axis(many, expected, axis=1))


def test_clear_errors(data):
    train, query, p = data
    with pytest.raises(ValueError, match=r"query has shape \(5, 9\).*10 columns"):
        score(query[:, :9], train, preconditioner=p)
    with pytest.raises(ValueError, match=r"training block has shape \(37, 9\).*10 columns"):
        score(query, train[:, :9])
    with pytest.raises(ValueError, match="cosine always unit-normalizes"):
        score(query, train, unit_normalize=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        score(query, train, metric="dot")
    with pytest.raises(ValueError, match="aggregate must be one of"):
        score(query, train, aggregate="max")
    with pytest.raises(ValueError, match="no rows"):
        score(query[:0], train)
    assert score(query, train[:0], preconditioner=p).shape == (5, 0)
