"""Per-module autocorrelation ``R_m = (1/n) sum g gᵀ`` of gradient rows: column layouts,
a streaming accumulator (shards merge), and its on-disk form.

Shapes are ``[rows, dims]``; columns split into per-module blocks by a *layout*: a list
of ``(name, start, stop)`` tuples or ``{"name", "start", "stop"}`` dicts, contiguous, in
order, covering ``[0, dims)``. Sums are float64.

On disk (a directory written atomically): ``autocorrelation.safetensors`` (one float64
matrix per module) and ``autocorrelation.json`` (``n`` and the layout).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors.numpy import load_file, save_file

from attribution_assets.engine.gradients.collect import ShardRows
from attribution_assets.engine.io.atomic import atomic_dir

TENSORS_FILE, SETTINGS_FILE = "autocorrelation.safetensors", "autocorrelation.json"


class Module(NamedTuple):
    """One column block ``[start, stop)`` of a gradient row."""

    name: str
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


Layout = tuple[Module, ...]


def normalize_layout(layout: Sequence[Any]) -> Layout:
    """Layout entries (tuples or dicts) -> validated tuple of :class:`Module`."""
    modules = []
    for entry in layout:
        if isinstance(entry, Mapping):
            entry = (entry["name"], entry["start"], entry["stop"])
        name, start, stop = entry
        modules.append(Module(str(name), int(start), int(stop)))
    if not modules:
        raise ValueError("layout is empty")
    expected, seen = 0, set()
    for m in modules:
        if m.name in seen:
            raise ValueError(f"layout: duplicate module name {m.name!r}")
        if m.start != expected or m.stop <= m.start:
            msg = f"non-empty and start at column {expected} (contiguous, in order, from 0)"
            raise ValueError(f"layout: module {m.name!r} is [{m.start}:{m.stop}), must be {msg}")
        seen.add(m.name)
        expected = m.stop
    return tuple(modules)


def check_columns(layout: Layout, shape: tuple[int, ...], what: str) -> None:
    """Raise a ValueError naming the first module that does not fit ``shape``."""
    dims = layout[-1].stop
    if len(shape) != 2:
        raise ValueError(f"{what} must be 2-D [rows, dims], got shape {tuple(shape)}")
    if shape[1] != dims:
        bad = next((m for m in layout if m.stop > shape[1]), layout[-1])
        raise ValueError(
            f"{what} has shape {tuple(shape)} but the layout covers {dims} columns "
            f"(module {bad.name!r} is columns [{bad.start}:{bad.stop}))"
        )


def check_same_layout(a: Layout, b: Layout, what: str) -> None:
    """Raise a ValueError naming the first module where two layouts differ."""
    for i, (ma, mb) in enumerate(zip_longest(a, b)):
        if ma != mb:
            raise ValueError(f"{what}: layouts differ at module #{i}: {ma} vs {mb}")


def _check_square(m: Module, matrix: np.ndarray, what: str) -> None:
    if matrix.shape != (m.size, m.size):
        raise ValueError(
            f"{what} of module {m.name!r} has shape {matrix.shape}, expected "
            f"{(m.size, m.size)} for columns [{m.start}:{m.stop})"
        )


@dataclass(frozen=True)
class Autocorrelation:
    """Per-module ``R_m = (1/n) sum g gᵀ`` (float64, ``[d_m, d_m]``) over ``n`` rows."""

    layout: Layout
    matrices: dict[str, np.ndarray]
    n: int

    def __post_init__(self) -> None:
        for m in self.layout:
            _check_square(m, self.matrices[m.name], "autocorrelation")

    def spectrum(self) -> np.ndarray:
        """All modules' eigenvalues pooled (= spectrum of the block-diagonal R), descending."""
        vals = [np.linalg.eigvalsh(self.matrices[m.name]) for m in self.layout]
        return np.sort(np.clip(np.concatenate(vals), 0.0, None))[::-1]


class AutocorrelationAccumulator:
    """Streaming ``sum g gᵀ`` per module; blocks of any float dtype, float64 sums.

    ``update`` reads ``chunk_rows`` rows at a time, so memory-mapped shards never
    need to fit in memory.
    """

    def __init__(self, layout: Sequence[Any], *, chunk_rows: int = 4096) -> None:
        self.layout = normalize_layout(layout)
        self.chunk_rows = int(chunk_rows)
        self.sums = {m.name: np.zeros((m.size, m.size)) for m in self.layout}
        self.n = 0

    def update(self, block: np.ndarray) -> AutocorrelationAccumulator:
        """Add rows ``block [n, dims]``; raises on non-finite values (naming the module)."""
        check_columns(self.layout, block.shape, "gradient block")
        for start in range(0, block.shape[0], self.chunk_rows):
            stop = min(start + self.chunk_rows, block.shape[0])
            for m in self.layout:
                x = np.asarray(block[start:stop, m.start : m.stop], dtype=np.float64)
                if not np.isfinite(x).all():
                    raise ValueError(
                        f"non-finite gradients in module {m.name!r}, rows {start}:{stop}"
                    )
                self.sums[m.name] += x.T @ x
        self.n += int(block.shape[0])
        return self

    def merge(self, other: AutocorrelationAccumulator) -> AutocorrelationAccumulator:
        """Add another accumulator's sums (e.g. from another shard) into this one."""
        check_same_layout(self.layout, other.layout, "merge")
        for name, s in other.sums.items():
            self.sums[name] += s
        self.n += other.n
        return self

    def finalize(self) -> Autocorrelation:
        if self.n == 0:
            raise ValueError("no gradient rows were accumulated")
        mats = {k: (s + s.T) / (2.0 * self.n) for k, s in self.sums.items()}
        return Autocorrelation(self.layout, mats, self.n)


def accumulate(blocks: Iterable[np.ndarray], layout: Sequence[Any]) -> Autocorrelation:
    """Streaming ``R = (1/n) sum g gᵀ`` per module over row blocks ``[n_i, dims]``."""
    acc = AutocorrelationAccumulator(layout)
    for block in blocks:
        acc.update(block)
    return acc.finalize()


def save_autocorrelation(path: Path, autocorrelation: Autocorrelation) -> None:
    """Write the per-module matrices and ``n`` + layout to the directory ``path`` (atomically)."""
    with atomic_dir(path) as tmp:
        save_file({m.name: autocorrelation.matrices[m.name] for m in autocorrelation.layout},
                  str(tmp / TENSORS_FILE))
        (tmp / SETTINGS_FILE).write_text(json.dumps(
            {"n": autocorrelation.n, "layout": [m._asdict() for m in autocorrelation.layout]}))


def load_autocorrelation(path: Path) -> Autocorrelation:
    """Read what :func:`save_autocorrelation` wrote."""
    meta = json.loads((Path(path) / SETTINGS_FILE).read_text())
    matrices = load_file(str(Path(path) / TENSORS_FILE))
    return Autocorrelation(normalize_layout(meta["layout"]), matrices, int(meta["n"]))


def training_autocorrelation(shards: Iterable[ShardRows]) -> Autocorrelation:
    """Autocorrelation of every shard's document rows (stored or streamed), one shard at a time."""
    acc = None
    for rows in shards:
        acc = acc or AutocorrelationAccumulator(rows.info["modules"])
        acc.update(rows.document_rows())
    if acc is None:
        raise ValueError("no shards to accumulate: materialize the corpus and its shards first")
    return acc.finalize()
