"""EK-FAC and K-FAC influence preconditioners (George et al. 2018, "Fast Approximate Natural
Gradient Descent in a Kronecker-factored Eigenbasis"; Grosse et al. 2023, "Studying Large
Language Model Generalization with Influence Functions"): the sums, eigenbases and
corrections (their files), and the preconditioner built from them. The passes over the data
that compute the sums are ``preconditioning.curvature``.

Conventions, per hooked module with weight gradient ``G [O, I]`` (``gradients.collector``:
input activations ``a [I]`` and output gradients ``g [O]`` per token, ``G = sum_t g_t a_tᵀ``):

- **Biases** (``gradients.include_bias``, a module with a bias), as in Kronfluence: the input
  gets a ones column, ``a <- [a; 1]`` ``[I + 1]``, so the bias gradient ``b = sum_t g_t`` is the
  last column of ``G <- [G | b]`` ``[O, I + 1]`` and shares the module's Kronecker block; below,
  ``I`` then stands for ``I + 1``. A bias-free module is unchanged.
- **Pseudo-gradients.** The loss is the summed NLL of a document's target tokens
  (``loss_mask``) with labels *sampled* from the model's own predictive distribution
  (``labels="sampled"``, the papers' choice: in expectation over the labels this Fisher is
  the Gauss-Newton matrix of the cross-entropy) or the document's own tokens
  (``labels="true"``, the empirical Fisher). Sampling is deterministic per document
  (``curvature.sample_labels``): batching never changes the labels. ``label_samples = K``
  draws K label sequences per document and averages over them everything that is quadratic
  in the pseudo-gradient (``S`` and EK-FAC's ``C``); ``A`` does not depend on the labels.
- **Factors: expectations over tokens.** Every non-padding token of every document (once
  per call of the module): ``A = (1/N_tok) sum_t a_t a_tᵀ`` ``[I, I]`` and
  ``S = (1/N_tok) sum_t g_t g_tᵀ`` ``[O, O]``. Stored as float64 sums and counts
  (:class:`CovarianceSums`), so shards merge by adding.
- **Curvature: expectation over sequences** (one example = one document, the
  influence-function convention): ``F = (1/N_seq) sum_n vec(G_n) vec(G_n)ᵀ``, ``vec``
  row-major (index ``o*I + i``). With ``A = Q_A diag(e_A) Q_Aᵀ`` and
  ``S = Q_S diag(e_S) Q_Sᵀ`` (:class:`KroneckerEigen`), K-FAC is ``F ≈ T (S ⊗ A)``,
  ``T = N_tok / N_seq`` (tokens per document; exact if tokens were independent), whose
  eigenvalues in the basis ``Q_S ⊗ Q_A`` are ``C = T outer(e_S, e_A)`` ``[O, I]``. EK-FAC keeps
  the basis and replaces them with ``C[o, i] = (1/N_seq) sum_n ((Q_Sᵀ G_n Q_A)[o, i])^2``,
  the diagonal of ``F`` in that basis, from a second pass over the data
  (:class:`CorrectionSums`).
- **Preconditioning** (:class:`KroneckerPreconditioner`), never an ``(O*I)^2`` matrix:
  ``(F + lam I)^{-1} vec(G) = vec(Q_S ((Q_Sᵀ G Q_A) / (C + lam)) Q_Aᵀ)`` with
  ``lam = damping * mean(C)`` per module (1.0 in place of an all-zero mean), the relative
  damping of TrackStar's ``preconditioners``. Scale-free: multiplying ``F`` by ``c``
  multiplies every score by ``1/c``.
- **Space.** ``full``: the above on ``[O, I]``; a query's full gradient is preconditioned,
  then projected (``L G' Rᵀ``, a bias ``L b'``) and scored against projected training rows. ``projected``
  (with a projection ``L [p, O]``, ``R [p, I]``): the same method for the model
  reparametrized as ``W = W_0 + Lᵀ Θ R``, whose gradient is exactly the projected row
  ``L G R^T`` ``[p, p]`` (as in LoGra): factors ``R A Rᵀ`` and ``L S Lᵀ`` (exact projections
  of the token covariances), corrections of ``L G_n Rᵀ``; queries are preconditioned after
  projection. A bias (``b = b_0 + Lᵀ β``) keeps its ones column unprojected: ``R`` becomes
  ``diag(R, 1)`` ``[p + 1, I + 1]``, so the block is ``[L G Rᵀ | L b]`` ``[p, p + 1]``, the
  stored row's weight and bias parts. Projecting a fully preconditioned query instead leaves
  the Johnson-Lindenstrauss cross-talk of the training rows' dominant (high-curvature)
  directions, which the damped inverse has removed from the query: measured in docs/ekfac.md.
- **Memory** per module: ``I^2 + O^2`` float64 for the factors and again for the full-space
  eigenvectors, ``O*I`` for EK-FAC's full-space ``C`` (``2 p^2`` and ``p^2`` when projected).

On disk (``kfac_files``): a directory (written atomically) with ``<kind>.safetensors`` (float64
arrays keyed ``<module>/<array>``) and ``<kind>.json`` (modules with their bias flags, counts,
label settings).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_assets.engine.gradients.projection import projection_matrix
from attribution_assets.engine.io.digests import chain_digest
from attribution_assets.engine.preconditioning.kfac_files import (
    check_same,
    condition_number,
    eigh_or_nan,
    finite_or_none,
    read_arrays,
    write_arrays,
)


@dataclass(frozen=True)
class KroneckerModule:
    """One hooked module: its weight gradient is ``[out_features, in_features]``; with ``bias``
    its Kronecker block is ``[G | b]``, ``[out_features, in_features + 1]``."""

    name: str
    out_features: int
    in_features: int
    bias: bool = False

    @property
    def columns(self) -> int:
        """Width of the block's input side: ``in_features`` (+ 1 for the ones column)."""
        return self.in_features + int(self.bias)

    def as_json(self) -> dict:
        return {"name": self.name, "out_features": self.out_features, "in_features": self.in_features,
                "bias": self.bias}


def _modules_from_json(items: Sequence[dict]) -> tuple[KroneckerModule, ...]:
    return tuple(KroneckerModule(str(m["name"]), int(m["out_features"]), int(m["in_features"]),
                                 bool(m.get("bias", False))) for m in items)


@dataclass
class CovarianceSums:
    """Per module float64 sums ``sum_t a_t a_tᵀ`` (``activation``, ``[I, I]``; ``[I + 1, I + 1]``
    with a bias's ones column) and ``sum_t g_t g_tᵀ`` (``gradient``, ``[O, O]``, the mean over
    ``label_samples`` label draws) over ``tokens[name]`` tokens of ``sequences`` documents.
    Shards merge by adding (:meth:`merge`)."""

    modules: tuple[KroneckerModule, ...]
    activation: dict[str, np.ndarray]
    gradient: dict[str, np.ndarray]
    tokens: dict[str, int]
    sequences: int
    labels: str
    seed: int
    label_samples: int = 1

    KIND = "covariance"

    @property
    def label_settings(self) -> tuple[str, int, int]:
        return self.labels, self.seed, self.label_samples

    def merge(self, other: CovarianceSums) -> CovarianceSums:
        """The sums of both (e.g. two shards); modules and label settings must agree."""
        fix = "compute every shard's covariance with the same model and settings"
        check_same(self.modules, other.modules, "covariance modules", fix)
        check_same(self.label_settings, other.label_settings, "label settings", fix)
        return CovarianceSums(
            self.modules, {k: v + other.activation[k] for k, v in self.activation.items()},
            {k: v + other.gradient[k] for k, v in self.gradient.items()},
            {k: v + other.tokens[k] for k, v in self.tokens.items()},
            self.sequences + other.sequences, *self.label_settings)

    def factors(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(A [I, I], S [O, O])`` (``A [I + 1, I + 1]`` with a bias): the token means, symmetrized."""
        n = self.tokens[name]
        if n == 0:
            raise ValueError(f"module {name!r}: no tokens were accumulated; add documents to the shards")
        a, s = self.activation[name], self.gradient[name]
        return (a + a.T) / (2.0 * n), (s + s.T) / (2.0 * n)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in (*self.activation.values(), *self.gradient.values()))

    def finite(self) -> dict[str, bool]:
        return {m.name: bool(np.isfinite(self.activation[m.name]).all()
                             and np.isfinite(self.gradient[m.name]).all()) for m in self.modules}

    def save(self, path: str | Path) -> Path:
        tensors = {f"{m.name}/{side}": getattr(self, side)[m.name]
                   for m in self.modules for side in ("activation", "gradient")}
        return write_arrays(path, self.KIND, tensors, {
            "modules": [m.as_json() for m in self.modules], "tokens": self.tokens,
            "sequences": self.sequences, "labels": self.labels, "seed": self.seed,
            "label_samples": self.label_samples})

    @classmethod
    def load(cls, path: str | Path) -> CovarianceSums:
        tensors, meta = read_arrays(path, cls.KIND)
        modules = _modules_from_json(meta["modules"])
        return cls(modules, {m.name: tensors[f"{m.name}/activation"] for m in modules},
                   {m.name: tensors[f"{m.name}/gradient"] for m in modules},
                   {k: int(v) for k, v in meta["tokens"].items()}, int(meta["sequences"]),
                   meta["labels"], int(meta["seed"]), int(meta.get("label_samples", 1)))


def merge_all(parts: Iterable[Any], what: str) -> Any:
    """``parts[0].merge(parts[1]).merge(...)``; raises if there is none."""
    total = None
    for part in parts:
        total = part if total is None else total.merge(part)
    if total is None:
        raise ValueError(f"no {what} to merge: materialize the corpus and its shards first")
    return total


def _projections(projection: dict, m: KroneckerModule) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(L [p, O], R [p, I])`` of module ``m``, the gradient collector's matrices; with a
    bias ``R`` is ``diag(R, 1)`` ``[p + 1, I + 1]`` (the ones column stays unprojected)."""
    p, kind, seed = projection["dim"], projection["kind"], projection["seed"]
    left, right = (projection_matrix(seed, m.name, side, p, n, kind).double().numpy()
                   for side, n in (("out", m.out_features), ("in", m.in_features)))
    if m.bias:
        right = np.block([[right, np.zeros((p, 1))], [np.zeros((1, m.in_features)), np.ones((1, 1))]])
    return left, right


@dataclass
class KroneckerEigen:
    """Eigendecomposition of each module's ``A`` and ``S`` (float64, ascending eigenvalues,
    eigenvectors in columns) and its tokens per document ``T``; with a ``projection``
    (``{dim, kind, seed}``) of the projected factors ``R A Rᵀ`` and ``L S Lᵀ`` (``[p, p]``; ``R A Rᵀ``
    ``[p + 1, p + 1]`` with a bias)."""

    modules: tuple[KroneckerModule, ...]
    activation_values: dict[str, np.ndarray]
    activation_vectors: dict[str, np.ndarray]
    gradient_values: dict[str, np.ndarray]
    gradient_vectors: dict[str, np.ndarray]
    tokens_per_sequence: dict[str, float]
    sequences: int
    labels: str
    seed: int
    projection: dict | None = None
    label_samples: int = 1

    KIND = "eigendecomposition"
    _ARRAYS = ("activation_values", "activation_vectors", "gradient_values", "gradient_vectors")

    @classmethod
    def from_covariance(cls, covariance: CovarianceSums, projection: dict | None = None) -> KroneckerEigen:
        """Eigendecompose ``A`` and ``S`` (``projection``: of ``R A Rᵀ`` and ``L S Lᵀ``)."""
        if covariance.sequences == 0:
            raise ValueError("the covariance holds no documents; materialize kfac_covariance for the shards")
        parts: dict[str, dict[str, np.ndarray]] = {k: {} for k in cls._ARRAYS}
        for m in covariance.modules:
            a, s = covariance.factors(m.name)
            if projection is not None:
                left, right = _projections(projection, m)
                a, s = right @ a @ right.T, left @ s @ left.T
            parts["activation_values"][m.name], parts["activation_vectors"][m.name] = eigh_or_nan(a)
            parts["gradient_values"][m.name], parts["gradient_vectors"][m.name] = eigh_or_nan(s)
        per_seq = {m.name: covariance.tokens[m.name] / covariance.sequences for m in covariance.modules}
        return cls(covariance.modules, **parts, tokens_per_sequence=per_seq, sequences=covariance.sequences,
                   labels=covariance.labels, seed=covariance.seed, projection=projection,
                   label_samples=covariance.label_samples)

    @property
    def label_settings(self) -> tuple[str, int, int]:
        return self.labels, self.seed, self.label_samples

    def bases(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(B_A [I, k_A], B_S [O, k_S])`` with ``Q_Sᵀ G Q_A = B_Sᵀ G B_A`` for a full gradient
        ``G`` (``[G | b]``, ``B_A [I + 1, k_A]`` with a bias): the eigenvectors, or ``Rᵀ Q_A``
        and ``Lᵀ Q_S`` in the projected space."""
        q_a, q_s = self.activation_vectors[name], self.gradient_vectors[name]
        if self.projection is None:
            return q_a, q_s
        left, right = _projections(self.projection, next(m for m in self.modules if m.name == name))
        return right.T @ q_a, left.T @ q_s

    def digest(self) -> str:
        """Content hash of the eigenbases (what an eigenvalue correction was computed in)."""
        arrays = (np.ascontiguousarray(getattr(self, k)[m.name]).tobytes() for m in self.modules
                  for k in self._ARRAYS)  # one array's bytes at a time
        return chain_digest(chain([json.dumps(self.projection, sort_keys=True)], arrays))

    def kfac_curvature(self, name: str) -> np.ndarray:
        """K-FAC's eigenvalues ``T outer(e_S, e_A)`` ``[O, I]`` (tiny negatives clamped to 0)."""
        e_s = np.clip(self.gradient_values[name], 0.0, None)
        e_a = np.clip(self.activation_values[name], 0.0, None)
        return self.tokens_per_sequence[name] * np.outer(e_s, e_a)

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, k)[m.name].nbytes for m in self.modules for k in self._ARRAYS)

    def report(self) -> dict[str, dict[str, Any]]:
        """Per module: finite, smallest eigenvalue and condition number of ``A`` and ``S``."""
        out = {}
        for m in self.modules:
            arrays = [getattr(self, k)[m.name] for k in self._ARRAYS]
            out[m.name] = {
                "finite": bool(all(np.isfinite(x).all() for x in arrays)),
                "min_eigenvalue_A": finite_or_none(self.activation_values[m.name].min()),
                "min_eigenvalue_S": finite_or_none(self.gradient_values[m.name].min()),
                "condition_A": condition_number(self.activation_values[m.name]),
                "condition_S": condition_number(self.gradient_values[m.name]),
            }
        return out

    def save(self, path: str | Path) -> Path:
        tensors = {f"{m.name}/{k}": getattr(self, k)[m.name] for m in self.modules for k in self._ARRAYS}
        return write_arrays(path, self.KIND, tensors, {
            "modules": [m.as_json() for m in self.modules], "tokens_per_sequence": self.tokens_per_sequence,
            "sequences": self.sequences, "labels": self.labels, "seed": self.seed,
            "projection": self.projection, "label_samples": self.label_samples})

    @classmethod
    def load(cls, path: str | Path) -> KroneckerEigen:
        tensors, meta = read_arrays(path, cls.KIND)
        modules = _modules_from_json(meta["modules"])
        parts = {k: {m.name: tensors[f"{m.name}/{k}"] for m in modules} for k in cls._ARRAYS}
        return cls(modules, **parts, tokens_per_sequence={k: float(v) for k, v in
                                                          meta["tokens_per_sequence"].items()},
                   sequences=int(meta["sequences"]), labels=meta["labels"], seed=int(meta["seed"]),
                   projection=meta["projection"], label_samples=int(meta.get("label_samples", 1)))


@dataclass
class CorrectionSums:
    """EK-FAC's eigenvalue-correction sums ``sum_n ((Q_Sᵀ G_n Q_A)[o, i])^2`` per module over
    ``sequences`` documents (each the mean over the label draws; ``[O, I]``, ``[p, p]`` of
    ``L G_n Rᵀ`` when projected, one more column with a bias), in the
    eigenbasis whose :meth:`KroneckerEigen.digest` is ``eigen_digest``. Shards in the same
    basis merge by adding."""

    modules: tuple[KroneckerModule, ...]
    squares: dict[str, np.ndarray]
    sequences: int
    eigen_digest: str

    KIND = "correction"

    def merge(self, other: CorrectionSums) -> CorrectionSums:
        fix = "re-materialize ekfac_correction for every shard after kfac_eigendecomposition"
        check_same(self.modules, other.modules, "correction modules", fix)
        check_same(self.eigen_digest, other.eigen_digest, "the eigenbases of the corrections", fix)
        return CorrectionSums(self.modules, {k: v + other.squares[k] for k, v in self.squares.items()},
                              self.sequences + other.sequences, self.eigen_digest)

    def curvature(self, name: str) -> np.ndarray:
        """EK-FAC's eigenvalues ``[O, I]``: the mean over documents."""
        if self.sequences == 0:
            raise ValueError("the eigenvalue correction holds no documents")
        return self.squares[name] / self.sequences

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.squares.values())

    def finite(self) -> dict[str, bool]:
        return {m.name: bool(np.isfinite(self.squares[m.name]).all()) for m in self.modules}

    def save(self, path: str | Path) -> Path:
        return write_arrays(path, self.KIND, {f"{m.name}/squares": self.squares[m.name] for m in self.modules},
                      {"modules": [m.as_json() for m in self.modules], "sequences": self.sequences,
                       "eigen_digest": self.eigen_digest})

    @classmethod
    def load(cls, path: str | Path) -> CorrectionSums:
        tensors, meta = read_arrays(path, cls.KIND)
        modules = _modules_from_json(meta["modules"])
        return cls(modules, {m.name: tensors[f"{m.name}/squares"] for m in modules},
                   int(meta["sequences"]), meta["eigen_digest"])


class KroneckerPreconditioner:
    """Damped inverse of EK-FAC (``correction`` given) or K-FAC (``correction=None``) per
    module (module docstring): the ``transform`` of a ``GradientCollector``, applied to full
    weight gradients (and biases) before projection, or (``projected``) to the projected ``[p, p]``
    blocks (and ``L b``), so query rows come out preconditioned and projected."""

    def __init__(self, eigen: KroneckerEigen, correction: CorrectionSums | None = None,
                 damping: float = 0.1):
        if not np.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        if correction is not None:
            check_same(correction.modules, eigen.modules, "modules of the correction and eigendecomposition",
                        "re-materialize ekfac_correction and ekfac_eigenvalues")
            if correction.eigen_digest != eigen.digest():
                raise ValueError("the eigenvalue correction was computed in another eigenbasis than the "
                                 "current eigendecomposition: re-materialize ekfac_correction (every shard) "
                                 "and ekfac_eigenvalues")
        self.eigen, self.damping = eigen, float(damping)
        self.kind = "kfac" if correction is None else "ekfac"
        self.projection = eigen.projection
        self.modules = {m.name: m for m in eigen.modules}
        self.curvature = {m.name: eigen.kfac_curvature(m.name) if correction is None
                          else correction.curvature(m.name) for m in eigen.modules}
        self._cache: dict[tuple[str, str, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def shift(self, name: str) -> float:
        """``damping * mean(C)`` of one module (mean 1.0 for an all-zero C)."""
        mean = float(self.curvature[name].mean())
        return self.damping * (mean if mean > 0 else 1.0)

    @property
    def projected(self) -> bool:
        return self.projection is not None

    def check_modules(self, modules: Sequence[tuple[str, int, int, bool]], projection: dict | None = None) -> None:
        """Raise naming the first module whose ``(name, O, I, has_bias)`` is not the factors', or
        when projected factors meet another ``projection`` (``Projector.settings()``)."""
        if self.projected and projection != self.projection:
            raise ValueError(f"the {self.kind} factors live in the projection {self.projection} but the "
                             f"gradient collector projects with {projection}; re-materialize "
                             "kfac_eigendecomposition (and the eigenvalue correction) after changing it")
        got = [(str(n), int(o), int(i), bool(b)) for n, o, i, b in modules]
        have = [(m.name, m.out_features, m.in_features, m.bias) for m in self.modules.values()]
        for ours, theirs in zip_longest(have, got):
            if ours != theirs:
                raise ValueError(f"the {self.kind} factors do not match the gradient collector's modules: "
                                 f"factors have {ours}, the collector has {theirs} (name, out, in, bias); "
                                 "compute the factors with the same model and gradients.include / exclude / "
                                 "include_bias")

    def _tensors(self, name: str, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        key = (name, str(device), dtype)
        if key not in self._cache:
            inverse = 1.0 / (self.curvature[name] + self.shift(name))
            self._cache[key] = tuple(torch.from_numpy(np.ascontiguousarray(x)).to(device=device, dtype=dtype)
                                     for x in (self.eigen.gradient_vectors[name],
                                               self.eigen.activation_vectors[name], inverse))
        return self._cache[key]

    def apply_full(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``Q_S ((Q_Sᵀ G Q_A) / (C + lam)) Q_Aᵀ`` for ``G [..., O, I]`` (``[..., p, p]`` projected
        blocks when ``projected``; one more column, the bias, for a module with a bias), same
        device and dtype."""
        q_s, q_a, inverse = self._tensors(name, grad.device, grad.dtype)
        return q_s @ ((q_s.T @ grad @ q_a) * inverse) @ q_a.T

    def apply(self, name: str, grad: torch.Tensor,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(G', b')``: :meth:`apply_full` of ``[G | b]`` split into its weight part ``[..., O, I]``
        and bias ``[..., O]`` (projected: ``L G Rᵀ`` ``[..., p, p]`` and ``L b`` ``[..., p]``); ``b``
        is given exactly for the modules whose factors have a bias, ``b'`` is None without."""
        if (bias is not None) != self.modules[name].bias:
            raise ValueError(f"module {name!r}: the {self.kind} factors were computed "
                             f"{'with' if self.modules[name].bias else 'without'} its bias but the gradient "
                             f"{'has none' if bias is None else 'has one'}; use the same gradients.include_bias")
        if bias is None:
            return self.apply_full(name, grad), None
        out = self.apply_full(name, torch.cat([grad, bias.unsqueeze(-1)], dim=-1))
        return out[..., :-1], out[..., -1]

    @property
    def nbytes(self) -> int:
        return self.eigen.nbytes + sum(c.nbytes for c in self.curvature.values())

    def report(self) -> dict[str, Any]:
        """Per module: finite, smallest curvature eigenvalue, smallest after damping (``positive``
        when > 0), condition number after damping; ``ok`` when every module passes."""
        modules = {}
        for name, c in self.curvature.items():
            if not np.isfinite(c).all():
                modules[name] = {"finite": False, "min_eigenvalue": None, "min_damped_eigenvalue": None,
                                 "positive": False, "damped_condition": None}
                continue
            lam, low = self.shift(name), float(c.min())
            modules[name] = {
                "finite": True, "min_eigenvalue": low, "min_damped_eigenvalue": low + lam,
                "positive": bool(low + lam > 0),
                "damped_condition": float((c.max() + lam) / (low + lam)) if low + lam > 0 else None,
            }
        return {"ok": all(v["finite"] and v["positive"] for v in modules.values()), "modules": modules}
