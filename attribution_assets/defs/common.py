"""Shared helpers for the Dagster layer: keys, partitions, code versions, metadata."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg

from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss
from attribution_assets.spec import PipelineSpec


def shards_partitions(spec: PipelineSpec) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec.name}_shards")


def key(spec: PipelineSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def code_version(base: str, spec: PipelineSpec, *sections: str) -> str:
    """Code version = implementation version + hash of the spec sections the asset reads."""
    return f"{base}-{spec.section_hash(*sections)}" if sections else base


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def path_metadata(path: Path) -> dg.MetadataValue:
    return dg.MetadataValue.path(str(path))


class Timer:
    """Seconds and peak resident memory since it was made. Making one starts a new peak
    window for the process (``engine.runtime.reset_peak_rss``): make one per step, or per
    partition of a multi-partition step."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        reset_peak_rss()

    @property
    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 3)

    @property
    def peak_rss_mb(self) -> float:
        return round(peak_rss_mb(), 1)
