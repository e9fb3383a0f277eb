"""Materialize a pipeline stage by stage (the CLI and tests): incremental by default.

Each stage is a named asset job (``<pipeline>_<stage>``), so the runs list says what each run
was. Before a stage runs, Dagster's own staleness resolver (the "unsynced" of the UI: missing,
code version changed, upstream data changed) says which assets and shards need work; with
``force`` everything runs. A partitioned stage runs its shards in ranges of the profile's
``shards_per_run`` (the backfill policy of every shard asset, so a UI backfill makes the same
runs; unset: one range per contiguous run of shards, the model loading once).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dagster as dg
from dagster._core.utils import make_new_run_id

from attribution_assets.defs.common import key, record_partition_versions, shards_partitions
from attribution_assets.defs.health import check_pools, release_dead_runs
from attribution_assets.defs.profiles import DeploymentProfile, profile_from_json
from attribution_assets.defs.queue import QueueSession
from attribution_assets.defs.runs import (
    FORCE_TAG,
    HOST_TAG,
    PID_TAG,
    PIPELINE_TAG,
    STAGE_TAG,
    failed_step,
    partition_run,
    process_tags,
    range_run,
    recipe_of,
)
from attribution_assets.spec import PipelineSpec

__all__ = ["FORCE_TAG", "HOST_TAG", "PID_TAG", "PIPELINE_TAG", "STAGE_TAG",  # run tags, re-exported
           "release_dead_runs"]

#: Partitioned assets outside the stages, materialized on demand (``attribution evaluate``, a UI
#: backfill): one job each, ``<pipeline>_<asset>``, one run per partition.
ON_DEMAND_PARTITIONED = ("magic_scores", "lds_retrain")


@dataclass(frozen=True)
class Stage:
    """Assets that run together; ``partitioned``: by shard."""

    name: str
    assets: tuple[str, ...]
    partitioned: bool


#: In dependency order. EK-FAC / K-FAC (``defs/kfac.py``): per-shard covariance sums with the
#: shards, their merge and eigendecomposition, the per-shard eigenvalue correction and its merge,
#: then the preconditioned query rows with the other fan-in assets.
STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("corpus", "query_set", "tokenizer", "model", "tokenized_queries", "query_gradients"),
          False),
    Stage("shards", ("tokenized_shards", "train_gradients", "shard_autocorrelation", "kfac_covariance"),
          True),
    Stage("kfac_factors", ("kfac_factors", "kfac_eigendecomposition"), False),
    Stage("ekfac_correction", ("ekfac_correction",), True),
    Stage("ekfac_eigenvalues", ("ekfac_eigenvalues",), False),
    Stage("fan_in", ("kfac_query_gradients", "train_autocorrelation", "preconditioner", "faiss_index"),
          False),
    Stage("scores", ("scores",), True),
    Stage("database", ("attribution_db", "train_time_fact_tracing"), False),
)
# With a `finetune` section, the model that gradients come from is trained on the tokenized
# corpus first: query gradients wait for it and tokens get a stage of their own.
FINETUNE_STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("corpus", "query_set", "tokenizer", "model", "tokenized_queries"), False),
    Stage("tokens", ("tokenized_shards",), True),
    Stage("finetune", ("finetune", "query_gradients"), False),
    Stage("shards", ("train_gradients", "shard_autocorrelation", "kfac_covariance"), True),
    *STAGES[2:],
)


def pipeline_stages(spec: PipelineSpec) -> tuple[Stage, ...]:
    """The stages of ``spec``, in order."""
    return FINETUNE_STAGES if spec.finetune is not None else STAGES


def job_name(spec: PipelineSpec, stage: Stage) -> str:
    return f"{spec.name}_{stage.name}"


def stage_jobs(spec: PipelineSpec, present: set[dg.AssetKey], retry_policy: dg.RetryPolicy | None = None) -> list:
    """One asset job per stage that has assets in this pipeline (named ``<pipeline>_<stage>``);
    ``retry_policy``: the profile's retries of a failed step."""
    jobs = []
    for stage in pipeline_stages(spec):
        keys = [key(spec, n) for n in stage.assets if key(spec, n) in present]
        if keys:
            jobs.append(dg.define_asset_job(job_name(spec, stage), selection=keys,
                                            partitions_def=shards_partitions(spec) if stage.partitioned else None,
                                            description=f"{spec.name}: {', '.join(k.path[-1] for k in keys)}",
                                            op_retry_policy=retry_policy))
    return jobs


def on_demand_job_name(spec: PipelineSpec, asset: str) -> str:
    return f"{spec.name}_{asset}"


def on_demand_jobs(spec: PipelineSpec, present: set[dg.AssetKey],
                   retry_policy: dg.RetryPolicy | None = None) -> list:
    """One job per on-demand partitioned asset of this pipeline (its partitions are the asset's)."""
    return [dg.define_asset_job(on_demand_job_name(spec, name), selection=[key(spec, name)],
                                description=f"{spec.name}: {name}, one run per partition",
                                op_retry_policy=retry_policy)
            for name in ON_DEMAND_PARTITIONED if key(spec, name) in present]


@dataclass
class StagePlan:
    """What one stage will do: assets to run, shard ranges (partitioned stages) and why."""

    stage: Stage
    keys: list[dg.AssetKey]
    ranges: list[tuple[str, str]]
    reasons: list[str]


def _contiguous_ranges(selected: Sequence[str], order: Sequence[str]) -> list[tuple[str, str]]:
    """``selected`` shards as ``(first, last)`` ranges of consecutive keys in ``order``."""
    position = {s: i for i, s in enumerate(order)}
    ranges: list[tuple[str, str]] = []
    for shard in sorted(selected, key=position.__getitem__):
        if ranges and position[shard] == position[ranges[-1][1]] + 1:
            ranges[-1] = (ranges[-1][0], shard)
        else:
            ranges.append((shard, shard))
    return ranges


def _resolver(defs: dg.Definitions, instance: dg.DagsterInstance):
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(),
                                                          last_event_id=None),
                          instance=instance, asset_graph=graph)
    return CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)


def _why(resolver, asset_key: dg.AssetKey, partition: str | None) -> str | None:
    """None when fresh, else ``missing`` or the first root stale cause: ``has a new code version``
    (the asset itself), ``<pipeline>/<upstream> has a new data version`` (an upstream's)."""
    from dagster._core.definitions.data_version import StaleStatus

    status = resolver.get_status(asset_key, partition)
    if status == StaleStatus.MISSING:
        return "missing"
    if status == StaleStatus.STALE:
        causes = resolver.get_stale_root_causes(asset_key, partition)
        if not causes:
            return "unsynced"
        cause = causes[0]
        return cause.reason if cause.asset_key == asset_key else f"{cause.asset_key.to_user_string()} {cause.reason}"
    return None


def unsynced_partitions(defs: dg.Definitions, instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                        partitions: Sequence[str]) -> list[str]:
    """The ``partitions`` of ``asset_key`` that are missing or stale (its code version or an
    upstream's data changed since they were materialized), in order."""
    resolver = _resolver(defs, instance)
    return [p for p in partitions if _why(resolver, asset_key, p) is not None]


def plan_stage(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance, stage: Stage,
               force: bool = False) -> StagePlan:
    """The assets (and shards) of ``stage`` that are missing or unsynced (all with ``force``)."""
    present = defs.resolve_asset_graph().get_all_asset_keys()
    keys = [key(spec, n) for n in stage.assets if key(spec, n) in present]
    resolver = None if force else _resolver(defs, instance)
    chosen, reasons, shards_needed = [], [], set()
    shards = instance.get_dynamic_partitions(shards_partitions(spec).name) if stage.partitioned else []
    if stage.partitioned and keys and not shards:
        raise ValueError(f"Pipeline {spec.name!r} has no shard partitions; materialize its corpus first.")
    for asset_key in keys:
        name = asset_key.path[-1]
        if force:
            chosen.append(asset_key)
            shards_needed.update(shards)
            reasons.append(f"{name}: forced" + (f" ({len(shards)} shards)" if shards else ""))
            continue
        if not stage.partitioned:
            why = _why(resolver, asset_key, None)
            if why:
                chosen.append(asset_key)
                reasons.append(f"{name}: {why}")
            continue
        stale = {s: w for s in shards if (w := _why(resolver, asset_key, s))}
        if stale:
            chosen.append(asset_key)
            shards_needed.update(stale)
            kinds = sorted({w for w in stale.values()})
            reasons.append(f"{name} ({len(stale)} of {len(shards)} shards): {', '.join(kinds)}")
    if stage.partitioned and chosen:
        # a shard that one asset of the stage needs runs for every chosen asset (one step each)
        return StagePlan(stage, chosen, _contiguous_ranges(sorted(shards_needed), shards), reasons)
    return StagePlan(stage, chosen, [], reasons)


def chunk_ranges(ranges: Sequence[tuple[str, str]], order: Sequence[str], size: int | None) -> list[tuple[str, str]]:
    """Contiguous shard ``ranges`` (keys of ``order``) cut into ranges of at most ``size`` shards
    (what a multi-run backfill policy makes of them); ``size`` None keeps them whole."""
    if size is None:
        return list(ranges)
    position, chunks = {s: i for i, s in enumerate(order)}, []
    for first, last in ranges:
        keys = order[position[first]:position[last] + 1]
        chunks += [(keys[i], keys[min(i + size, len(keys)) - 1]) for i in range(0, len(keys), size)]
    return chunks


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
        return self._queue.wait(submitted, what, on_settled=lambda run: record_partition_versions(
            self.instance, _materializations(self.instance, run.run_id)),
            release=lambda: release_dead_runs(self.instance, self.log))

    def close(self, exc: BaseException | None = None) -> None:
        if self._queue is not None:
            self._queue.__exit__(type(exc) if exc else None, exc, None)
            self._queue = None


def _materializations(instance: dg.DagsterInstance, run_id: str) -> list:
    """The ``DagsterEvent`` of each materialization ``run_id`` stored, in order."""
    return [record.event_log_entry.dagster_event for record in instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=100_000).records]


def _run_here(job, instance: dg.DagsterInstance, keys: list[dg.AssetKey] | None,
              runs: Sequence[tuple[str, dict[str, str]]], tags: dict, run_config: dict, where: str,
              log: Callable[[str], None] | None = None) -> list:
    """Each of ``runs`` (label, partition tags) a run of ``job`` in this process, one after another
    (``log``: a line before each); the first failure is re-raised as is, with the failed step and
    partitions in ``failed_in``."""
    results = []
    for started, (label, run_tags) in enumerate(runs, 1):
        if log is not None:
            log(f"{started}/{len(runs)} materializing {where}{label}")
        run_id = make_new_run_id()
        try:
            result = job.execute_in_process(instance=instance, asset_selection=keys, run_id=run_id,
                                            tags={**tags, **run_tags}, run_config=run_config, raise_on_error=True)
        except Exception as exc:
            exc.failed_in = (failed_step(instance, run_id) or where) + label
            raise
        record_partition_versions(instance, [e for e in result.all_events if e.event_type_value ==
                                             "ASSET_MATERIALIZATION"])
        results.append(result)
    return results


def materialize_pipeline(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance,
                         stages: Sequence[Stage] | None = None, log: Callable[[str], None] = print,
                         log_level: str = "INFO", force: bool = False, slot_timeout: float = 0.0) -> list:
    """Run what each stage needs (everything with ``force``); raise if a run fails.

    ``log_level`` filters Dagster's console logger (``DEBUG`` shows every event);
    ``slot_timeout``: seconds to wait for a free ``gpu`` pool slot held by another live run.
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
    try:
        return dg.materialize(defs.assets, selection=[key(spec, asset)], instance=instance,
                              resources=defs.resources, tags={**_base_tags(spec), STAGE_TAG: "evaluation"},
                              run_config=_run_config(log_level))
    except Exception as exc:
        exc.failed_in = f"{spec.name}/{asset}"
        raise


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
