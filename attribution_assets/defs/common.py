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


def record_partition_versions(instance: dg.DagsterInstance, run_id: str) -> int:
    """After run ``run_id`` materialized several partitions of an asset in one step, record each
    partition's ``content_version`` as its data version; return how many.

    Dagster gives a step one data version for all its partitions, so one shard's content could
    not otherwise tell its downstream shards that nothing changed. Each partition gets one more
    materialization, reported in the run itself (its id, job and step: the UI links the shard to
    its run) with the run's tags, the shard's version and its inputs' versions from the same run;
    then the run's check evaluations of that asset are reported again, aimed at the asset's last
    new materialization, which updates the run's check executions (one per check and run), so the
    UI shows them against the latest materialization."""
    from dagster._core.definitions.asset_checks.asset_check_evaluation import (
        AssetCheckEvaluationTargetMaterializationData,
    )
    from dagster._core.events import DagsterEvent, StepMaterializationData
    from dagster_shared.record import replace

    def of_type(event_type):
        return [r.event_log_entry for r in instance.get_records_for_run(run_id, of_type=event_type,
                                                                         limit=100_000).records]

    entries = [e for e in of_type(dg.DagsterEventType.ASSET_MATERIALIZATION)
               if e.dagster_event.event_specific_data.materialization.partition
               and CONTENT_VERSION in e.dagster_event.event_specific_data.materialization.metadata]
    if len({e.dagster_event.event_specific_data.materialization.partition for e in entries}) < 2:
        return 0
    versions = {(m.asset_key, m.partition): m.metadata[CONTENT_VERSION].value
                for m in (e.dagster_event.event_specific_data.materialization for e in entries)}
    pointers: dict[tuple, str] = {}
    last: dict[dg.AssetKey, tuple[int, float]] = {}  # storage id, timestamp of each asset's last one
    for entry in entries:  # in run order: an upstream shard before the shards computed from it
        m = entry.dagster_event.event_specific_data.materialization
        tags = {**(m.tags or {}), DATA_VERSION_TAG: versions[(m.asset_key, m.partition)],
                DATA_VERSION_IS_USER_PROVIDED_TAG: "true"}
        for (upstream, partition), version in versions.items():  # inputs made in the same run
            tag = get_input_data_version_tag(upstream)
            if partition == m.partition and tag in tags:
                tags[tag] = version
                tags[get_input_event_pointer_tag(upstream)] = pointers[(upstream, partition)]
        own = dg.AssetMaterialization(asset_key=m.asset_key, partition=m.partition, metadata=m.metadata, tags=tags,
                                      description="the shard's own data version (the run's step covered "
                                                  "several shards)")
        instance.report_dagster_event(DagsterEvent(
            event_type_value=dg.DagsterEventType.ASSET_MATERIALIZATION.value, job_name=entry.job_name,
            step_key=entry.step_key, event_specific_data=StepMaterializationData(own)), run_id=run_id)
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=m.asset_key, asset_partitions=[m.partition]), limit=1).records
        pointers[(m.asset_key, m.partition)] = str(record.storage_id)
        last[m.asset_key] = (record.storage_id, record.timestamp)
    for entry in of_type(dg.DagsterEventType.ASSET_CHECK_EVALUATION):
        evaluation = entry.dagster_event.event_specific_data
        if evaluation.asset_key in last:
            storage_id, timestamp = last[evaluation.asset_key]
            instance.report_dagster_event(DagsterEvent(
                event_type_value=dg.DagsterEventType.ASSET_CHECK_EVALUATION.value, job_name=entry.job_name,
                step_key=entry.step_key, event_specific_data=replace(
                    evaluation, target_materialization_data=AssetCheckEvaluationTargetMaterializationData(
                        storage_id=storage_id, run_id=run_id, timestamp=timestamp))), run_id=run_id)
    return len(entries)


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
