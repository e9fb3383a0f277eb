"""Shared helpers for the Dagster layer: keys, partitions, versions, metadata."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path

import dagster as dg

from ..spec import PipelineSpec

STORAGE = "storage"
COMPUTE = "compute"


def model_resource_key(spec: PipelineSpec) -> str:
    return f"{spec.name}_model"


def shards_partitions(spec: PipelineSpec) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec.name}_shards")


def key(spec: PipelineSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def code_version(base: str, spec: PipelineSpec, *sections: str) -> str:
    """Code version = implementation version + hash of the spec sections the asset reads."""
    return f"{base}-{spec.section_hash(*sections)}" if sections else base


def digest(parts: Iterable[str | bytes]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else part.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)
