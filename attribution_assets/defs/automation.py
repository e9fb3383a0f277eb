"""Automation: when each asset rebuilds, the new-data sensor and the rebuild schedule.

* Per-shard assets rebuild for a new shard (missing), a changed code version (the
  spec sections they read are hashed into it) or an updated upstream partition.
* ``tokenized_shards`` ignores re-materializations of ``corpus``: shards are
  append-only, so new data costs only the new shards' work.
* Fan-in assets (``autocorrelation``, ``kfac_factors``) rebuild when missing, when
  their code version changes, or from the pipeline's schedule / on demand, never once per
  new shard. A new K-FAC eigenbasis re-runs every shard's ``ekfac_correction``, then
  ``ekfac_eigenvalues`` (which waits for the corrections, not for the eigenbasis).
* The sensor watches a pipeline's corpus directory and re-materializes ``corpus`` when
  its files change; the conditions above then fill in the new shards.
"""

from pathlib import Path

import dagster as dg

from attribution_assets.defs.common import key
from attribution_assets.engine.io.digests import json_digest
from attribution_assets.engine.io.records import FORMAT_BY_SUFFIX
from attribution_assets.spec import PipelineSpec

GUARDS = ~dg.AutomationCondition.any_deps_missing() & ~dg.AutomationCondition.any_deps_in_progress() \
    & ~dg.AutomationCondition.in_progress()


def rebuild_condition(*, on_deps_updated: bool = True,
                      ignore: tuple[dg.AssetKey, ...] = ()) -> dg.AutomationCondition:
    """Missing, code version changed, or (optionally) an upstream update; guarded."""
    trigger = dg.AutomationCondition.newly_missing() | dg.AutomationCondition.code_version_changed()
    if on_deps_updated:
        updated = dg.AutomationCondition.any_deps_updated()
        if ignore:
            updated = updated.ignore(dg.AssetSelection.assets(*ignore))
        trigger = trigger | updated
    return (trigger.since_last_handled() & GUARDS).with_label(
        "missing, code changed" + (", or upstream updated" if on_deps_updated else ""))


def watched_directory(spec: PipelineSpec) -> Path | None:
    """The corpus directory a new-data sensor watches (None for files, hub data and the demo)."""
    if spec.is_demo or not spec.corpus.path:
        return None
    path = Path(spec.corpus.path)
    return path if path.is_dir() else None


def directory_state(directory: Path) -> str:
    """Digest of the data files' names, sizes and modification times."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in directory.iterdir()
                   if p.suffix in FORMAT_BY_SUFFIX)
    return json_digest(files)


def new_data_sensor(spec: PipelineSpec) -> dg.SensorDefinition | None:
    directory = watched_directory(spec)
    if directory is None:
        return None

    @dg.sensor(name=f"{spec.name}_new_data", target=[key(spec, "corpus")], minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Re-reads the corpus when files in {directory} change; new documents "
                           "become new shard partitions.")
    def sensor(context: dg.SensorEvaluationContext):
        state = directory_state(directory)
        if state == context.cursor:
            return dg.SkipReason(f"no change in {directory}")
        return dg.SensorResult(run_requests=[dg.RunRequest(run_key=state)], cursor=state)

    return sensor


def rebuild_schedule(spec: PipelineSpec) -> dg.ScheduleDefinition | None:
    """Periodic rebuild of the fan-in assets (off until switched on in the UI)."""
    if spec.queries is None:
        return None
    names = ("kfac_factors", "kfac_eigendecomposition") if spec.scoring.kronecker else \
        ("autocorrelation", "preconditioner")  # EK-FAC's corrections follow by automation
    targets = [key(spec, name) for name in names]
    if spec.index.enabled and spec.scoring.mode == "stored":
        targets.append(key(spec, "faiss_index"))
    return dg.ScheduleDefinition(name=f"{spec.name}_rebuild", cron_schedule=spec.schedule or "0 3 * * *",
                                 target=targets, default_status=dg.DefaultScheduleStatus.STOPPED,
                                 description="Rebuilds the preconditioner and index over every shard; "
                                             "score tables follow through their automation conditions.")
