"""Projection matrices: determinism across processes and unbiased inner products."""

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from attribution_assets.engine.gradients.projection import Projector, projection_matrix
from attribution_assets.engine.io.digests import stable_seed


def _digest(kind: str) -> str:
    mat = projection_matrix(7, "gpt_neox.layers.0.mlp.dense_h_to_4h", "in", 8, 33, kind)
    return hashlib.sha256(mat.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_identical_across_processes(kind):
    code = (
        "import hashlib; from attribution_assets.engine.gradients.projection import projection_matrix as f;"
        f"m = f(7, 'gpt_neox.layers.0.mlp.dense_h_to_4h', 'in', 8, 33, {kind!r});"
        "print(hashlib.sha256(m.numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert other.stdout.strip() == _digest(kind)


def test_entries_and_independence():
    rad = projection_matrix(0, "m", "out", 16, 50)
    assert rad.dtype == torch.float32 and rad.shape == (16, 50)
    assert set(np.unique(rad.numpy() * 4).tolist()) == {-1.0, 1.0}
    assert not torch.equal(rad, projection_matrix(0, "m", "in", 16, 50))
    assert not torch.equal(rad, projection_matrix(1, "m", "out", 16, 50))
    assert not torch.equal(rad, projection_matrix(0, "m2", "out", 16, 50))
    assert torch.equal(rad, projection_matrix(0, "m", "out", 16, 50))
    gauss = projection_matrix(0, "m", "out", 64, 400, "gaussian")
    assert abs(float((gauss * 8).var()) - 1.0) < 0.05
    assert stable_seed("a", 1) == stable_seed("a", 1) != stable_seed("a", 2)


def test_project_matches_formula_and_dim_zero():
    grad = torch.randn(3, 6, 5)
    proj = Projector(4, seed=3)
    left, right = proj.matrices("x", 6, 5)
    assert torch.allclose(proj.project("x", grad), left @ grad @ right.T)
    assert Projector(0).project("x", grad) is grad
    with pytest.raises(ValueError, match="projection kind"):
        Projector(4, kind="sparse")


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_inner_products_unbiased(kind):
    """E<PX, PY> = <X, Y>. With N seeds the mean's standard error is std/sqrt(N);
    we require |mean - <X,Y>| < 5 standard errors (false-failure odds < 1e-6)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    y = x + 0.5 * torch.randn(6, 5, generator=gen, dtype=torch.float64)
    samples = []
    for seed in range(1500):
        proj = Projector(3, kind=kind, seed=seed, dtype=torch.float64)
        samples.append(float((proj.project("m", x) * proj.project("m", y)).sum()))
    samples = np.array(samples)
    stderr = samples.std(ddof=1) / np.sqrt(len(samples))
    assert abs(samples.mean() - float((x * y).sum())) < 5 * stderr
