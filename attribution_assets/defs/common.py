"""Shared helpers for the Dagster layer: keys, partitions, code versions, metadata."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import (
    CODE_VERSION_TAG,
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    DEFAULT_DATA_VERSION,
    extract_data_version_from_entry,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)
from dagster._core.definitions.source_asset import SYSTEM_METADATA_KEY_SOURCE_ASSET_OBSERVATION

from attribution_assets.defs.resources import ComputeResource
from attribution_assets.engine.progress import log_sink, reporting
from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss
from attribution_assets.spec import PipelineSpec


def shards_partitions(spec: PipelineSpec) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec.name}_shards")


def key(spec: PipelineSpec, name: str) -> dg.AssetKey:
    return dg.AssetKey([spec.name, name])


def code_version(base: str, spec: PipelineSpec, *sections: str) -> str:
    """Code version = implementation version + hash of the spec sections the asset reads."""
    return f"{base}-{spec.section_hash(*sections)}" if sections else base


def compute_version(compute: ComputeResource) -> str:
    """The compute settings that change gradient rows (precision, TF32), for the code version of
    every asset that runs the model."""
    return f"-{compute.precision}{'-tf32' if compute.allow_tf32 else ''}"


#: Metadata key of a shard's content digest: its data version (see :func:`shard_results`).
CONTENT_VERSION = "content_version"


def shard_results(context: dg.AssetExecutionContext, asset_key: dg.AssetKey, shards: dict[str, dict],
                  metadata: dict | None = None) -> Iterator:
    """The materializations of a step over shards: ``shards`` maps each shard the step wrote to its
    metadata (with its :data:`CONTENT_VERSION`); ``metadata`` is the step's own (explanations,
    step seconds) and goes on the last shard's materialization only, the one the asset's page
    shows, so the instance does not store it once per shard.

    One shard: Dagster's own materialization, the content digest its data version. Several:
    Dagster gives a step one data version for all its partitions, so one shard's content could not
    tell its downstream shards that nothing changed; instead each shard's materialization is logged
    here, in the run and step that made it, with its own data version, the asset's code version and
    its inputs' latest versions (the same shard of a partitioned input), and Dagster's own
    per-partition events are left out: one materialization per shard per run, and the step's checks
    then evaluate against the last of them."""
    common = metadata or {}
    if len(shards) == 1:
        (meta,) = shards.values()
        yield dg.MaterializeResult(asset_key=asset_key, metadata={**meta, **common},
                                   data_version=dg.DataVersion(meta[CONTENT_VERSION]))
        return
    graph = context.job_def.asset_layer.asset_graph
    upstream = sorted(context.assets_def.asset_deps[asset_key], key=lambda k: k.to_user_string())
    partitioned = {dep for dep in upstream if graph.has(dep) and graph.get(dep).partitions_def is not None}
    latest = context.instance.get_latest_data_version_record
    whole = {dep: latest(dep) for dep in upstream if dep not in partitioned}  # the same for every shard
    last = next(reversed(shards))
    for shard, meta in shards.items():
        tags = {CODE_VERSION_TAG: context.assets_def.code_versions_by_key[asset_key],
                DATA_VERSION_TAG: meta[CONTENT_VERSION], DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
        for dep in upstream:
            record = latest(dep, partition_key=shard) if dep in partitioned else whole[dep]
            version = extract_data_version_from_entry(record.event_log_entry) if record else None
            tags[get_input_data_version_tag(dep)] = (version or DEFAULT_DATA_VERSION).value
            if record is not None:
                tags[get_input_event_pointer_tag(dep)] = str(record.storage_id)
        yield dg.AssetMaterialization(asset_key=asset_key, partition=shard, tags=tags,
                                      metadata={**meta, **common} if shard == last else meta)
    # the marker Dagster's source-asset observations use: the output itself logs no asset events
    yield dg.MaterializeResult(asset_key=asset_key, metadata={SYSTEM_METADATA_KEY_SOURCE_ASSET_OBSERVATION: True})


def size_metadata(nbytes: int) -> dict:
    """Metadata of a size: ``size`` for people (``175046701`` -> ``"175.0 MB"``, decimal units)
    and ``size_mb`` (a number, which the UI plots over materializations)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return {"size": f"{nbytes / scale:.1f} {unit}", "size_mb": round(nbytes / 1e6, 3)}
    return {"size": f"{nbytes} B", "size_mb": round(nbytes / 1e6, 3)}


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


def progress_logs(context):
    """Long engine steps inside the block report to the step's Dagster log (throttled:
    ``engine.progress.log_sink``)."""
    return reporting(log_sink(context.log.info))
