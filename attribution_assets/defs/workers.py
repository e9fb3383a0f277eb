"""Runs of one job in worker processes: a stage's shard ranges, an on-demand asset's partitions.

The runner (``defs/runner.py``) decides what runs; this module runs it. Each run is one
``execute_in_process`` of a named job in a worker process (``ProcessPoolExecutor``), ``workers``
at once. Workers fork from one forkserver that imported torch, transformers, Dagster and the
definitions once (fresh state: it never ran a torch op or opened the instance), so every later
batch of runs starts without re-importing them. A worker rebuilds the definitions from the recipe
that ``build_definitions`` records (specs + profile) through Dagster's
``build_reconstructable_job``. Runs are independent: one that fails does not stop the others;
:func:`run_in_workers` raises after all of them ended, naming each failed run.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import dagster as dg
from dagster._core.definitions.reconstruct import ReconstructableJob, build_reconstructable_job
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)
from dagster._core.utils import make_new_run_id

from attribution_assets.defs.common import record_partition_versions
from attribution_assets.defs.profiles import profile_from_json

#: Definitions metadata key of the recipe (specs + profile, JSON) that rebuilds them in a worker.
RECIPE_KEY = "attribution/recipe"
WORKER_PRELOAD = ("torch", "transformers", "dagster", "attribution_assets.defs.factory")


class WorkerRunsError(RuntimeError):
    """Runs in worker processes failed; ``failed_in`` names the step and partitions of the failed
    run that ended first (the message names every failed run)."""

    def __init__(self, message: str, failed_in: str):
        super().__init__(message)
        self.failed_in = failed_in


def recipe_of(defs: dg.Definitions) -> str | None:
    """The recipe (JSON: specs + profile) ``build_definitions`` recorded in ``defs``, if any."""
    value = (defs.metadata or {}).get(RECIPE_KEY)
    return None if value is None else getattr(value, "value", value)


def profile_workers(recipe: str | None) -> int:
    """Worker processes of the recipe's profile (1 without one); a ``k8s`` profile is refused:
    its runs are launched by the Dagster deployment on the cluster, not by this process."""
    if recipe is None:
        return 1
    profile = profile_from_json(json.loads(recipe)["profile"])
    if profile.executor == "k8s":
        raise ValueError(f"Profile {profile.name!r} runs steps as Kubernetes jobs: launch its runs through the "
                         "Dagster deployment on the cluster (the UI, a backfill, `dagster job launch`), "
                         "not through this local runner.")
    return profile.workers


def reconstructable_job(recipe: str, name: str, executor: str | None = None) -> ReconstructableJob:
    """The job ``name`` of the definitions ``recipe`` describes, rebuildable in another process
    (``executor`` overrides the profile's executor kind)."""
    return build_reconstructable_job("attribution_assets.defs.factory", "job_from_recipe",
                                     reconstructable_args=(recipe, name, executor))


def failed_step(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """``pipeline/asset`` of the step that failed in ``run_id`` (None if no step failed)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        step = record.event_log_entry.step_key
        if step:
            return step.replace("__", "/", 1)
    return None


def range_run(first: str | None, last: str | None) -> tuple[str, dict[str, str]]:
    """The label (`` [first .. last]``) and tags of a run over a contiguous shard range
    (``first is None``: an unpartitioned run)."""
    if first is None:
        return "", {}
    label = f" [{first}]" if first == last else f" [{first} .. {last}]"
    return label, {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def partition_run(partition: str) -> tuple[str, dict[str, str]]:
    """The label and tags of a run of one partition."""
    return f" [{partition}]", {PARTITION_NAME_TAG: partition}


def _step_errors(result) -> str:
    failures = result.get_step_failure_events()
    return "; ".join(f"{e.step_key}: {e.event_specific_data.error.message.strip()}" for e in failures) \
        or "the run failed before any step"


def run_in_worker(recipe: str, name: str, instance_ref, keys: list[list[str]], run_id: str, tags: dict,
                  run_config: dict) -> str | None:
    """In a worker process: run job ``name`` over the partitions its ``tags`` name, in this process,
    and record each shard's data version; return None, or the failed steps' errors."""
    instance = dg.DagsterInstance.from_ref(instance_ref)
    job = reconstructable_job(recipe, name, "in_process").get_definition()
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(k) for k in keys],
                                    run_id=run_id, tags=tags, run_config=run_config, raise_on_error=False)
    if not result.success:
        return _step_errors(result)
    record_partition_versions(instance, result)
    return None


def run_in_workers(recipe: str, name: str, instance: dg.DagsterInstance, keys: list[dg.AssetKey],
                   runs: Sequence[tuple[str, dict[str, str]]], workers: int, tags: dict, run_config: dict,
                   log: Callable[[str], None], what: str) -> list:
    """Each of ``runs`` (label, partition tags: :func:`range_run`, :func:`partition_run`) a run of job
    ``name`` in a worker process, ``workers`` at once; return their ``DagsterRun`` records, or raise
    :class:`WorkerRunsError` after all ended if any failed. ``what`` (e.g. ``demo/lds_retrain``)
    names the runs in the log and in errors whose failed step is unknown."""
    if not instance.is_persistent:
        raise ValueError("Running in worker processes needs a persistent Dagster instance (one under "
                         "$DAGSTER_HOME, e.g. `persistent_instance()`), not an ephemeral one; or use the "
                         "`local` profile.")
    log(f"{what}: {len(runs)} runs in {min(workers, len(runs))} worker processes")
    failures, records = [], []
    context = get_context("forkserver")  # no forked torch thread pools or sqlite handles
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    with ProcessPoolExecutor(max_workers=min(workers, len(runs)), mp_context=context) as pool:
        futures = {}
        for label, run_tags in runs:
            run_id = make_new_run_id()
            future = pool.submit(run_in_worker, recipe, name, instance.get_ref(), [list(k.path) for k in keys],
                                 run_id, {**tags, **run_tags}, run_config)
            futures[future] = (label, run_id)
        for ended, future in enumerate(as_completed(futures), 1):
            label, run_id = futures[future]
            error = future.result()
            records.append(instance.get_run_by_id(run_id))
            if error is not None:
                where = (failed_step(instance, run_id) or what) + label
                failures.append((where, error, run_id))
                log(f"{ended}/{len(runs)} failed: {where} (run {run_id}): {error}")
            else:
                log(f"{ended}/{len(runs)} done: {what}{label} (run {run_id})")
    if failures:
        raise WorkerRunsError("; ".join(f"{where} (run {run_id}): {error}" for where, error, run_id in failures),
                            failures[0][0])
    return records
