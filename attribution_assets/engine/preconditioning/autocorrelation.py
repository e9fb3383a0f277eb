"""Per-module autocorrelation ``R_m = (1/n) sum g gᵀ`` of gradient rows: column layouts,
a streaming accumulator (shards merge), and its on-disk form.

Shapes are ``[rows, dims]``; columns split into per-module blocks by a *layout*: a list
of ``(name, start, stop)`` tuples or ``{"name", "start", "stop"}`` dicts, contiguous, in
order, covering ``[0, dims)``. Sums are float64.

Memory: TrackStar's per-module matrices are dense ``d_m x d_m`` float64 (``p = 64``:
``4096² x 8`` bytes = 128 MiB per module). The accumulator reads at most ``2^24`` values
of one module at a time and finalizes its sums in place; a loaded autocorrelation reads
each module's matrix from disk when asked for it, so consumers hold one module at a time.

On disk (a directory written atomically): ``autocorrelation.safetensors`` (one float64
matrix per module) and ``autocorrelation.json`` (``n`` and the layout). A shard's
accumulator is saved the same way with its raw sums ``S_m = sum g gᵀ`` (``"sums": true``);
merging saved shard sums gives the autocorrelation of all shards without their rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import zip_longest
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors.numpy import save_file

from attribution_assets.engine.gradients.collect import ShardRows
from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.tensors import StoredTensors

TENSORS_FILE, SETTINGS_FILE = "autocorrelation.safetensors", "autocorrelation.json"
CHUNK_VALUES = 1 << 24  # values of one module read (as float64) at a time: 128 MiB


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


def matrix_shape(matrices: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    """Shape of ``matrices[name]``; mappings that compute or read a matrix when asked for it
    (``StoredTensors``, :class:`RowMatrices`, ``MixedMatrices``) answer without doing so."""
    shape = getattr(matrices, "shape", None)
    return tuple(shape(name)) if callable(shape) else tuple(np.shape(matrices[name]))


def _check_square(m: Module, matrices: Mapping[str, np.ndarray], what: str) -> None:
    """Raise unless ``matrices[m.name]`` is ``[d_m, d_m]``."""
    if m.name not in matrices:
        raise ValueError(f"{what}: no matrix for module {m.name!r}")
    shape = matrix_shape(matrices, m.name)
    if shape != (m.size, m.size):
        raise ValueError(
            f"{what} of module {m.name!r} has shape {shape}, expected "
            f"{(m.size, m.size)} for columns [{m.start}:{m.stop})"
        )


@dataclass(frozen=True)
class Autocorrelation:
    """Per-module ``R_m = (1/n) sum g gᵀ`` (float64, ``[d_m, d_m]``) over ``n`` rows.

    ``matrices`` is a mapping: a dict, or the file-backed mapping of a loaded one (each
    access reads that module's matrix)."""

    layout: Layout
    matrices: Mapping[str, np.ndarray]
    n: int

    def __post_init__(self) -> None:
        for m in self.layout:
            _check_square(m, self.matrices, "autocorrelation")

    def spectrum(self) -> np.ndarray:
        """All modules' eigenvalues pooled (= spectrum of the block-diagonal R), descending,
        read-only; computed once (auto mixing and the preconditioner's spectrum figure both
        read it: at ``projection_dim`` 64 it is a third of the preconditioner step).

        Matrices of fewer rows than columns (:class:`RowMatrices`, e.g. a query set) take the
        eigenvalues of the ``[n, n]`` Gram matrix instead of the ``[d_m, d_m]`` one: the same
        nonzero eigenvalues, zeros for the rest, ``O(n² d_m)`` instead of ``O(d_m³)``."""
        return self._spectrum

    @cached_property
    def _spectrum(self) -> np.ndarray:
        rows = self.matrices if isinstance(self.matrices, RowMatrices) else None
        vals = [rows.eigenvalues(m.name) if rows is not None and self.n < m.size
                else np.linalg.eigvalsh(self.matrices[m.name]) for m in self.layout]
        spectrum = np.sort(np.clip(np.concatenate(vals), 0.0, None))[::-1]
        spectrum.flags.writeable = False
        return spectrum


class AutocorrelationAccumulator:
    """Streaming ``sum g gᵀ`` per module; blocks of any float dtype, float64 sums.

    ``update`` reads ``chunk_rows`` rows of one module at a time (default: as many as make
    :data:`CHUNK_VALUES` values), so memory-mapped shards never need to fit in memory.
    :meth:`finalize` turns the sums into the result in place: the accumulator is spent.
    """

    def __init__(self, layout: Sequence[Any], *, chunk_rows: int | None = None) -> None:
        self.layout = normalize_layout(layout)
        self.chunk_rows = chunk_rows
        self.sums: dict[str, np.ndarray] | None = {m.name: np.zeros((m.size, m.size)) for m in self.layout}
        self.n = 0

    def _live_sums(self) -> dict[str, np.ndarray]:
        if self.sums is None:
            raise ValueError("this accumulator was finalized; start a new one")
        return self.sums

    def update(self, block: np.ndarray) -> AutocorrelationAccumulator:
        """Add rows ``block [n, dims]``; raises on non-finite values (naming the module)."""
        sums = self._live_sums()
        check_columns(self.layout, block.shape, "gradient block")
        for m in self.layout:
            step = self.chunk_rows or max(1, CHUNK_VALUES // m.size)
            for start in range(0, block.shape[0], step):
                stop = min(start + step, block.shape[0])
                x = np.asarray(block[start:stop, m.start : m.stop], dtype=np.float64)
                if not np.isfinite(x).all():
                    raise ValueError(
                        f"non-finite gradients in module {m.name!r}, rows {start}:{stop}"
                    )
                sums[m.name] += x.T @ x
                del x
        self.n += int(block.shape[0])
        return self

    def merge(self, other: AutocorrelationAccumulator) -> AutocorrelationAccumulator:
        """Add another accumulator's sums (e.g. from another shard) into this one."""
        check_same_layout(self.layout, other.layout, "merge")
        sums = self._live_sums()
        for name, s in other._live_sums().items():
            sums[name] += s
        self.n += other.n
        return self

    def finalize(self) -> Autocorrelation:
        """``R_m = (S + Sᵀ) / 2n`` computed in the sums' own memory (one module's temporary)."""
        sums = self._live_sums()
        if self.n == 0:
            raise ValueError("no gradient rows were accumulated")
        self.sums = None
        for s in sums.values():
            s += s.T  # NumPy buffers the overlapping transpose: one module's temporary
            s /= 2.0 * self.n
        return Autocorrelation(self.layout, sums, self.n)


def accumulate(blocks: Iterable[np.ndarray], layout: Sequence[Any]) -> Autocorrelation:
    """Streaming ``R = (1/n) sum g gᵀ`` per module over row blocks ``[n_i, dims]``."""
    acc = AutocorrelationAccumulator(layout)
    for block in blocks:
        acc.update(block)
    return acc.finalize()


class RowMatrices(Mapping[str, np.ndarray]):
    """``R_m = (1/n) x_mᵀ x_m`` of rows ``x [n, dims]``, computed per module when asked for:
    for few rows (a query set) cheaper to recompute than to hold ``d_m²`` values per module."""

    def __init__(self, rows: np.ndarray, layout: Layout):
        self.rows, self.layout = rows, layout
        self._modules = {m.name: m for m in layout}
        for m in layout:
            if not np.isfinite(rows[:, m.start : m.stop]).all():
                raise ValueError(f"non-finite gradients in module {m.name!r}")

    def shape(self, name: str) -> tuple[int, int]:
        return (self._modules[name].size,) * 2

    def __getitem__(self, name: str) -> np.ndarray:
        m = self._modules[name]
        x = np.asarray(self.rows[:, m.start : m.stop], dtype=np.float64)
        r = x.T @ x
        r += r.T  # exactly symmetric, as the accumulator's result
        r /= 2.0 * len(x)
        return r

    def eigenvalues(self, name: str) -> np.ndarray:
        """``R_m``'s eigenvalues (ascending) from the Gram matrix ``x_m x_mᵀ / n`` ``[n, n]``
        (its ``n`` eigenvalues are ``R_m``'s nonzero ones), padded with ``d_m - n`` zeros."""
        m = self._modules[name]
        x = np.asarray(self.rows[:, m.start : m.stop], dtype=np.float64)
        gram = x @ x.T
        gram += gram.T
        gram /= 2.0 * len(x)
        vals = np.linalg.eigvalsh(gram)
        return np.concatenate([np.zeros(max(0, m.size - len(vals))), vals])

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def row_autocorrelation(rows: np.ndarray, layout: Sequence[Any]) -> Autocorrelation:
    """The autocorrelation of ``rows [n, dims]`` (few rows, e.g. queries), each module's
    matrix computed when asked for (:class:`RowMatrices`); same values as :func:`accumulate`."""
    layout = normalize_layout(layout)
    check_columns(layout, rows.shape, "gradient rows")
    if len(rows) == 0:
        raise ValueError("no gradient rows were accumulated")
    return Autocorrelation(layout, RowMatrices(rows, layout), len(rows))


def save_autocorrelation(path: Path, autocorrelation: Autocorrelation) -> None:
    """Write the per-module matrices and ``n`` + layout to the directory ``path`` (atomically)."""
    with atomic_dir(path) as tmp:
        save_file({m.name: autocorrelation.matrices[m.name] for m in autocorrelation.layout},
                  str(tmp / TENSORS_FILE))
        (tmp / SETTINGS_FILE).write_text(json.dumps(
            {"n": autocorrelation.n, "layout": [m._asdict() for m in autocorrelation.layout]}))


def load_autocorrelation(path: Path) -> Autocorrelation:
    """What :func:`save_autocorrelation` wrote; each module's matrix is read when accessed."""
    meta = json.loads((Path(path) / SETTINGS_FILE).read_text())
    matrices = StoredTensors(Path(path) / TENSORS_FILE)
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


def shard_accumulator(rows: ShardRows) -> AutocorrelationAccumulator:
    """The sums of one shard's document rows (stored or streamed)."""
    return AutocorrelationAccumulator(rows.info["modules"]).update(rows.document_rows())


def save_accumulator(path: Path, accumulator: AutocorrelationAccumulator) -> None:
    """Write an accumulator's raw sums, ``n`` and layout to the directory ``path`` (atomically)."""
    sums = accumulator._live_sums()
    with atomic_dir(path) as tmp:
        save_file({m.name: sums[m.name] for m in accumulator.layout}, str(tmp / TENSORS_FILE))
        (tmp / SETTINGS_FILE).write_text(json.dumps(
            {"n": accumulator.n, "sums": True, "layout": [m._asdict() for m in accumulator.layout]}))


def load_accumulator(path: Path, in_memory: bool = True) -> AutocorrelationAccumulator:
    """What :func:`save_accumulator` wrote; ``in_memory=False`` reads each module's sums when
    accessed (enough to :meth:`~AutocorrelationAccumulator.merge` it into another)."""
    meta = json.loads((Path(path) / SETTINGS_FILE).read_text())
    if not meta.get("sums"):
        raise ValueError(f"{path} holds a finalized autocorrelation, not an accumulator's sums")
    accumulator = AutocorrelationAccumulator(meta["layout"])
    stored = StoredTensors(Path(path) / TENSORS_FILE)
    accumulator.sums = {m.name: stored[m.name] for m in accumulator.layout} if in_memory else stored
    accumulator.n = int(meta["n"])
    return accumulator


def merge_accumulators(paths: Sequence[Path]) -> Autocorrelation:
    """The autocorrelation of every saved accumulator in ``paths`` (in order): the first one's
    sums in memory, the others added one module at a time."""
    if not paths:
        raise ValueError("no shard autocorrelations to merge: materialize the shards first")
    merged = load_accumulator(paths[0])
    for path in paths[1:]:
        merged.merge(load_accumulator(path, in_memory=False))
    return merged.finalize()
