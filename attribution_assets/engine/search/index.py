"""FAISS inner-product indexes over training-gradient vectors (pure NumPy/FAISS).

Conventions: vectors are float32 rows ``[n, d]`` (already preconditioned and
unit-normalized by the caller when the pipeline asks for it); the metric is
always inner product, so a higher score means a more supportive document and a
``Flat`` index returns exactly ``queries @ vectors.T``. Every vector carries a
string document id.

Search parameters: an IVF index's ``nprobe`` and an HNSW index's ``efSearch`` trade speed
for recall, and the right value depends on the data and on the queries (a fixed nprobe
that is ample for clustered data misses badly for queries far from every cluster). With
``"auto"`` (the default) ``build_index`` calibrates the parameter to reach
``target_recall`` and saves it as the index's default; see ``engine.index_calibration``.

On-disk layout of an index directory (written to a temporary sibling and
renamed into place only when complete)::

    index.json          factory, dims, vectors, parts, build_seconds, bytes, metric,
                        nprobe, hnsw_ef_search, calibration, ...
    index-00000.faiss   one FAISS index per part (faiss.write_index, always a CPU index)
    ids-00000.npy       doc ids of that part's rows, unicode array (no pickle)
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.search.calibration import (
    EF_SEARCH_MAX,
    ExactTopK,
    calibrate,
    calibration_rows,
    check_calibration,
)
from attribution_assets.spec import IndexSpec

FORMAT_VERSION = 1
INFO_FILE = "index.json"
EMPTY = "empty index: blocks() yielded no vectors"
FACTORY_EXAMPLES = ("'Flat', 'SQfp16', 'HNSW32', 'IVF1024,Flat', 'IVF{auto},Flat', "
                    "'IVF{auto},PQ64', 'IVF{auto},SQfp16', 'OPQ64,IVF{auto},PQ64'")
Blocks = Callable[[], Iterable[tuple[Sequence[str], np.ndarray]]]


@dataclass(frozen=True)
class IndexInfo:
    """What ``build_index`` wrote (also the content of ``index.json``, less ``path``).

    nprobe / hnsw_ef_search: the search defaults saved with the index (None when the index
    type has no such parameter), calibrated when the config said ``"auto"``.
    calibration: None, or how the ``"auto"`` value was chosen: ``target_recall``,
    ``recall@k`` (mean over the calibration queries at the chosen value), ``lower_bound``
    (that mean minus ``CONFIDENCE_Z`` standard errors), ``k``, ``queries`` (count),
    ``source`` (``"queries"``: the caller's rows, or ``"indexed rows"``), ``reachable``
    (False: the target was out of reach), ``seconds`` (exact search plus the calibration
    searches); see ``engine.index_calibration``.
    """

    path: str
    factory: str
    factory_requested: str
    dims: int
    vectors: int
    parts: int
    part_files: list[dict]
    build_seconds: float
    bytes: int
    metric: str
    nprobe: int | None
    hnsw_ef_search: int | None
    trained_on: int
    gpu: bool
    calibration: dict | None


def auto_nlist(n_vectors: int, n_train: int) -> int:
    """IVF list count for ``{auto}``: ``round(4 * sqrt(N))`` bounded by ``n_train // 39``."""
    return max(1, min(round(4 * math.sqrt(n_vectors)), n_train // 39))


def _make_index(factory: str, dims: int) -> faiss.Index:
    try:
        return faiss.index_factory(dims, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = re.split(r"\.cpp:\d+: ", str(err).strip().splitlines()[-1])[-1]
        raise ValueError(
            f"invalid FAISS factory string {factory!r} for dims={dims}: {reason}. "
            f"Valid examples: {FACTORY_EXAMPLES}"
        ) from err


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW index ``index`` is (also under a pre-transform), else None."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _skip_polysemous_training(index: faiss.Index) -> None:
    """Turn off FAISS's polysemous PQ training: it only permutes code ids for Hamming
    filtering (unused here), leaves inner-product results unchanged, and takes minutes."""
    ivf = faiss.try_extract_index_ivf(index)
    inner = faiss.downcast_index(ivf if ivf is not None else index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if hasattr(inner, "do_polysemous_training"):
        inner.do_polysemous_training = False


class _Device:
    """Moves indexes to GPU 0 when asked and possible; keeps the GPU resources alive."""

    def __init__(self, use_gpu: bool | str):
        usable = use_gpu is not False and hasattr(faiss, "StandardGpuResources")
        self.res = faiss.StandardGpuResources() if usable and faiss.get_num_gpus() > 0 else None
        if use_gpu is True and self.res is None:
            warnings.warn("use_gpu=True but FAISS sees no GPU; building on the CPU", stacklevel=3)

    def put(self, index: faiss.Index) -> tuple[faiss.Index, bool]:
        """Return ``(index, on_gpu)``; index types without a GPU version stay on the CPU."""
        if self.res is None:
            return index, False
        try:
            return faiss.index_cpu_to_gpu(self.res, 0, index), True
        except (RuntimeError, AttributeError) as err:
            warnings.warn(f"no FAISS GPU version of this index ({err}); using the CPU",
                          stacklevel=3)
            return index, False


def _check_block(i: int, ids: Sequence[str], block: np.ndarray, dims: int) -> None:
    if block.ndim != 2:
        raise ValueError(f"block {i}: expected a 2-D array [n, d], got shape {block.shape}")
    if block.shape[1] != dims:
        raise ValueError(f"block {i}: dims mismatch: block has {block.shape[1]} dims, "
                         f"the index has {dims}")
    if len(ids) != block.shape[0]:
        raise ValueError(f"block {i}: {len(ids)} ids for {block.shape[0]} rows")
    if not all(isinstance(x, str) for x in ids):
        raise TypeError(f"block {i}: document ids must be str")


def _sample(blocks: Iterable, dims: int, size: int, seed: int) -> tuple[np.ndarray, int]:
    """One streaming pass: ``(rows [min(N, size), d] float32, N)``, a seeded uniform sample.

    Priority sampling: each row gets a random key and the ``size`` smallest keys win. Only
    rows below the current cut-off are gathered (memory-mapped blocks are read sparsely)
    and candidates are compacted once they reach ``2 * size`` rows, the peak memory.
    """
    rng = np.random.default_rng(seed)
    keys, pos, rows = [np.empty(0)], [np.empty(0, np.int64)], [np.empty((0, dims), np.float32)]
    total, held, bound = 0, 0, np.inf

    def compact():
        k, p, r = np.concatenate(keys), np.concatenate(pos), np.concatenate(rows)
        keep = np.argpartition(k, size - 1)[:size] if len(k) > size else slice(None)
        keys[:], pos[:], rows[:] = [k[keep]], [p[keep]], [r[keep]]
        return len(keys[0]), (keys[0].max() if len(keys[0]) == size else np.inf)

    for i, (ids, block) in enumerate(blocks):
        _check_block(i, ids, block, dims)
        new_keys = rng.random(block.shape[0])
        take = np.flatnonzero(new_keys < bound)
        keys.append(new_keys[take])
        pos.append(take + total)
        rows.append(np.asarray(block[take], dtype=np.float32))
        total, held = total + block.shape[0], held + len(take)
        if held >= 2 * size:
            held, bound = compact()
    compact()
    return np.ascontiguousarray(rows[0][np.argsort(pos[0])]), total


def _chunks(blocks: Iterable, dims: int, cap: int | None, groups: int | None,
            add_batch: int) -> Iterator[tuple]:
    """Yield ``(new_part, ids list[str], rows [m, d] float32)``, ``m <= add_batch``; a new
    part starts every ``groups`` blocks and when a part holds ``cap`` rows."""
    in_part, pending = 0, False
    for i, (ids, block) in enumerate(blocks):
        _check_block(i, ids, block, dims)
        pending = pending or (i > 0 and groups is not None and i % groups == 0)
        start = 0
        while start < block.shape[0]:
            new_part = pending or (cap is not None and in_part == cap)
            if new_part:
                pending, in_part = False, 0
            stop = min(block.shape[0], start + add_batch)
            if cap is not None:
                stop = min(stop, start + cap - in_part)
            rows = np.ascontiguousarray(block[start:stop], dtype=np.float32)
            if not np.isfinite(rows).all():
                raise ValueError(f"block {i}: rows {start}..{stop} contain NaN or Inf")
            yield new_part, list(ids[start:stop]), rows
            in_part, start = in_part + stop - start, stop


def _write_part(index: faiss.Index, on_gpu: bool, ids: list[str], tmp: Path, n: int) -> dict:
    cpu = faiss.index_gpu_to_cpu(index) if on_gpu else index
    name, ids_name = f"index-{n:05d}.faiss", f"ids-{n:05d}.npy"
    faiss.write_index(cpu, str(tmp / name))
    np.save(tmp / ids_name, np.asarray(ids, dtype=str), allow_pickle=False)
    return {"index": name, "ids": ids_name, "vectors": int(cpu.ntotal),
            "bytes": (tmp / name).stat().st_size}


def _truth_ids(parts_ids: Sequence[np.ndarray], positions: np.ndarray) -> list[set[str]]:
    """Per query, the ids at global row ``positions [m, k]`` of an index made of parts."""
    offsets = np.cumsum([0] + [len(ids) for ids in parts_ids])
    part = np.searchsorted(offsets, positions, side="right") - 1
    return [{str(parts_ids[p][i]) for p, i in zip(ps, rows)}
            for ps, rows in zip(part, positions - offsets[part])]


def _calibrate(index: FaissIndex, param: str, exact: ExactTopK, target: float) -> tuple[int, dict]:
    """Calibrate ``param`` (``nprobe`` or ``ef_search``) of ``index`` against ``exact``."""
    k = exact.positions.shape[1]

    def search(value: int) -> list[list[str]]:
        index.set_search_params(**{param: value})
        return index.search(exact.queries, k)[0]

    if param == "nprobe":
        lo, hi = 1, faiss.extract_index_ivf(index.parts[0]).nlist
    else:
        lo, hi = k, max(k, min(EF_SEARCH_MAX, len(index)))
    return calibrate(search, _truth_ids(index.ids, exact.positions), lo, hi, target,
                     source=exact.source, exact_seconds=exact.seconds)


def build_index(blocks: Blocks, spec: IndexSpec, out_dir, calibration: np.ndarray | None = None, *,
                seed: int = 0, calibration_k: int = 10, calibration_queries: int = 256,
                shard_groups: int | None = None, add_batch: int = 32_768) -> IndexInfo:
    """Build the index ``spec`` describes over every row of ``blocks()``; write it to ``out_dir``.

    ``{auto}`` in ``spec.factory`` (``"IVF{auto},Flat"``) becomes the number of lists
    ``round(4 * sqrt(N))``, at most ``(training rows) // 39`` so every list gets FAISS's
    minimum of 39 training points; at most ``spec.train_sample`` rows (seeded, uniform) train
    an index that needs training. An ``"auto"`` nprobe (IVF, within ``[1, nlist]``) or
    efSearch (HNSW, within ``[calibration_k, EF_SEARCH_MAX]``) is calibrated so that
    recall@``calibration_k`` against exact search reaches ``spec.target_recall`` as a
    one-sided 95 % lower bound over up to ``calibration_queries`` query rows. The recall of
    a fixed nprobe varies with the data: on the demo store (43 lists) the demo's queries
    need 40 for 0.95, training documents as queries 24-32 (docs/index-benchmark.md).
    Parts: a new one every ``shard_groups`` input blocks and when one reaches
    ``spec.max_vectors_per_index`` vectors. ``spec.use_gpu``: ``auto`` uses FAISS GPU when
    ``faiss.get_num_gpus() > 0``; True asks for it (warns and uses the CPU when none is
    usable). Saved indexes are CPU indexes. ``add_batch``: rows per ``index.add`` call.

    blocks: a callable returning a fresh iterable of ``(ids list[str], block [n, d])``
        pairs, e.g. one per gradient shard (memory-mapped arrays are fine; float16 is cast
        per chunk). It is called once for indexes that need no training (Flat, SQfp16,
        HNSW with a fixed efSearch or with ``calibration``) and twice otherwise (a
        sampling pass, then the adding pass).
    calibration: optional query rows ``[m, d]``, prepared as search will see them, for an
        ``"auto"`` nprobe / efSearch; without them, indexed rows (from
        the training or an extra sampling pass) calibrate. Ignored by other indexes. The
        exact ground truth is computed during the adding pass.
    Parts: all parts share one trained template, so their scores are comparable. The
    directory appears atomically: an existing ``out_dir`` is replaced only on success.
    """
    if not callable(blocks):
        raise TypeError("blocks must be a callable returning a fresh iterable of (ids, block)")
    for name, value in (("calibration_k", calibration_k), ("calibration_queries", calibration_queries),
                        ("shard_groups", shard_groups), ("add_batch", add_batch)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    t0 = time.perf_counter()
    device = _Device(spec.use_gpu)
    it = iter(blocks())
    first = next(it, None)
    if first is None:
        raise ValueError(EMPTY)
    dims = int(np.shape(first[1])[-1])
    if calibration is not None:
        calibration = check_calibration(calibration, dims)
    factory, trained_on, source = spec.factory, 0, itertools.chain([first], it)
    template = _make_index(factory.replace("{auto}", "1"), dims)
    is_ivf, is_hnsw = faiss.try_extract_index_ivf(template) is not None, _hnsw(template) is not None
    param = ("nprobe" if is_ivf and spec.nprobe == "auto" else
             "ef_search" if is_hnsw and spec.ef_search == "auto" else None)
    sample = None
    if not template.is_trained:
        sample, total = _sample(source, dims, spec.train_sample, seed)
        if total == 0:
            raise ValueError(EMPTY)
        factory = factory.replace("{auto}", str(auto_nlist(total, len(sample))))
        template = _make_index(factory, dims)
        _skip_polysemous_training(template)
        index, on_gpu = device.put(template)
        try:
            index.train(sample)
        except RuntimeError as err:
            raise ValueError(f"training {factory!r} on {len(sample)} rows failed: {err}") from err
        template = faiss.index_gpu_to_cpu(index) if on_gpu else index
        trained_on, source = len(sample), blocks()
    exact = None
    if param is not None:
        if calibration is None and sample is None:
            sample, total = _sample(source, dims, calibration_queries, seed)
            if total == 0:
                raise ValueError(EMPTY)
            source = blocks()
        exact = ExactTopK(*calibration_rows(calibration, sample, calibration_queries, seed),
                          k=calibration_k)
    with atomic_dir(out_dir) as tmp:
        parts, ids, index, on_gpu = [], [], None, False
        for new_part, chunk_ids, rows in _chunks(source, dims, spec.max_vectors_per_index,
                                                   shard_groups, add_batch):
            if new_part and index is not None:
                parts.append(_write_part(index, on_gpu, ids, tmp, len(parts)))
                ids, index = [], None
            if index is None:
                index, on_gpu = device.put(faiss.clone_index(template))
            index.add(rows)
            ids.extend(chunk_ids)
            if exact is not None:
                exact.add(rows)
        if index is None:
            raise ValueError(EMPTY)
        parts.append(_write_part(index, on_gpu, ids, tmp, len(parts)))
        del index, ids  # free RAM: the calibration below searches the written parts
        search = {"nprobe": spec.nprobe if is_ivf else None,
                  "ef_search": spec.ef_search if is_hnsw else None}
        report = None
        if exact is not None:
            written = {"dims": dims, "part_files": parts}
            search[param], report = _calibrate(FaissIndex._open(tmp, written, mmap=True), param,
                                               exact, spec.target_recall)
        info = IndexInfo(
            path=str(Path(out_dir)), factory=factory, factory_requested=spec.factory,
            dims=dims, vectors=sum(p["vectors"] for p in parts), parts=len(parts),
            part_files=parts, build_seconds=round(time.perf_counter() - t0, 3),
            bytes=sum(p["bytes"] for p in parts), metric="inner_product",
            nprobe=search["nprobe"], hnsw_ef_search=search["ef_search"],
            trained_on=trained_on, gpu=on_gpu, calibration=report,
        )
        meta = {"format_version": FORMAT_VERSION, "faiss_version": faiss.__version__,
                **{k: v for k, v in asdict(info).items() if k != "path"}}
        (tmp / INFO_FILE).write_text(json.dumps(meta, indent=2))
    return info


def _read_index(path: Path, mmap: bool) -> faiss.Index:
    """Read one part; with ``mmap`` try zero-copy mapping, then IVF-list mapping, then RAM.

    ``IO_FLAG_MMAP_IFC`` maps flat codes, HNSW storage and IVF lists (faiss >= 1.9);
    ``IO_FLAG_MMAP`` maps IVF inverted lists only. Index types supporting neither are
    read into memory, with a warning.
    """
    if not mmap:
        return faiss.read_index(str(path))
    flags = [getattr(faiss, "IO_FLAG_MMAP_IFC", None), faiss.IO_FLAG_MMAP]
    for flag in (f for f in flags if f is not None):
        try:
            return faiss.read_index(str(path), flag | faiss.IO_FLAG_READ_ONLY)
        except RuntimeError:
            continue
    warnings.warn(f"{path.name}: this index type cannot be memory-mapped; reading it into RAM",
                  stacklevel=3)
    return faiss.read_index(str(path))


class FaissIndex:
    """A loaded (possibly multi-part) index; ``search`` merges parts by score."""

    def __init__(self, parts: list[faiss.Index], ids: list[np.ndarray], info: dict):
        self.parts, self.ids, self.info = parts, ids, info
        self.dims = int(info["dims"])
        self.ntotal = sum(int(p.ntotal) for p in parts)
        if self.ntotal == 0:
            raise ValueError("empty index: it holds no vectors")

    def __len__(self) -> int:
        return self.ntotal

    @classmethod
    def load(cls, path, mmap: bool = True, nprobe: int | None = None,
             ef_search: int | None = None) -> FaissIndex:
        """Load a directory written by ``build_index``.

        mmap: memory-map the parts and doc ids read-only (see ``_read_index``) so an index
            larger than RAM can be searched. nprobe / ef_search override the saved values
            (``index.json``; calibrated ones when the build config said ``"auto"``).
        """
        path = Path(path)
        if not (path / INFO_FILE).is_file():
            raise FileNotFoundError(f"{path} is not an index directory (no {INFO_FILE})")
        info = json.loads((path / INFO_FILE).read_text())
        index = cls._open(path, info, mmap)
        index.set_search_params(nprobe or info.get("nprobe"),
                                ef_search or info.get("hnsw_ef_search"))
        return index

    @classmethod
    def _open(cls, path: Path, info: dict, mmap: bool) -> FaissIndex:
        """The parts listed in ``info["part_files"]`` under ``path``, FAISS defaults kept."""
        parts, ids = [], []
        for part in info["part_files"]:
            parts.append(_read_index(path / part["index"], mmap))
            ids.append(np.load(path / part["ids"], mmap_mode="r" if mmap else None,
                               allow_pickle=False))
        return cls(parts, ids, info)

    def set_search_params(self, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Set every part's IVF ``nprobe`` (capped at its list count) and HNSW ``efSearch``;
        None leaves a value as it is, and index types without the parameter ignore it."""
        for index in self.parts:
            ivf = faiss.try_extract_index_ivf(index)
            if ivf is not None and nprobe:
                ivf.nprobe = min(int(nprobe), ivf.nlist)
            hnsw = _hnsw(index)
            if hnsw is not None and ef_search:
                hnsw.hnsw.efSearch = int(ef_search)

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` documents by inner product for each query row.

        queries: ``[q, d]``. Returns ``(doc_ids [q][k'], scores [q, k'] float32)`` with
        ``k' = min(k, len(self))``, best first, ties broken by doc id. An approximate index
        that finds fewer than ``k'`` hits pads with doc id ``""`` and score ``-inf``.
        """
        queries = np.asarray(queries)
        if queries.ndim != 2:
            raise ValueError(f"queries must be 2-D [q, d], got shape {queries.shape}")
        if queries.shape[1] != self.dims:
            raise ValueError(f"dims mismatch: queries have {queries.shape[1]} dims, "
                             f"the index has {self.dims}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.ntotal)
        scores, names = [], []
        for index, ids in zip(self.parts, self.ids):
            dist, label = index.search(queries, min(k, int(index.ntotal)))
            hit = label >= 0
            scores.append(np.where(hit, dist, -np.inf).astype(np.float32))
            names.append(np.where(hit, ids[np.where(hit, label, 0)], ""))
        scores, names = np.concatenate(scores, axis=1), np.concatenate(names, axis=1)
        order = np.lexsort((names, -scores), axis=-1)[:, :k]
        top = np.take_along_axis(names, order, axis=1)
        return top.tolist(), np.take_along_axis(scores, order, axis=1)


def recall_at_k(approx_ids: Sequence[Sequence[str]], exact_ids: Sequence[Sequence[str]],
                k: int) -> float:
    """Mean over queries of ``|approx[:k] ∩ exact[:k]| / |exact[:k]|``."""
    if len(approx_ids) != len(exact_ids) or not len(exact_ids):
        raise ValueError(f"need the same non-zero number of queries, got {len(approx_ids)} "
                         f"approximate and {len(exact_ids)} exact")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = [len(set(a[:k]) & set(e[:k])) / max(1, len(e[:k]))
            for a, e in zip(approx_ids, exact_ids)]
    return float(np.mean(hits))


def self_recall(index: FaissIndex, sample_vectors: np.ndarray, sample_ids: Sequence[str],
                k: int = 10) -> float:
    """Fraction of indexed rows ``sample_vectors [s, d]`` whose own id is in their top-k."""
    if len(sample_ids) != len(sample_vectors) or not len(sample_ids):
        raise ValueError(f"need the same non-zero number of vectors and ids, got "
                         f"{len(sample_vectors)} and {len(sample_ids)}")
    found, _ = index.search(sample_vectors, k)
    return float(np.mean([sid in row for sid, row in zip(sample_ids, found)]))
