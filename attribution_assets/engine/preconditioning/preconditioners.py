"""TrackStar autocorrelation preconditioners (Chang et al. 2024, arXiv:2410.17413).

Conventions (shapes are ``[rows, dims]``; columns split into per-module blocks by a
*layout*: a list of ``(name, start, stop)`` tuples or ``{"name", "start", "stop"}``
dicts, contiguous, in order, covering ``[0, dims)``):

- Autocorrelation, per module ``m``: ``R_m = (1/n) sum_i g_i g_iᵀ`` over the
  module's columns of ``n`` (normalized, projected) gradient rows, float64. The
  preconditioner is block-diagonal: one ``R_m`` per module, no cross-module terms.
- TrackStar mixing (paper Sec. 3): ``R = lam * R_query + (1 - lam) * R_train``.
- Damping: eigenvalues ``l_i`` of ``R_m`` (``numpy.linalg.eigh``, float64, tiny
  negatives clamped to 0) become ``l_i + c * mean(l)`` with ``c = damping``
  (default 0.1, Bergson's ``damped_psd_power`` factor), relative to the module's own
  mean eigenvalue ``trace(R_m)/d_m`` so it is scale-free; an all-zero ``R_m`` uses
  ``mean(l) := 1`` (identity operator).
- ``apply(x, power)``: ``x_m @ V diag((l + c*mean(l))**power) Vᵀ`` per module;
  ``power=-0.5`` gives ``R^{-1/2}`` (both sides, cosine scores), ``power=-1`` gives
  ``R^{-1}`` (query side only, inner-product scores). Output float32.
- Memory (``d_m x d_m`` float64 blocks, 128 MiB each at ``p = 64``): the mixed ``R`` is
  computed per module when asked for (never stored), eigendecompositions run one module
  at a time, a loaded preconditioner reads ``R`` and ``V`` from disk per module, and only
  the float32 operators of a power in use stay in memory.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.tensors import StoredTensors, write_safetensors
from attribution_assets.engine.preconditioning.autocorrelation import (
    Autocorrelation,
    _check_square,
    check_columns,
    check_same_layout,
    matrix_shape,
    normalize_layout,
)
from attribution_assets.spec import ScoringSpec

DEFAULT_DAMPING = 0.1
# TrackStar (Appendix A.1.3) downweights ~1000 of 2^16 = 65536 projected dimensions.
PAPER_TOP_K, PAPER_DIMS = 1000, 65536
# Components that auto mixing downweights for full-text queries (loss on every token): the
# paper's absolute count, Bergson's ``target_downweight_components``, whatever the dims.
FULL_TEXT_TOP_K = PAPER_TOP_K
FORMAT = "attribution-assets/preconditioner"
FORMAT_VERSION = 1
TENSORS_FILE, SETTINGS_FILE = "preconditioner.safetensors", "preconditioner.json"
SYMMETRY_RTOL = 1e-8
_SETTINGS = ("lam", "auto_top_k", "damping", "n_train", "n_query")
CHUNK_BYTES = 64 << 20  # float32 rows preconditioned at once by ``apply``


def auto_mixing_lambda(
    train: Autocorrelation, query: Autocorrelation, top_k: int | None = None
) -> tuple[float, int]:
    """TrackStar's mixing weight: ``lam = s_train[k] / (s_query[k] + s_train[k])``.

    Source: Chang et al. 2024, Sec. 3 (task-specific Hessian approximation) and
    Appendix A.1.3: lam is chosen so that the sorted eigenvalue (= singular value,
    R is PSD) curves of ``lam * R_query`` and ``(1 - lam) * R_train`` cross at the
    k-th component, i.e. the top ~k query-specific directions (task template)
    dominate and get downweighted. The paper used k ~ 1000 of 2^16 projected
    dims (lam ~ 0.90 for T-REx queries, ~0.99 for C4 queries). Rule and numbers as
    implemented/cited by EleutherAI Bergson (``bergson.utils.math.compute_lambda``).
    Both spectra are pooled over all modules (= the spectrum of the block-diagonal
    R), as Bergson does; the paper's text was not available offline to check this.

    ``top_k=None`` scales the paper's ratio: ``k = max(1, round(dims * 1000/65536))``.
    k is capped at the numerical rank of either spectrum (few queries give a
    low-rank ``R_query``). Returns ``(lam, k)``; ``s[k]`` is 1-based k-th largest.
    """
    check_same_layout(train.layout, query.layout, "train vs query autocorrelation")
    dims = train.layout[-1].stop
    k = max(1, round(dims * PAPER_TOP_K / PAPER_DIMS)) if top_k is None else int(top_k)
    if k < 1:
        raise ValueError(f"auto lambda needs top_k >= 1, got {top_k}")
    s_train, s_query = train.spectrum(), query.spectrum()
    ranks = [int((s > s[0] * dims * np.finfo(np.float64).eps).sum()) for s in (s_train, s_query)]
    if min(ranks) == 0:
        raise ValueError("auto lambda: the train or query autocorrelation is all zero")
    k = min(k, *ranks)
    lam = s_train[k - 1] / (s_query[k - 1] + s_train[k - 1])
    return float(np.clip(lam, 0.0, 1.0)), k


def as_float32_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor on ``device``; read-only inputs (memory maps) are copied."""
    arr = np.ascontiguousarray(x, dtype=np.float32)
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(device)


def _eigh(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 eigendecomposition (C-ordered vectors); NaNs for non-finite input."""
    if np.isfinite(matrix).all():
        vals, vecs = np.linalg.eigh(matrix)
        return vals, np.ascontiguousarray(vecs)
    return np.full(matrix.shape[0], np.nan), np.full(matrix.shape, np.nan)


class MixedMatrices(Mapping[str, np.ndarray]):
    """``lam * query[name] + (1 - lam) * train[name]`` computed when asked for (never stored)."""

    def __init__(self, train: Mapping[str, np.ndarray], query: Mapping[str, np.ndarray], lam: float):
        self.train, self.query, self.lam = train, query, float(lam)

    def shape(self, name: str) -> tuple[int, ...]:
        return matrix_shape(self.train, name)

    def __getitem__(self, name: str) -> np.ndarray:
        mixed = self.lam * np.asarray(self.query[name], dtype=np.float64)
        mixed += (1.0 - self.lam) * np.asarray(self.train[name], dtype=np.float64)
        return mixed

    def __iter__(self) -> Iterator[str]:
        return iter(self.train)

    def __len__(self) -> int:
        return len(self.train)


class Preconditioner:
    """Block-diagonal damped ``R^power`` (see module docstring) over a column layout.

    Build with :meth:`from_autocorrelation`. The constructor keeps matrices as given
    (shapes checked only), so :func:`check_preconditioner` can report on a bad one.
    ``matrices`` (``R``) and ``eigvecs`` are mappings that may compute or read a module's
    matrix when asked for it; ``eigvals`` is a dict. Without ``eigvals``/``eigvecs`` the
    constructor decomposes ``R`` one module at a time.
    """

    def __init__(
        self,
        layout: Sequence[Any],
        matrices: Mapping[str, np.ndarray],
        *,
        damping: float = DEFAULT_DAMPING,
        lam: float | None = None,
        auto_top_k: int | None = None,
        n_train: int = 0,
        n_query: int = 0,
        eigvals: Mapping[str, np.ndarray] | None = None,
        eigvecs: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        self.layout = normalize_layout(layout)
        if not np.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number >= 0, got {damping}")
        self.damping = float(damping)
        self.lam = None if lam is None else float(lam)
        self.auto_top_k = auto_top_k
        self.n_train, self.n_query = int(n_train), int(n_query)
        names = {m.name for m in self.layout}
        if set(matrices) != names:
            raise ValueError(
                f"matrices do not match the layout: missing {sorted(names - set(matrices))}, "
                f"unexpected {sorted(set(matrices) - names)}"
            )
        for m in self.layout:
            _check_square(m, matrices, "matrix")
        if (eigvals is None) != (eigvecs is None):
            raise ValueError("pass both eigvals and eigvecs, or neither")
        self.matrices = matrices
        if eigvals is None:
            eigvals, eigvecs = {}, {}
            for m in self.layout:  # one module's R and eigh workspace at a time
                eigvals[m.name], eigvecs[m.name] = _eigh(np.asarray(matrices[m.name], dtype=np.float64))
        self.eigvals = {m.name: np.asarray(eigvals[m.name], dtype=np.float64) for m in self.layout}
        self.eigvecs = eigvecs
        self._cache: dict[tuple[float, str], list[torch.Tensor]] = {}

    @classmethod
    def from_autocorrelation(
        cls,
        train: Autocorrelation,
        query: Autocorrelation | None = None,
        *,
        lam: float | str | None = "auto",
        damping: float = DEFAULT_DAMPING,
        auto_top_k: int | None = None,
    ) -> Preconditioner:
        """``R = lam*R_query + (1-lam)*R_train``; ``lam``: float in [0, 1], ``"auto"``
        (:func:`auto_mixing_lambda`) or ``None`` (mixing off: ``R = R_train``, any
        query ignored). Without ``query`` mixing is off; a fixed float then raises."""
        if query is None or lam is None:
            if query is None and lam not in (None, "auto"):
                raise ValueError(f"lam={lam!r} needs a query autocorrelation to mix with")
            return cls(train.layout, train.matrices, damping=damping, n_train=train.n)
        check_same_layout(train.layout, query.layout, "train vs query autocorrelation")
        top_k = None
        if lam == "auto":
            lam, top_k = auto_mixing_lambda(train, query, auto_top_k)
        elif isinstance(lam, str) or not 0.0 <= float(lam) <= 1.0:
            raise ValueError(f"lam must be a float in [0, 1], 'auto' or None, got {lam!r}")
        lam = float(lam)
        mixed = MixedMatrices(train.matrices, query.matrices, lam)
        counts = {"n_train": train.n, "n_query": query.n}
        return cls(train.layout, mixed, damping=damping, lam=lam, auto_top_k=top_k, **counts)

    @property
    def dims(self) -> int:
        return self.layout[-1].stop

    def damping_shift(self, name: str) -> float:
        """``c * mean(clamped eigenvalues)`` of one module (1.0 mean for an all-zero R)."""
        mean = float(np.clip(self.eigvals[name], 0.0, None).mean())
        return self.damping * (mean if mean > 0 else 1.0)

    def operator(self, name: str, power: float) -> np.ndarray:
        """Module matrix ``V diag(damped**power) Vᵀ`` (float64, ``[d_m, d_m]``)."""
        vecs, damped = self.eigvecs[name], np.clip(self.eigvals[name], 0.0, None)
        return (vecs * (damped + self.damping_shift(name)) ** power) @ vecs.T

    def _operators(self, power: float, device: torch.device) -> list[torch.Tensor]:
        """float32 operators of ``power`` on ``device``, built one module at a time, cached."""
        key = (float(power), str(device))
        if key not in self._cache:
            ops = []
            for m in self.layout:
                op = self.operator(m.name, power)
                ops.append(torch.from_numpy(op.astype(np.float32)).to(device))
                del op
            self._cache[key] = ops
        return self._cache[key]

    def apply_torch(self, x: torch.Tensor, power: float) -> torch.Tensor:
        """``x [n, dims]`` float32 tensor -> preconditioned tensor on the same device."""
        check_columns(self.layout, tuple(x.shape), "preconditioner input")
        out = torch.empty_like(x)
        for m, op in zip(self.layout, self._operators(power, x.device)):
            out[:, m.start : m.stop] = x[:, m.start : m.stop] @ op
        return out

    def apply(
        self,
        x: np.ndarray,
        power: float,
        *,
        device: str | torch.device | None = None,
        chunk_rows: int | None = None,
    ) -> np.ndarray:
        """``x [n, dims]`` (any float dtype) -> ``x R^power`` per module, float32 ``[n, dims]``;
        ``chunk_rows`` rows at a time (default: 64 MiB of float32 rows)."""
        check_columns(self.layout, tuple(x.shape), "preconditioner input")
        device = torch.device(device or "cpu")
        chunk_rows = chunk_rows or max(1, CHUNK_BYTES // (4 * self.dims))
        out = np.empty(x.shape, dtype=np.float32)
        for start in range(0, x.shape[0], chunk_rows):
            res = self.apply_torch(as_float32_tensor(x[start : start + chunk_rows], device), power)
            out[start : start + res.shape[0]] = res.cpu().numpy()
        return out

    def settings(self) -> dict[str, Any]:
        """The JSON sidecar: format, layout, dims, lam, auto_top_k, damping, n_train, n_query."""
        layout = [m._asdict() for m in self.layout]
        head = {"format": FORMAT, "version": FORMAT_VERSION, "layout": layout, "dims": self.dims}
        return head | {k: getattr(self, k) for k in _SETTINGS}

    def save(self, path: str | Path) -> Path:
        """Write directory ``path`` (safetensors ``<module>/R``, ``/eigvals``, ``/eigvecs`` +
        JSON sidecar) atomically, streaming one module's matrix at a time."""
        parts = {"R": self.matrices, "eigvals": self.eigvals, "eigvecs": self.eigvecs}
        entries, source = [], {}
        for kind, mapping in parts.items():
            for m in self.layout:
                shape = (m.size,) if kind == "eigvals" else (m.size, m.size)
                entries.append((f"{m.name}/{kind}", shape, np.float64))
                source[f"{m.name}/{kind}"] = (mapping, m.name)
        with atomic_dir(path) as tmp:
            write_safetensors(tmp / TENSORS_FILE, entries, lambda key: source[key][0][source[key][1]],
                              metadata={"format": FORMAT})
            (tmp / SETTINGS_FILE).write_text(json.dumps(self.settings(), indent=2))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Preconditioner:
        """Read a directory written by :meth:`save` (no pickle); ``R`` and the eigenvectors
        stay on disk and are read per module when used."""
        path = Path(path)
        settings = json.loads((path / SETTINGS_FILE).read_text())
        if settings.get("format") != FORMAT or settings.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a {FORMAT} v{FORMAT_VERSION} directory")
        layout = normalize_layout(settings["layout"])

        def stored(kind: str) -> StoredTensors:
            return StoredTensors(path / TENSORS_FILE, {m.name: f"{m.name}/{kind}" for m in layout})

        eigvals = dict(stored("eigvals"))
        return cls(layout, stored("R"), eigvals=eigvals, eigvecs=stored("eigvecs"),
                   **{k: settings[k] for k in _SETTINGS})


def check_preconditioner(p: Preconditioner) -> dict[str, Any]:
    """Per-module health report; ``ok`` is True when every module passes.

    Per module: ``max_asymmetry = max|R - Rᵀ|`` and ``symmetric`` (<= 1e-8 * max|R|),
    ``finite`` (R and its eigendecomposition), ``min_eigenvalue`` (raw, unclamped)
    and ``min_damped_eigenvalue = min_eigenvalue + c*mean(l)`` with
    ``positive_definite`` = that > 0 (a clearly non-PSD R fails even after damping).
    """
    modules = {}
    for m in p.layout:  # one module's R and eigenvectors at a time
        r, vals = np.asarray(p.matrices[m.name], dtype=np.float64), p.eigvals[m.name]
        finite = all(np.isfinite(a).all() for a in (r, vals, p.eigvecs[m.name]))
        asym = float(np.abs(r - r.T).max())
        scale = float(np.abs(r).max()) if finite else float("nan")
        min_eig = float(vals.min())
        min_damped = min_eig + p.damping_shift(m.name) if finite else float("nan")
        modules[m.name] = {
            "max_asymmetry": asym,
            "symmetric": bool(asym <= SYMMETRY_RTOL * max(scale, 1e-300)),
            "finite": finite,
            "min_eigenvalue": min_eig,
            "min_damped_eigenvalue": min_damped,
            "positive_definite": bool(min_damped > 0),
        }
    ok = all(v["symmetric"] and v["finite"] and v["positive_definite"] for v in modules.values())
    return {"ok": ok, "modules": modules}


def mixing_top_k(scoring: ScoringSpec, full_text: bool) -> int | None:
    """``k`` of auto mixing (:func:`auto_mixing_lambda`): ``scoring.mixing_components`` when a
    number; ``auto``: :data:`FULL_TEXT_TOP_K` (1000) for full-text queries, whose gradients are
    dominated by the query phrasing's tokens, and the paper's share of the dims (``None``) for
    queries with the loss on a completion only. Measured in docs/evaluation.md ("TrackStar vs
    Bergson on fact tracing"): at 2048 dims the share is k = 31, which left full-text queries
    a quarter behind Bergson's k = 1000, while k = 1000 costs completion queries as much."""
    if scoring.mixing_components != "auto":
        return int(scoring.mixing_components)
    return FULL_TEXT_TOP_K if full_text else None


def trackstar_preconditioner(train: Autocorrelation, query: Autocorrelation | None,
                             scoring: ScoringSpec, *, full_text: bool = False) -> Preconditioner:
    """TrackStar's preconditioner from the pipeline's ``scoring`` section:
    ``lam * R_query + (1 - lam) * R_train`` (``mixing``: auto, a number, or off), damped.
    ``full_text``: the query rows' loss covers the whole query text (no completion split),
    which sets auto mixing's ``k`` (:func:`mixing_top_k`)."""
    mixing = scoring.mixing
    lam = None if mixing == "off" or query is None else ("auto" if mixing == "auto" else float(mixing))
    return Preconditioner.from_autocorrelation(train, query if lam is not None else None,
                                               lam=lam, damping=scoring.damping,
                                               auto_top_k=mixing_top_k(scoring, full_text))
