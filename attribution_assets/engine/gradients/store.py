"""On-disk gradient shards: ``gradients.npy`` ``[rows, dims]`` + ``info.json``.

``info.json`` schema (``format_version`` 1)::

    format_version    int, 1
    rows, dims        int, the shape of gradients.npy
    dtype             "float32" | "float16"
    modules           [{name, start, stop, shape: [p_out, p_in] | [O, I], has_bias}], one entry
                      per block: a whole module, or (``split: head``) one head of an attention
                      projection, which adds {module, layer, head, kind: q|k|v|o} (the output
                      projection's bias block: head null, shape [p] | [O]); see gradients/heads.py
    doc_ids           [str], one per document
    per_token         bool
    per_token_mode    "positional" | "loss" | null (absent in older stores: "loss")
    token_offsets     [int] of len n_docs + 1 (rows of doc i: offsets[i]:offsets[i+1]) | null
    token_positions   [int] per row, its token index t in its document | null
    projection        {dim, kind, seed}
    normalizer        {kind, eps, bias_correction} | null (settings only, never arrays)
    model_fingerprint str
    config_hash       str
    producer          str, the code version that wrote it ("" when written outside a pipeline)
    training          {steps: [int], epochs: [float]}, one entry per row: the optimizer step and
                      epoch of train-time rows (engine/training/recorder.py); absent post hoc
    advantage_weighting "grpo" | "dr_grpo", with sequence_weights [float] per document: each
                      document's rows are times its weight (engine/io/advantages.py); absent
                      without advantage weighting

Writes are atomic: a temporary sibling directory is filled, then renamed onto
the final path (an existing shard is moved aside first and removed after).
Reads memory-map with ``allow_pickle=False``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.digests import chain_digest, json_digest
from attribution_assets.spec import GradientSpec

FORMAT_VERSION = 1
ARRAY_FILE = "gradients.npy"
INFO_FILE = "info.json"
_COMPAT_KEYS = ("projection", "normalizer", "modules", "dims", "model_fingerprint")
BLOCK_BYTES = 64 << 20  # rows written, hashed and checked at a time


def rows_hash(gradients: GradientSpec, normalizer_settings: dict | None = None) -> str:
    """SHA-256 (16 hex) of the settings that change the rows (``config_hash`` in a store's
    ``info.json``): every ``GradientSpec`` field but the batch budget and the optimizer-state
    path, plus the normalizer's settings (the optimizer state itself is not hashed). Settings
    at the values older stores were written with hash as they did then (``per_token`` none/loss
    as false/true, no ``split`` key for ``module``), so those stores stay valid."""
    payload = {
        "projection_dim": gradients.projection_dim, "projection_kind": gradients.projection_kind,
        "seed": gradients.seed, "include": list(gradients.include), "exclude": list(gradients.exclude),
        "include_bias": gradients.include_bias,
        "per_token": {"none": False, "loss": True}.get(gradients.per_token, gradients.per_token),
        "dtype": gradients.dtype, **({"split": gradients.split} if gradients.split != "module" else {}),
        "normalizer": None if gradients.normalizer == "none" else gradients.normalizer,
        "normalizer_settings": normalizer_settings,
    }
    return json_digest(payload)


def _cast(block: np.ndarray, modules: list[dict], dtype: str, first_row: int) -> np.ndarray:
    """Rows ``block`` (starting at row ``first_row``) as a C-ordered ``dtype`` array (no copy
    for float32 input stored as float32); raise naming the module if a value is or becomes
    non-finite."""
    src = np.asarray(block, dtype=np.float32)
    with np.errstate(over="ignore", invalid="ignore"):  # reported per module below
        out = np.ascontiguousarray(src, dtype=dtype)
    for m in modules:
        part = out[:, m["start"] : m["stop"]]
        if not np.isfinite(part).all():
            rows = f"rows {first_row}:{first_row + len(block)}"
            if np.isfinite(src[:, m["start"] : m["stop"]]).all():
                peak = float(np.abs(src[:, m["start"] : m["stop"]]).max())
                raise ValueError(
                    f"module {m['name']!r}: values overflow {dtype} "
                    f"(max |x| = {peak:.3g}, {rows}); store as float32 or rescale"
                )
            raise ValueError(f"module {m['name']!r}: gradients contain NaN or Inf ({rows})")
    return out


def _block_rows(dims: int, itemsize: int) -> int:
    """Rows per block of about :data:`BLOCK_BYTES`."""
    return max(1, BLOCK_BYTES // max(1, dims * itemsize))


def _write_array(path: Path, array: np.ndarray, modules: list[dict], dtype: str) -> None:
    """``array`` as a ``.npy`` file of ``dtype``, cast and checked block by block (never a
    second full copy of the rows in memory)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(n) for n in array.shape)}
    step = _block_rows(array.shape[1], 4)
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, array.shape[0], step):
            f.write(_cast(array[start : start + step], modules, dtype, start).data)


def write_store(
    path,
    array: np.ndarray,
    info: dict,
    *,
    doc_ids: Sequence[str],
    model_fingerprint: str,
    dtype: str = "float32",
) -> GradientStore:
    """Write ``array [rows, dims]`` and ``info`` (as from ``GradientCollector.collect``)."""
    path = Path(path)
    modules = info["modules"]
    if dtype not in ("float32", "float16"):
        raise ValueError(f"store dtype must be 'float32' or 'float16', got {dtype!r}")
    if array.ndim != 2 or array.shape[1] != info["dims"]:
        raise ValueError(f"array shape {array.shape} does not match dims={info['dims']}")
    per_token = bool(info.get("per_token"))
    offsets = info.get("token_offsets")
    n_docs = len(offsets) - 1 if per_token else array.shape[0]
    if len(doc_ids) != n_docs:
        raise ValueError(f"{len(doc_ids)} doc_ids for {n_docs} documents")
    meta = {
        "format_version": FORMAT_VERSION,
        "rows": int(array.shape[0]),
        "dims": int(array.shape[1]),
        "dtype": dtype,
        "modules": modules,
        "doc_ids": [str(d) for d in doc_ids],
        "per_token": per_token,
        "per_token_mode": info.get("per_token_mode", "loss") if per_token else None,
        "token_offsets": offsets if per_token else None,
        "token_positions": info.get("token_positions") if per_token else None,
        "projection": info["projection"],
        "normalizer": info.get("normalizer"),
        "model_fingerprint": model_fingerprint,
        "config_hash": info.get("config_hash", ""),
        "producer": info.get("producer", ""),
    }
    for optional in ("training", "advantage_weighting", "sequence_weights"):
        if info.get(optional) is not None:
            meta[optional] = info[optional]
    with atomic_dir(path) as tmp:
        _write_array(tmp / ARRAY_FILE, array, modules, dtype)
        (tmp / INFO_FILE).write_text(json.dumps(meta, indent=1))
    return GradientStore(path)


class GradientStore:
    """Read-only, memory-mapped view of one shard directory."""

    def __init__(self, path):
        self.path = Path(path)
        info_path = self.path / INFO_FILE
        try:
            self.info = json.loads(info_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"gradient store {self.path}: missing {info_path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"gradient store: {info_path} is not valid JSON ({e})") from None
        if not isinstance(self.info, dict) or self.info.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"gradient store: {info_path} has no format_version {FORMAT_VERSION}")
        missing = [k for k in ("rows", "dims", "dtype", "modules", "doc_ids") if k not in self.info]
        if missing:
            raise ValueError(f"gradient store: {info_path} lacks keys {missing}")
        array_path = self.path / ARRAY_FILE
        try:
            self.array = np.load(array_path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"gradient store: missing {array_path}") from None
        except ValueError as e:
            raise ValueError(
                f"gradient store: {array_path} is unreadable or truncated ({e})"
            ) from None
        want = (self.info["rows"], self.info["dims"])
        if self.array.shape != want or str(self.array.dtype) != self.info["dtype"]:
            raise ValueError(
                f"gradient store: {array_path} holds {self.array.dtype}{list(self.array.shape)} "
                f"but {info_path} says {self.info['dtype']}{list(want)}"
            )

    @property
    def rows(self) -> int:
        return self.info["rows"]

    @property
    def dims(self) -> int:
        return self.info["dims"]

    @property
    def doc_ids(self) -> list[str]:
        return self.info["doc_ids"]

    @property
    def module_names(self) -> list[str]:
        """Hooked modules in column order (a module split by head is named once)."""
        return list(dict.fromkeys(m.get("module", m["name"]) for m in self.info["modules"]))

    def module_slice(self, name: str) -> slice:
        """Column range of a module (all its blocks: weight, then bias if any) or of one block."""
        found = [m for m in self.info["modules"] if name in (m["name"], m.get("module"))]
        if not found:
            raise KeyError(f"module {name!r} not in store {self.path}; have {self.module_names}")
        return slice(found[0]["start"], found[-1]["stop"])

    def module_view(self, name: str) -> np.ndarray:
        """``[rows, stop - start]`` view of one module's columns."""
        return self.array[:, self.module_slice(name)]

    def document_rows(self) -> np.ndarray:
        """``[n_docs, dims]``: the rows, or per-token rows summed per document."""
        return document_rows(self.array, self.info)

    def blocks(self) -> Iterator[np.ndarray]:
        """The rows in consecutive blocks of about :data:`BLOCK_BYTES`, read with plain file
        reads into one reused buffer (each block is valid until the next one is read): unlike
        touching the memory map, reading them leaves nothing resident."""
        step = _block_rows(self.dims, self.array.itemsize)
        buffer = np.empty((min(step, self.rows), self.dims), dtype=self.array.dtype)
        with (self.path / ARRAY_FILE).open("rb") as f:
            f.seek(self.array.offset)
            for start in range(0, self.rows, step):
                block = buffer[: min(step, self.rows - start)]
                if block.size and f.readinto(block.reshape(-1).view(np.uint8)) != block.nbytes:
                    raise ValueError(f"gradient store {self.path}: {ARRAY_FILE} is truncated")
                yield block

    def all_finite(self) -> bool:
        """Whether every stored value is finite (read block by block)."""
        return all(np.isfinite(block).all() for block in self.blocks())

    def digest(self) -> str:
        """Content hash (settings, model fingerprint, array bytes): the store's data version."""
        def parts():
            yield str(self.info.get("config_hash", ""))
            yield str(self.info.get("model_fingerprint", ""))
            for block in self.blocks():
                yield block.data
        return chain_digest(parts())

    def doc_rows(self, i: int) -> np.ndarray:
        """Rows of document ``i``: ``[n_targets, dims]`` per token, else ``[1, dims]``."""
        offsets = self.info.get("token_offsets")
        if self.info.get("per_token") and offsets is not None:
            return self.array[offsets[i] : offsets[i + 1]]
        return self.array[i : i + 1]


def check_compatible(a, b) -> None:
    """Raise ``ValueError`` if two stores (or their infos) cannot be scored together."""
    a_info = a.info if isinstance(a, GradientStore) else a
    b_info = b.info if isinstance(b, GradientStore) else b
    for key in _COMPAT_KEYS:
        if a_info.get(key) != b_info.get(key):
            raise ValueError(
                f"incompatible gradient stores: {key} differs "
                f"({a_info.get(key)!r} vs {b_info.get(key)!r})"
            )


def document_rows(array: np.ndarray, info: dict) -> np.ndarray:
    """``[n_docs, dims]``: ``array`` itself, or per-token rows summed per document
    (a document's token rows sum exactly to its document row)."""
    if not info.get("per_token"):
        return array
    offsets = np.asarray(info["token_offsets"], dtype=np.int64)
    counts = np.diff(offsets)
    out = np.zeros((len(counts), array.shape[1]), dtype=np.float32)
    if (counts > 0).any():  # a document without rows sums to zero
        out[counts > 0] = np.add.reduceat(array, offsets[:-1][counts > 0], axis=0, dtype=np.float32)
    return out
