"""Deterministic random projections for per-module gradient compression.

Convention (see DESIGN.md "Math conventions"): a module's per-example weight
gradient ``G`` is an ``[O, I]`` matrix (outputs x inputs). It is compressed to
``P(G) = L G R^T`` with ``L: [p, O]`` and ``R: [p, I]``, flattened row-major as
``[p_out, p_in]``. Entries are Rademacher (``+-1/sqrt(p)``) or Gaussian
(``N(0, 1)/sqrt(p)``), so ``E[<P(X), P(Y)>] = <X, Y>`` (Frobenius).

Matrices are generated on the CPU in float32 by a ``torch.Generator`` seeded
from a SHA-256 hash of ``(seed, module name, side)``; they are identical in
every process and on every machine, then moved to the requested device.
"""

from __future__ import annotations

import math

import torch

from attribution_assets.engine.io.digests import stable_seed

PROJECTION_KINDS = ("rademacher", "gaussian")


def projection_matrix(
    seed: int,
    module_name: str,
    side: str,
    p: int,
    n: int,
    kind: str = "rademacher",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[p, n]`` projection for one side (``"out"`` -> L, ``"in"`` -> R) of a module."""
    if kind not in PROJECTION_KINDS:
        raise ValueError(f"projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")
    if side not in ("out", "in"):
        raise ValueError(f"side must be 'out' or 'in', got {side!r}")
    if p <= 0 or n <= 0:
        raise ValueError(f"projection shape must be positive, got p={p}, n={n}")
    gen = torch.Generator(device="cpu")
    gen.manual_seed(stable_seed(seed, module_name, side, kind))
    if kind == "rademacher":
        mat = torch.randint(0, 2, (p, n), generator=gen, dtype=torch.int8).to(torch.float32)
        mat = mat.mul_(2.0).sub_(1.0)
    else:
        mat = torch.randn((p, n), generator=gen, dtype=torch.float32)
    mat.div_(math.sqrt(p))
    return mat.to(device=device, dtype=dtype)


class Projector:
    """Caches ``L`` and ``R`` matrices for a fixed ``(dim, kind, seed)``.

    ``dim == 0`` means no compression: :meth:`project` returns ``G`` unchanged.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "rademacher",
        seed: int = 0,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        if dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {dim}")
        if kind not in PROJECTION_KINDS:
            raise ValueError(f"projection kind must be one of {PROJECTION_KINDS}, got {kind!r}")
        self.dim, self.kind, self.seed = dim, kind, seed
        self.device, self.dtype = torch.device(device), dtype
        self._cache: dict[tuple[str, str, int], torch.Tensor] = {}

    def _matrix(self, name: str, side: str, n: int) -> torch.Tensor:
        key = (name, side, n)
        if key not in self._cache:
            self._cache[key] = projection_matrix(
                self.seed, name, side, self.dim, n, self.kind, self.device, self.dtype
            )
        return self._cache[key]

    def left(self, name: str, n: int) -> torch.Tensor:
        """``L [p, n]`` seeded by ``name`` (the output side)."""
        return self._matrix(name, "out", n)

    def right(self, name: str, n: int) -> torch.Tensor:
        """``R [p, n]`` seeded by ``name`` (the input side)."""
        return self._matrix(name, "in", n)

    def matrices(self, name: str, out_features: int, in_features: int):
        """``(L [p, O], R [p, I])`` for module ``name``."""
        return self.left(name, out_features), self.right(name, in_features)

    def project(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``L G R^T`` for full gradients ``G [..., O, I]`` -> ``[..., p, p]``."""
        if self.dim == 0:
            return grad
        left, right = self.matrices(name, grad.shape[-2], grad.shape[-1])
        return left @ grad @ right.T

    def settings(self) -> dict:
        """JSON-ready description stored in ``info.json["projection"]``."""
        return {"dim": self.dim, "kind": self.kind, "seed": self.seed}
