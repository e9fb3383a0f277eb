"""Pictures for asset metadata (matplotlib, Agg backend, small PNGs written atomically): score
distributions, a preconditioner's eigenvalue spectrum, index recall against nprobe/efSearch;
and :func:`png_markdown`, the Markdown that shows a PNG inline (a base64 data URI)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from attribution_assets.engine.io.atomic import atomic_file

INLINE_LIMIT = 256 << 10  # PNG bytes shown inline as a data URI; larger ones by path only
_SIZE, _DPI = (5.0, 3.0), 80  # inches, dots per inch: 400 x 240 pixels
FLOOR = 1e-10  # spectrum plots: eigenvalues below FLOOR x the largest are drawn at that level


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=_SIZE, dpi=_DPI)
    return plt, fig, ax


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    plt.close(fig)
    return Path(path)


def score_histogram(scores: np.ndarray, path: Path, title: str, bins: int = 40) -> Path:
    """Histogram of ``scores`` (any shape, flattened; non-finite values dropped) at ``path``."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    plt, fig, ax = _figure()
    if values.size:
        ax.hist(values, bins=bins, color="#2a7", edgecolor="white", linewidth=0.4)
        ax.axvline(0.0, color="#555", linewidth=0.8, linestyle=":")
    ax.set_xlabel("score (higher = supports the query)")
    ax.set_ylabel("query-document pairs")
    ax.set_title(f"{title} ({values.size} scores)", fontsize=10)
    return _save(plt, fig, path)


def spectrum_plot(eigvals: Mapping[str, np.ndarray], damping: Mapping[str, float], path: Path, *,
                  train: np.ndarray | None = None, query: np.ndarray | None = None,
                  lam: float | None = None, top_k: int | None = None) -> Path:
    """Pooled eigenvalues of the (mixed) ``R`` per module (``eigvals``), descending on a log
    scale (floored at :data:`FLOOR` x the largest), with each module's damping ``c * mean(l)`` as a dotted line (the range over modules
    shaded); with ``train``/``query`` spectra and ``lam``, the weighted curves
    ``(1 - lam) s_train`` and ``lam s_query`` whose crossing at component ``top_k`` set ``lam``."""
    pooled = np.sort(np.clip(np.concatenate([np.asarray(v, np.float64) for v in eigvals.values()]),
                             0.0, None))[::-1]
    top = float(pooled[0]) if pooled.size and pooled[0] > 0 else 1.0
    tiny = top * FLOOR  # numerically zero eigenvalues are drawn on the floor
    x = np.arange(1, pooled.size + 1)
    plt, fig, ax = _figure()
    ax.semilogy(x, np.maximum(pooled, tiny), color="#222", linewidth=1.2, label="R (mixed, pooled)")
    levels = np.asarray(list(damping.values()), dtype=np.float64)
    if levels.size:
        ax.axhspan(levels.min(), max(levels.max(), levels.min() * 1.0001), color="#c44", alpha=0.12)
        ax.axhline(float(np.median(levels)), color="#c44", linestyle=":", linewidth=1.0,
                   label=f"damping (median of {levels.size} modules)")
    if train is not None and query is not None and lam is not None:
        for values, weight, colour, name in ((train, 1 - lam, "#27c", "(1-λ) R_train"),
                                             (query, lam, "#e80", "λ R_query")):
            v = np.sort(np.clip(np.asarray(values, np.float64), 0.0, None))[::-1] * weight
            ax.semilogy(np.arange(1, v.size + 1), np.maximum(v, tiny), color=colour, linewidth=0.9,
                        label=name)
    ax.set_ylim(tiny * 0.5, top * 3)
    if lam is not None:
        where = f", curves cross at k = {top_k}" if top_k else ""
        if top_k:
            ax.axvline(top_k, color="#e80", linestyle="--", linewidth=0.8)
        ax.set_title(f"spectrum: mixing λ = {lam:.3f}{where}", fontsize=10)
    else:
        ax.set_title("eigenvalue spectrum (no query mixing)", fontsize=10)
    ax.set_xlabel("component (pooled over modules, descending)")
    ax.set_ylabel("eigenvalue")
    ax.legend(fontsize=7, loc="lower left")
    return _save(plt, fig, path)


def recall_plot(curve: Sequence[Sequence[float]], path: Path, *, parameter: str, k: int, target: float,
                chosen: int) -> Path:
    """Recall@k against the search parameter from a calibration ``curve`` of
    ``(value, recall, lower bound)``, with the target and the chosen value marked."""
    points = np.asarray(sorted(curve), dtype=np.float64).reshape(-1, 3)
    plt, fig, ax = _figure()
    ax.plot(points[:, 0], points[:, 1], "o-", color="#27c", label=f"mean recall@{k}")
    ax.plot(points[:, 0], points[:, 2], "v:", color="#27c", alpha=0.6, label="95% lower bound")
    ax.axhline(target, color="#c44", linestyle="--", linewidth=0.8, label=f"target {target:g}")
    ax.axvline(chosen, color="#2a7", linestyle="--", linewidth=0.8, label=f"chosen {parameter}={chosen}")
    if points[:, 0].max() / max(points[:, 0].min(), 1) >= 8:
        ax.set_xscale("log", base=2)
    ax.set_ylim(min(0.0, float(points[:, 2].min())), 1.02)
    ax.set_xlabel(parameter)
    ax.set_ylabel(f"recall@{k} vs exact search")
    ax.set_title(f"index recall against {parameter} (calibration)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    return _save(plt, fig, path)


def png_markdown(path: Path, alt: str) -> str:
    """Markdown showing the PNG at ``path`` inline (data URI) when it is at most
    :data:`INLINE_LIMIT` bytes, else naming its path."""
    data = Path(path).read_bytes()
    if len(data) > INLINE_LIMIT:
        return f"{alt}: `{path}` ({len(data) >> 10} KiB, too large to show inline)"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})\n\n`{path}`"
