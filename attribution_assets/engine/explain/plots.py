"""Pictures for asset metadata (matplotlib, Agg backend, small PNGs written atomically): score
distributions (log count axis, percentiles marked), a preconditioner's eigenvalue spectrum,
index recall against nprobe/efSearch; and :func:`png_markdown`, the Markdown that shows a PNG
inline (a base64 data URI). Legends sit outside the data, numbers are rounded."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from attribution_assets.engine.io.atomic import atomic_file

INLINE_LIMIT = 256 << 10  # PNG bytes shown inline as a data URI; larger ones by path only
_SIZE, _DPI = (10.0, 3.6), 80  # inches, dots per inch: 800 x 288 pixels
FLOOR = 1e-10  # spectrum plots: eigenvalues below FLOOR x the largest are drawn at that level


def _figure(size: tuple[float, float] = _SIZE):
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size, dpi=_DPI)
    return plt, fig, ax


def _legend_outside(ax) -> None:
    """The legend right of the axes, never over the data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    plt.close(fig)
    return Path(path)


#: Percentiles marked on a score histogram: what makes a score "high".
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def score_histogram(scores: np.ndarray, path: Path, title: str, bins: int = 60) -> Path:
    """Histogram of ``scores`` (any shape, flattened; non-finite values dropped) at ``path``:
    :func:`histogram_plot` of their counts, :data:`PERCENTILES` marked."""
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size:
        counts, edges = np.histogram(values, bins=bins)
        marks = dict(zip(PERCENTILES, np.percentile(values, PERCENTILES)))
    else:
        counts, edges, marks = np.zeros(0), np.zeros(1), {}
    return histogram_plot(edges, counts, marks, path, title)


def histogram_plot(edges: np.ndarray, counts: np.ndarray, percentiles: Mapping[float, float], path: Path,
                   title: str) -> Path:
    """Bars of ``counts`` [bins] between ``edges`` [bins + 1] on a log count axis (score counts
    span decades: the top documents, the interesting part, stay visible), each of
    ``percentiles`` (``{50.0: score}``) a dashed line, the legend outside the data."""
    counts = np.asarray(counts, dtype=np.float64)
    edges = np.asarray(edges, dtype=np.float64)
    plt, fig, ax = _figure()
    total = int(counts.sum())
    if total:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="#2a7", edgecolor="white",
               linewidth=0.3, label="query-document pairs")
        ax.set_yscale("log")
        ax.set_ylim(0.7, counts.max() * 2)
        ax.axvline(0.0, color="#555", linewidth=0.8, linestyle=":")
        colours = ("#555", "#27c", "#e80", "#c44", "#808")
        for (q, value), colour in zip(sorted(percentiles.items()), colours):
            ax.axvline(value, color=colour, linewidth=1.0, linestyle="--", label=f"p{q:g} = {value:+.4f}")
    ax.set_xlabel("score (higher = supports the query)")
    ax.set_ylabel("pairs (log scale)")
    ax.set_title(f"{title} ({total:,} scores)", fontsize=10)
    if total:
        _legend_outside(ax)
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
    _legend_outside(ax)
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
    _legend_outside(ax)
    return _save(plt, fig, path)


def png_markdown(path: Path, alt: str) -> str:
    """Markdown showing the PNG at ``path`` inline (data URI, no local path) when it is at most
    :data:`INLINE_LIMIT` bytes, else naming its path."""
    data = Path(path).read_bytes()
    if len(data) > INLINE_LIMIT:
        return f"{alt}: `{path}` ({len(data) >> 10} KiB, too large to show inline)"
    return f"![{alt}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


_WRAP = 112  # characters per line of a heat-map picture
_LINE = 17  # pixels per line


def explanation_picture(explanation, path: Path, max_documents: int = 10) -> Path:
    """One query's heat map as a PNG (what the Dagster UI can show inline: its Markdown renders
    images, not HTML): the prompt and the answer (underlined), where the first gold document
    ranks, then per document a header line and its whole words on a background whose colour is
    the word's share (green supports, purple opposes; ``render`` conventions). ``explanation``:
    an ``engine.explain.tokens.Explanation``."""
    from attribution_assets.engine.explain.render import (
        gold_rank_line,
        query_plain,
        share_colour,
        share_scale,
    )

    lines: list[list[tuple[str, str | None, str]]] = []  # per line: (text, background, style)

    def wrapped(words, style="normal"):
        line, width = [], 0
        for text, background in words:
            for j, part in enumerate(text.replace("\t", " ").split("\n")):
                if j:  # a line break inside the text
                    lines.append(line)
                    line, width = [], 0
                if width + len(part) > _WRAP and line:
                    lines.append(line)
                    line, width, part = [], 0, part.lstrip()
                line.append((part, background, style))
                width += len(part)
        lines.append(line)

    query = query_plain(explanation)
    if explanation.answer:
        wrapped([("prompt: " + explanation.prompt, None)], "bold")
        wrapped([("answer: ", None)], "bold")
        lines[-1].append((explanation.answer.strip(), None, "answer"))
    else:
        wrapped([("query: " + query, None)], "bold")
    wrapped([(gold_rank_line(explanation), None)], "gold")
    wrapped([("word colour: green supports the answer, purple opposes it; darker = a larger share of the "
              "document's score", None)], "note")
    for doc in explanation.documents[:max_documents]:
        lines.append([])
        mark = "   GOLD" if doc.gold else ""
        wrapped([(f"#{doc.rank}  score {doc.score:+.4f}   {doc.doc_id}{mark}", None)], "gold" if doc.gold else "bold")
        words = doc.words()
        scale = share_scale(words)
        wrapped([(w if i else w.lstrip(), share_colour(c, scale)) for i, (w, c) in enumerate(words)])
    plt, fig, _ = _figure((10.0, (len(lines) + 2) * _LINE / _DPI))
    fig.clear()
    char = 0.602 * 10 / 72 * _DPI  # DejaVu Sans Mono advance at 10 pt, in pixels
    width_px, height_px = fig.get_size_inches() * _DPI
    for row, line in enumerate(lines):
        x = 12.0
        y = 1 - (row + 1.2) * _LINE / height_px
        for text, background, style in line:
            lead = len(text) - len(text.lstrip(" "))
            x += lead * char
            body = text.lstrip(" ")
            if body:
                box = None
                if background:
                    box = {"facecolor": _rgba(background), "edgecolor": "none", "pad": 1.2}
                fig.text(x / width_px, y, body, family="DejaVu Sans Mono", fontsize=10, va="baseline",
                         weight="bold" if style in ("bold", "gold", "answer") else "normal",
                         color={"gold": "#1a7f4b", "note": "#777"}.get(style, "#222"), bbox=box)
                if style == "answer":
                    fig.add_artist(plt.Line2D([x / width_px, (x + len(body) * char) / width_px],
                                              [y - 3 / height_px] * 2, color="#2a7", linewidth=2))
            x += len(body) * char
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=_DPI)
    plt.close(fig)
    return Path(path)


def _rgba(css: str) -> tuple[float, float, float, float]:
    """``rgba(34,170,85,0.500)`` -> matplotlib's ``(r, g, b, a)`` in [0, 1]."""
    r, g, b, a = (float(v) for v in css[css.index("(") + 1:-1].split(","))
    return r / 255, g / 255, b / 255, a
