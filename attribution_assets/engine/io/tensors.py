"""Safetensors files written and read one tensor at a time, so that a set of large matrices
(TrackStar's per-module ``p² x p²`` float64 blocks) never needs two copies in memory.

:func:`write_safetensors` streams arrays into the standard format (8-byte little-endian
header size, JSON header, raw little-endian C-order data) from a function called once per
tensor, in order; ``safetensors.numpy.load_file`` reads the result. :class:`StoredTensors`
is a read-only mapping over such a file that reads a tensor when it is asked for.
"""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

_CODES = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
          np.dtype(np.int64): "I64", np.dtype(np.int32): "I32"}


def write_safetensors(path: str | Path, entries: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    """Write ``entries`` (``(key, shape, dtype)``, in file order) to ``path``; ``produce(key)``
    returns each tensor when its turn comes (it is cast to ``dtype`` and checked against
    ``shape``), so at most one produced tensor is alive at a time."""
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, shape, dtype in entries:
        dtype = np.dtype(dtype)
        if dtype not in _CODES:
            raise ValueError(f"tensor {key!r}: dtype {dtype} is not supported; use one of "
                             f"{sorted(str(d) for d in _CODES)}")
        size = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        header[key] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    path = Path(path)
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for key, shape, dtype in entries:
            array = np.ascontiguousarray(produce(key), dtype=np.dtype(dtype).newbyteorder("<"))
            if array.shape != tuple(shape):
                raise ValueError(f"tensor {key!r} has shape {array.shape}, the header says {tuple(shape)}")
            f.write(array.data)
            del array
    return path


class StoredTensors(Mapping[str, np.ndarray]):
    """Read-only mapping ``key -> array`` over a safetensors file; each access reads that
    tensor into a fresh array (one allocation, no intermediate buffer), so holding the
    mapping costs no memory. The file stays open: replacing it on disk (an atomic rewrite)
    does not change what this mapping reads."""

    def __init__(self, path: str | Path, keys: Mapping[str, str] | None = None):
        """``keys``: mapping name -> key in the file (default: every key under its own name)."""
        self.path = Path(path)
        self._file = self.path.open("rb")
        self._lock = threading.Lock()
        try:
            (size,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(size))
        except (struct.error, ValueError) as exc:
            self._file.close()
            raise ValueError(f"{self.path} is not a readable safetensors file ({exc})") from None
        header.pop("__metadata__", None)
        self._start = 8 + size
        self._keys = dict(keys) if keys is not None else {k: k for k in sorted(header)}
        missing = sorted(set(self._keys.values()) - set(header))
        if missing:
            self._file.close()
            raise ValueError(f"{self.path} lacks tensors {missing[:4]}"
                             + (f" (and {len(missing) - 4} more)" if len(missing) > 4 else ""))
        dtypes = {code: dtype for dtype, code in _CODES.items()}
        self._entries = {}
        for name, key in self._keys.items():
            entry = header[key]
            if entry["dtype"] not in dtypes:
                self._file.close()
                raise ValueError(f"{self.path}: tensor {key!r} has unsupported dtype {entry['dtype']}")
            self._entries[name] = (dtypes[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"][0])

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def __getitem__(self, name: str) -> np.ndarray:
        dtype, shape, offset = self._entries[name]  # KeyError for unknown names
        array = np.empty(shape, dtype=dtype.newbyteorder("<"))
        with self._lock:
            self._file.seek(self._start + offset)
            read = self._file.readinto(array.reshape(-1).view(np.uint8)) if array.size else 0
        if read != array.nbytes:
            raise ValueError(f"{self.path}: tensor {self._keys[name]!r} is truncated")
        return array.astype(dtype, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
