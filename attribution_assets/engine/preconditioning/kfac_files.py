"""Files and small numerics of the EK-FAC / K-FAC arrays (``preconditioning.kfac``): a directory
(written atomically) with ``<kind>.safetensors`` (float64 arrays keyed ``<module>/<array>``, no
pickle) and ``<kind>.json`` (format, version, kind and the caller's settings); float64
eigendecompositions and condition numbers that report non-finite input instead of raising; the
projection settings the curvature lives under (no torch: the Dagster definitions read them)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.spec import GradientSpec

FORMAT = "attribution-assets/kfac"
FORMAT_VERSION = 1

SPACES = ("projected", "full")


def projection_for(gradients: GradientSpec, space: str) -> dict | None:
    """The projection (``Projector.settings()``) the curvature lives under: ``None`` for the
    ``full`` space or without projection (``projection_dim: 0``)."""
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if space == "full" or gradients.projection_dim == 0:
        return None
    return {"dim": gradients.projection_dim, "kind": gradients.projection_kind, "seed": gradients.seed}



def check_same(a: Any, b: Any, what: str, fix: str) -> None:
    """Raise ``what differ (a vs b); fix`` unless ``a == b``."""
    if a != b:
        raise ValueError(f"{what} differ ({a!r} vs {b!r}); {fix}")


def write_arrays(path: str | Path, kind: str, tensors: dict[str, np.ndarray], meta: dict) -> Path:
    """Write ``tensors`` (as float64) and ``meta`` as a ``kind`` directory at ``path``."""
    from safetensors.numpy import save_file  # here: the definitions import this module

    with atomic_dir(path) as tmp:
        save_file({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in tensors.items()},
                  str(tmp / f"{kind}.safetensors"), metadata={"format": FORMAT})
        head = {"format": FORMAT, "version": FORMAT_VERSION, "kind": kind}
        (tmp / f"{kind}.json").write_text(json.dumps(head | meta, indent=1))
    return Path(path)


def read_arrays(path: str | Path, kind: str) -> tuple[dict[str, np.ndarray], dict]:
    """``(tensors, meta)`` of a ``kind`` directory; raises for a missing or foreign one."""
    from safetensors.numpy import load_file

    path = Path(path)
    meta_path = path / f"{kind}.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} does not exist; materialize the asset that writes it first.")
    meta = json.loads(meta_path.read_text())
    if (meta.get("format"), meta.get("version"), meta.get("kind")) != (FORMAT, FORMAT_VERSION, kind):
        raise ValueError(f"{meta_path}: not a {FORMAT} v{FORMAT_VERSION} {kind!r} file")
    return load_file(str(path / f"{kind}.safetensors")), meta


def eigh_or_nan(matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 eigendecomposition; NaNs (instead of an exception) for non-finite input."""
    if np.isfinite(matrix).all():
        return np.linalg.eigh(matrix)
    return np.full(matrix.shape[0], np.nan), np.full(matrix.shape, np.nan)


def condition_number(values: np.ndarray) -> float | None:
    """``max / min`` of eigenvalues, the minimum clamped at ``max * eps`` (so at most 1/eps);
    ``None`` for non-finite values."""
    if not np.isfinite(values).all():
        return None
    top, eps = float(values.max()), np.finfo(np.float64).eps
    return float(top / max(float(values.min()), top * eps) if top > 0 else 1.0 / eps)


def finite_or_none(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
