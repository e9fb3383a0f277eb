"""Building an index directory (layout: ``search.index``) from streamed blocks of
training-gradient rows: the training sample, ``{auto}`` list counts, parts, GPU placement, and
the ``"auto"`` nprobe / efSearch calibrated against the exact top-k (``search.calibration``)."""

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
from attribution_assets.engine.search.index import FORMAT_VERSION, INFO_FILE, FaissIndex, _hnsw
from attribution_assets.spec import IndexSpec

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
    searches); see ``search.calibration``.
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
