"""Every content hash of the project in one place (SHA-256 unless an id format says SHA-1).

Digests are hex prefixes: 16 characters for data versions and fingerprints, 12 for spec
section hashes. None of them is a security boundary; they name content.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def json_digest(payload: Any, length: int = 16) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:length]


def parts_digest(parts: Iterable[str | bytes], length: int = 16) -> str:
    """SHA-256 over ``parts``, each followed by a NUL byte (so ``["ab"] != ["a", "b"]``)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:length]


def chain_digest(parts: Iterable[str | bytes | memoryview], length: int = 16) -> str:
    """SHA-256 over ``parts`` (text, bytes or buffers) concatenated (no separators): for
    fixed-layout byte streams."""
    h = hashlib.sha256()
    for part in parts:
        h.update(part.encode() if isinstance(part, str) else part)
    return h.hexdigest()[:length]


def files_digest(directory: str | Path, length: int = 16) -> str:
    """SHA-256 of every file under ``directory``: relative paths and bytes, sorted by path."""
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(directory)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:length]


def text_id(text: str, length: int) -> str:
    """SHA-1 hex prefix of ``text``: the content-hash document ids (``demo-...``, corpus rows)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:length]


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (SHA-256), the same in every process and Python version."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def model_fingerprint(model) -> str:
    """SHA-256 (16 hex) over a torch module's parameter names, shapes, dtypes and bytes."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".gguf")


def weights_stamp(name_or_path: str | Path) -> str:
    """Cheap content stamp of a local model directory: names, sizes and modification times of its
    weight, config and tokenizer files (SHA-256, 16 hex); "" when ``name_or_path`` is not a local
    directory (a hub id: its revision identifies it). Replacing weights in place changes it."""
    directory = Path(name_or_path).expanduser()
    if not directory.is_dir():
        return ""
    entries = sorted((str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    return json_digest(entries)
