"""FAISS inner-product indexes over training-gradient vectors (pure NumPy/FAISS): the index
directory's layout, loading and searching it; ``search.build`` writes it.

Conventions: vectors are float32 rows ``[n, d]`` (already preconditioned and
unit-normalized by the caller when the pipeline asks for it); the metric is
always inner product, so a higher score means a more supportive document and a
``Flat`` index returns exactly ``queries @ vectors.T``. Every vector carries a
string document id.

Search parameters: an IVF index's ``nprobe`` and an HNSW index's ``efSearch`` trade speed
for recall, and the right value depends on the data and on the queries (a fixed nprobe
that is ample for clustered data misses badly for queries far from every cluster). With
``"auto"`` (the default) ``build_index`` calibrates the parameter to reach
``target_recall`` and saves it as the index's default; see ``search.calibration``.

On-disk layout of an index directory (written to a temporary sibling and
renamed into place only when complete)::

    index.json          factory, dims, vectors, parts, build_seconds, bytes, metric,
                        nprobe, hnsw_ef_search, calibration, ...
    index-00000.faiss   one FAISS index per part (faiss.write_index, always a CPU index)
    ids-00000.npy       doc ids of that part's rows, unicode array (no pickle)
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

FORMAT_VERSION = 1
INFO_FILE = "index.json"


def _hnsw(index: faiss.Index) -> faiss.IndexHNSW | None:
    """The HNSW index ``index`` is (also under a pre-transform), else None."""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


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
