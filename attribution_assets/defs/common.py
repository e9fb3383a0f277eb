"""Shared helpers for the Dagster layer: keys, partitions, code versions, metadata."""

from __future__ import annotations

import time
from pathlib import Path

import dagster as dg
from dagster._core.definitions.data_version import (
    DATA_VERSION_IS_USER_PROVIDED_TAG,
    DATA_VERSION_TAG,
    get_input_data_version_tag,
    get_input_event_pointer_tag,
)

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


#: Metadata key of a shard's content data version in a run over several shards (where Dagster
#: records one version for all of them); the runner turns it into the shard's own data version.
CONTENT_VERSION = "content_version"


def record_partition_versions(instance: dg.DagsterInstance, events) -> int:
    """After a run over several partitions, record each partition's ``content_version`` as its
    data version: one more materialization per partition, with the run's own tags (code version,
    input provenance) and that version; return how many. ``events``: the run's materialization
    ``DagsterEvent`` s, in order."""
    materializations = [e.event_specific_data.materialization for e in events]
    partitioned = [m for m in materializations if m.partition and CONTENT_VERSION in m.metadata]
    if len({m.partition for m in partitioned}) < 2:
        return 0
    versions = {(m.asset_key, m.partition): m.metadata[CONTENT_VERSION].value for m in partitioned}
    pointers: dict[tuple, str] = {}
    for m in partitioned:  # in run order: an upstream shard before the shards computed from it
        tags = {**(m.tags or {}), DATA_VERSION_TAG: versions[(m.asset_key, m.partition)],
                DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
        for (upstream, partition), version in versions.items():  # inputs made in the same run
            tag = get_input_data_version_tag(upstream)
            if partition == m.partition and tag in tags:
                tags[tag] = version
                tags[get_input_event_pointer_tag(upstream)] = pointers[(upstream, partition)]
        instance.report_runless_asset_event(dg.AssetMaterialization(
            asset_key=m.asset_key, partition=m.partition, metadata=m.metadata, tags=tags,
            description="the shard's own data version (its run covered several shards)"))
        latest = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=m.asset_key, asset_partitions=[m.partition]), limit=1).records
        pointers[(m.asset_key, m.partition)] = str(latest[0].storage_id)
    return len(partitioned)


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
