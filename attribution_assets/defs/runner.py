"""Materialize a pipeline stage by stage (the CLI and tests): incremental by default.

Stages and what each needs are ``defs/planning.py``'s. A partitioned stage runs its shards in
ranges of the profile's ``shards_per_run`` (the backfill policy of every shard asset, so a UI
backfill makes the same runs; unset: one range per contiguous run of shards, the model loading
once).

Where runs execute is the profile's (``defs/profiles.py``): ``in_process`` runs each in this
process, one after another, and the first failure stops the command. A queued profile
(``multiprocess``, ``ray``) submits every run to the instance's run queue
(``defs/queue.py``: Dagster's ``QueuedRunCoordinator`` and daemon, for the command's
lifetime): ``max_concurrent`` runs at once, each in its own process or Ray job, retried by
Dagster's run retries; a failed run stops none of the others, and the stage raises after all of
them settled, naming each failed range and its run. The runs carry the code location's origin,
so the UI lists them under their jobs.

On-demand assets (``attribution evaluate``) are not stages: :func:`materialize_asset` runs one
(``fact_tracing``, ``lds``, ``magic_training``) in this process; :func:`materialize_partitions`
runs each partition of ``lds_retrain`` or ``magic_scores`` as its own run of the job
``<pipeline>_<asset>``, through the queue under a queued profile.

Crash safety: every run is tagged with the host and pid that execute it. Runs of this host
whose process is gone (``kill -9``, the OOM killer) are marked failed and their concurrency
slots freed (before the next stage, and while queued runs are awaited: a retry then takes
over), so a killed run never blocks later ones; a pool whose slots are all held by live runs
fails fast with the run that holds them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import dagster as dg

from attribution_assets.defs.common import key, shards_partitions
from attribution_assets.defs.health import check_pools, release_dead_runs
from attribution_assets.defs.planning import (
    ON_DEMAND_PARTITIONED,
    Stage,
    chunk_ranges,
    job_name,
    on_demand_job_name,
    pipeline_stages,
    plan_stage,
)
from attribution_assets.defs.profiles import DeploymentProfile, profile_from_json
from attribution_assets.defs.queue import QueueSession
from attribution_assets.defs.runs import (
    FORCE_TAG,
    HOST_TAG,
    PID_TAG,
    PIPELINE_TAG,
    STAGE_TAG,
    failed_step,
    location_origins,
    partition_run,
    process_tags,
    range_run,
    recipe_of,
)
from attribution_assets.spec import PipelineSpec

__all__ = ["FORCE_TAG", "HOST_TAG", "PID_TAG", "PIPELINE_TAG", "STAGE_TAG",  # run tags, re-exported
           "release_dead_runs"]

def _base_tags(spec: PipelineSpec, force: bool = False) -> dict[str, str]:
    tags = {**process_tags(), PIPELINE_TAG: spec.name}
    return {**tags, FORCE_TAG: "true"} if force else tags


def _run_config(log_level: str) -> dict:
    return {"loggers": {"console": {"config": {"log_level": log_level}}}}


def profile_of(defs: dg.Definitions) -> DeploymentProfile:
    """The deployment profile ``defs`` were built with (``build_definitions`` records it)."""
    recipe = recipe_of(defs)
    if recipe is None:
        raise ValueError("These definitions carry no recipe: build them with `defs.factory.build_definitions`.")
    return profile_from_json(json.loads(recipe)["profile"])


class Runs:
    """Runs of one command: in this process, or through the run queue of a queued profile (a
    :class:`QueueSession`, started on first use and stopped by :meth:`close`)."""

    def __init__(self, defs: dg.Definitions, instance: dg.DagsterInstance, log: Callable[[str], None]):
        self.defs, self.instance, self.log = defs, instance, log
        self.profile = profile_of(defs)
        if self.profile.executor == "k8s":
            raise ValueError(f"Profile {self.profile.name!r} runs steps as Kubernetes jobs: launch its runs "
                             "through the Dagster deployment on the cluster (the UI, a backfill, `dagster "
                             "job launch`), not through this local runner.")
        self._queue: QueueSession | None = None

    def queues(self, partitioned: bool) -> bool:
        """Whether runs go through the queue: partitioned ones under a queued profile; a stage of
        one run only where runs execute on a cluster (``ray``): on this machine a process of its
        own would only add its start."""
        return self.profile.queued and (partitioned or self.profile.executor == "ray")

    def run(self, job_name: str, keys: list[dg.AssetKey] | None, runs: Sequence[tuple[str, dict[str, str]]],
            tags: dict, run_config: dict, what: str, log_each: bool = False, partitioned: bool = True) -> list:
        """Each of ``runs`` (label, partition tags) a run of ``job_name`` over ``keys``; in this
        process the first failure is re-raised as is (``failed_in``: the failed step and
        partitions); queued (:meth:`queues`), every run settles first, then
        :class:`queue.QueuedRunsError` names each failed one. Returns the results (in process) or
        the final ``DagsterRun`` records."""
        if not self.queues(partitioned):
            return _run_here(self.defs.resolve_job_def(job_name), self.instance, keys, runs, tags, run_config,
                             what, self.log if log_each else None)
        if self._queue is None:
            self.log(f"starting the run queue: a code server and the daemon ({self.profile.workers} runs at once)")
            self._queue = QueueSession(self.instance, recipe_of(self.defs), self.log).__enter__()
        queued_tags = {k: v for k, v in tags.items() if k not in (HOST_TAG, PID_TAG)}  # the run's process sets them
        submitted = self._queue.submit(job_name, keys, runs, queued_tags, run_config)
        self.log(f"{what}: {len(submitted)} runs queued, {min(self.profile.workers, len(submitted))} at once")
        return self._queue.wait(submitted, what, release=lambda: release_dead_runs(self.instance, self.log))

    def close(self, exc: BaseException | None = None) -> None:
        if self._queue is not None:
            self._queue.__exit__(type(exc) if exc else None, exc, None)
            self._queue = None


@contextmanager
def interrupts_kept() -> Iterator[None]:
    """Raise ``KeyboardInterrupt`` after an in-process run that swallowed a SIGINT or SIGTERM.

    While a run executes, Dagster captures both signals and raises them inside a step's compute;
    one that arrives outside it (events being written, the run ending) is only recorded, and
    forgotten when the run's capture ends, so the command would go on to its next stage. This
    watches Dagster's record of it (``dagster._utils.interrupts``) for the run's duration."""
    from dagster._utils import interrupts

    class Watched(dict):
        received = False

        def __setitem__(self, name, value):
            self.received = self.received or bool(value)
            super().__setitem__(name, value)

    saved = interrupts._received_interrupt
    watched = interrupts._received_interrupt = Watched(saved)
    try:
        yield
    finally:
        interrupts._received_interrupt = saved
    if watched.received:
        raise KeyboardInterrupt


def _run_here(job: dg.JobDefinition, instance: dg.DagsterInstance, keys: list[dg.AssetKey] | None,
              runs: Sequence[tuple[str, dict[str, str]]], tags: dict, run_config: dict, where: str,
              log: Callable[[str], None] | None = None) -> list:
    """Each of ``runs`` (label, partition tags) a run of ``job`` in this process, one after another
    (``log``: a line before each); the first failure is re-raised as is, with the failed step and
    partitions in ``failed_in``. Each run carries the code location's origin
    (:func:`runs.location_origins`), as a run launched from the UI does."""
    from dagster._core.definitions.job_base import InMemoryJob
    from dagster._core.execution.api import execute_run

    here = job.as_ephemeral_job(resource_defs={}, input_values={})  # this process's executor
    remote_origin, python_origin = location_origins(job.name)
    results = []
    for started, (label, run_tags) in enumerate(runs, 1):
        if log is not None:
            log(f"{started}/{len(runs)} materializing {where}{label}")
        run = instance.create_run_for_job(
            here, run_config=run_config, tags={**job.run_tags, **tags, **run_tags},
            asset_selection=frozenset(keys) if keys else None, remote_job_origin=remote_origin,
            job_code_origin=python_origin)
        try:
            with interrupts_kept():
                result = execute_run(InMemoryJob(here), run, instance, raise_on_error=True)
        except Exception as exc:
            exc.failed_in = (failed_step(instance, run.run_id) or where) + label
            raise
        results.append(result)
    return results


def materialize_pipeline(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance,
                         stages: Sequence[Stage] | None = None, log: Callable[[str], None] = print,
                         log_level: str = "INFO", force: bool = False, slot_timeout: float = 0.0,
                         before_stage: Callable[[Stage], None] | None = None) -> list:
    """Run what each stage needs (everything with ``force``); raise if a run fails.

    ``log_level`` filters Dagster's console logger (``DEBUG`` shows every event);
    ``slot_timeout``: seconds to wait for a free ``gpu`` pool slot held by another live run;
    ``before_stage``: called with each stage that has work, before its runs (it may raise, e.g.
    the CLI's size check).
    Returns the in-process runs' results, or the queued runs' final ``DagsterRun`` records.
    """
    run_config, base_tags = _run_config(log_level), _base_tags(spec, force)
    results: list = []
    runs = Runs(defs, instance, log)
    release_dead_runs(instance, log)  # also when nothing is left to do: the run list stops saying STARTED
    present = defs.resolve_asset_graph().get_all_asset_keys()
    try:
        for stage in pipeline_stages(spec) if stages is None else stages:
            plan = plan_stage(defs, spec, instance, stage, force)
            if not plan.keys:
                if any(key(spec, n) in present for n in stage.assets):
                    log(f"{spec.name} {stage.name}: up to date")
                continue
            log(f"{spec.name} {stage.name}: " + "; ".join(plan.reasons))
            if before_stage is not None:
                before_stage(stage)
            release_dead_runs(instance, log)
            check_pools(instance, slot_timeout)
            order = instance.get_dynamic_partitions(shards_partitions(spec).name) if stage.partitioned else []
            ranges = chunk_ranges(plan.ranges, order, runs.profile.shards_per_run) or [(None, None)]
            results += runs.run(job_name(spec, stage), plan.keys, [range_run(*r) for r in ranges],
                                {**base_tags, STAGE_TAG: stage.name}, run_config, f"{spec.name} {stage.name}",
                                partitioned=stage.partitioned)
    except BaseException as exc:
        runs.close(exc)
        raise
    runs.close()
    return results


def _on_demand(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance, asset: str,
               log: Callable[[str], None], slot_timeout: float) -> None:
    """Checks before an on-demand run of ``asset``."""
    if key(spec, asset) not in defs.resolve_asset_graph().get_all_asset_keys():
        raise ValueError(f"Pipeline {spec.name!r} has no asset {asset!r} (LDS retrains exist for the demo "
                         "only, MAGIC with `magic.enabled: true`).")
    release_dead_runs(instance, log)
    check_pools(instance, slot_timeout)


def materialize_asset(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance, asset: str,
                      log: Callable[[str], None] = print, log_level: str = "INFO",
                      slot_timeout: float = 0.0):
    """Materialize the unpartitioned on-demand asset ``asset`` (``fact_tracing``, ``lds``,
    ``magic_training``) in this process, tagged as the ``evaluation`` stage; returns the result.
    A failure is re-raised with the asset in ``failed_in``."""
    Runs(defs, instance, log)  # refuses a k8s profile
    _on_demand(defs, spec, instance, asset, log, slot_timeout)
    log(f"materializing {spec.name}/{asset}")
    (result,) = _run_here(defs.resolve_implicit_global_asset_job_def(), instance, [key(spec, asset)],
                          [("", {})], {**_base_tags(spec), STAGE_TAG: "evaluation"}, _run_config(log_level),
                          f"{spec.name}/{asset}")
    return result


def materialize_partitions(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance, asset: str,
                           partitions: Sequence[str], log: Callable[[str], None] = print,
                           log_level: str = "INFO", slot_timeout: float = 0.0) -> list:
    """Materialize ``partitions`` of the on-demand asset ``asset`` (:data:`ON_DEMAND_PARTITIONED`),
    each partition its own run of the job ``<pipeline>_<asset>``, tagged as the ``evaluation`` stage.

    Under a queued profile the runs go through the run queue, ``max_concurrent`` at once, and a
    failed run stops none of the others (``queue.QueuedRunsError`` after all settled); otherwise
    they run in this process, one after another, and the first failure is raised. Returns the
    in-process results or the queued runs' final ``DagsterRun`` records.
    """
    if asset not in ON_DEMAND_PARTITIONED:
        raise ValueError(f"{asset!r} is not an on-demand partitioned asset; those are {ON_DEMAND_PARTITIONED}.")
    if not partitions:
        return []
    runs = Runs(defs, instance, log)
    _on_demand(defs, spec, instance, asset, log, slot_timeout)
    tags, run_config = {**_base_tags(spec), STAGE_TAG: "evaluation"}, _run_config(log_level)
    try:
        results = runs.run(on_demand_job_name(spec, asset), None, [partition_run(p) for p in partitions], tags,
                           run_config, f"{spec.name}/{asset}", log_each=True)
    except BaseException as exc:
        runs.close(exc)
        raise
    runs.close()
    return results
