"""Auto mixing's component count per query form (issue #30) against a brute-force TrackStar."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from attribution_assets.engine.preconditioning.autocorrelation import (
    accumulate,
    row_autocorrelation,
)
from attribution_assets.engine.preconditioning.preconditioners import (
    FULL_TEXT_TOP_K,
    trackstar_preconditioner,
)
from attribution_assets.engine.scoring.scorer import score
from attribution_assets.spec import ScoringSpec, SpecValueError

SIZES = (600, 640)  # two modules, 1240 dims: more than the 1000 full-text components
LAYOUT = [("a", 0, SIZES[0]), ("b", SIZES[0], sum(SIZES))]


def brute_force(train: np.ndarray, query: np.ndarray, k: int, damping: float = 0.1):
    """``(lam, [q, n] scores)``: pooled spectra of the block-diagonal autocorrelations sorted
    descending, ``lam = s_t[k-1] / (s_q[k-1] + s_t[k-1])``, then per module the mixed matrix's
    damped ``M^{-1/2}`` from its eigendecomposition, and cosines of the transformed rows."""
    blocks = [slice(lo, hi) for _, lo, hi in LAYOUT]
    r_t = [train[:, b].T @ train[:, b] / len(train) for b in blocks]
    r_q = [query[:, b].T @ query[:, b] / len(query) for b in blocks]
    s_t = np.sort(np.concatenate([np.linalg.eigvalsh(m) for m in r_t]))[::-1]
    s_q = np.sort(np.concatenate([np.linalg.eigvalsh(m) for m in r_q]))[::-1]
    lam = s_t[k - 1] / (s_q[k - 1] + s_t[k - 1])
    xt, xq = np.zeros_like(train), np.zeros_like(query)
    for b, t, q in zip(blocks, r_t, r_q, strict=True):
        vals, vecs = np.linalg.eigh(lam * q + (1 - lam) * t)
        vals = np.clip(vals, 0, None)
        op = (vecs * (vals + damping * vals.mean()) ** -0.5) @ vecs.T
        xt[:, b], xq[:, b] = train[:, b] @ op, query[:, b] @ op
    xt /= np.linalg.norm(xt, axis=1, keepdims=True)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    return lam, xq @ xt.T


@pytest.fixture(scope="module")
def rows():
    rng = np.random.default_rng(0)
    scales = np.linspace(3.0, 0.1, sum(SIZES))  # a decaying spectrum, as gradients have
    train = rng.standard_normal((800, sum(SIZES))) * scales
    template = rng.standard_normal((8, sum(SIZES))) * 20  # a few strong query-only directions
    query = rng.standard_normal((700, sum(SIZES))) * scales + rng.standard_normal((700, 8)) @ template
    return train, query


@pytest.mark.parametrize("full_text, k", [(True, FULL_TEXT_TOP_K), (False, round(sum(SIZES) * 1000 / 65536))])
def test_auto_mixing_components_per_query_form_match_brute_force(rows, full_text, k):
    train, query = rows
    scoring = ScoringSpec()
    pre = trackstar_preconditioner(accumulate([train], LAYOUT), row_autocorrelation(query, LAYOUT), scoring,
                                   full_text=full_text)
    lam, expected = brute_force(train, query, k)
    assert pre.auto_top_k == k
    assert pre.lam == pytest.approx(lam, rel=1e-9)
    got = score(query[:20], train[:50], preconditioner=pre)
    np.testing.assert_allclose(got, expected[:20, :50], atol=2e-5)


def test_fixed_mixing_components_wins_over_the_query_form(rows):
    train, query = rows
    scoring = ScoringSpec(mixing_components=200)
    pre = trackstar_preconditioner(accumulate([train], LAYOUT), row_autocorrelation(query, LAYOUT), scoring,
                                   full_text=True)
    assert pre.auto_top_k == 200 and pre.lam == pytest.approx(brute_force(train, query, 200)[0], rel=1e-9)
    assert dataclasses.replace(scoring, mixing_components="auto").mixing_components == "auto"


@pytest.mark.parametrize("value", [0, -3, 2.5, "many", True])
def test_mixing_components_must_be_auto_or_a_positive_integer(value):
    with pytest.raises(SpecValueError, match=r"`mixing_components` must be an integer >= 1, or `auto`"):
        ScoringSpec(mixing_components=value)
