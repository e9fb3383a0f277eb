"""Materialize a pipeline stage by stage (the CLI and tests): incremental by default.

Each stage is a named asset job (``<pipeline>_<stage>``), so the runs list says what each run
was. Before a stage runs, Dagster's own staleness resolver (the "unsynced" of the UI: missing,
code version changed, upstream data changed) says which assets and shards need work; with
``force`` everything runs. A partitioned stage is one run per contiguous range of shards (a
single-run backfill: the model loads once).

Parallel shards: with a ``multiprocess`` profile (``max_concurrent`` = N), a partitioned stage
splits its shards into N contiguous ranges and runs each range as its own run in a worker
process (``ProcessPoolExecutor``), N at once: each worker loads the model once for its range.
Workers fork from one forkserver that imported torch, transformers, Dagster and the definitions
once (fresh state: it never ran a torch op or opened the instance), so a stage's workers, and
every later stage's, start without re-importing them. Workers rebuild the definitions from the recipe that ``build_definitions``
records (specs + profile) through Dagster's ``build_reconstructable_job``. Unpartitioned
stages are chains (each asset needs the previous one) and run in this process: a step
process each would only add its startup (``dagster dev`` runs them under the profile's
multiprocess executor, whose ``max_concurrent`` also bounds concurrent steps there). Runs of different ranges are
independent: one that fails does not stop the others; the stage raises after all of them
ended, naming each failed range. The ``local`` profile keeps everything in this process.

Crash safety: every run is tagged with the host and pid that launched it. Runs of this host
whose process is gone (``kill -9``, the OOM killer) are marked failed and their concurrency
slots freed before the next run starts, so a killed run never blocks later ones; a pool whose
slots are all held by live runs fails fast with the run that holds them.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import dagster as dg
import yaml
from dagster._core.definitions.reconstruct import ReconstructableJob, build_reconstructable_job
from dagster._core.utils import make_new_run_id

from attribution_assets.defs.common import key, record_partition_versions, shards_partitions
from attribution_assets.spec import PipelineSpec

#: Telemetry off; two runs and two steps of any pool (``gpu`` included) at once (with one GPU,
#: lower the gpu pool: ``dagster instance concurrency set gpu 1``); run monitoring marks runs
#: whose worker died as failed and frees their slots (``dagster dev`` runs the daemon that does it).
DAGSTER_YAML = {
    "telemetry": {"enabled": False},
    "concurrency": {"pools": {"default_limit": 2}, "runs": {"max_concurrent_runs": 2}},
    "run_monitoring": {"enabled": True, "start_timeout_seconds": 180, "poll_interval_seconds": 30,
                       "max_resume_run_attempts": 0, "free_slots_after_run_end_seconds": 30},
}
HOST_TAG, PID_TAG = "attribution/host", "attribution/pid"
PIPELINE_TAG, STAGE_TAG, FORCE_TAG = "attribution/pipeline", "attribution/stage", "attribution/force"
POOLS = ("gpu",)
#: Definitions metadata key of the recipe (specs + profile, JSON) that rebuilds them in a worker.
RECIPE_KEY = "attribution/recipe"


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


def persistent_instance(home: str | os.PathLike | None = None) -> dg.DagsterInstance:
    """The instance under ``$DAGSTER_HOME`` (default ``./.dagster_home``): telemetry off, run
    monitoring on; settings missing from an existing ``dagster.yaml`` are added."""
    home = Path(home or os.environ.get("DAGSTER_HOME") or Path.cwd() / ".dagster_home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    current = (yaml.safe_load(config.read_text()) or {}) if config.exists() else {}
    merged = {**DAGSTER_YAML, **current}
    if merged != current:
        config.write_text(yaml.safe_dump(merged, sort_keys=False))
    os.environ["DAGSTER_HOME"] = str(home)
    return dg.DagsterInstance.get()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def release_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the unfinished runs that this host launched from processes now gone, and free
    their concurrency slots; return their run ids."""
    host, released = socket.gethostname(), []
    unfinished = instance.get_runs(filters=dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.CANCELING]))
    for run in unfinished:
        if run.tags.get(HOST_TAG) != host or not run.tags.get(PID_TAG, "").isdigit():
            continue
        if _alive(int(run.tags[PID_TAG])):
            continue
        instance.report_run_failed(run, f"the process that ran it (pid {run.tags[PID_TAG]}) is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
        log(f"released run {run.run_id} of {run.job_name}: its process {run.tags[PID_TAG]} died")
    return released


def check_pools(instance: dg.DagsterInstance, timeout: float = 0.0, poll: float = 2.0) -> None:
    """Wait up to ``timeout`` seconds for a free slot in each pool a stage may use; then raise
    naming the runs that hold the slots and how to free them."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    deadline = time.monotonic() + timeout
    for pool in POOLS:
        while True:
            info = storage.get_concurrency_info(pool)
            if info.slot_count == 0 or len(info.claimed_slots) < info.slot_count:
                break
            if time.monotonic() >= deadline:
                holders = sorted({f"{s.run_id} ({s.step_key})" for s in info.claimed_slots})
                raise RuntimeError(
                    f"All {info.slot_count} slots of pool {pool!r} are held by running runs: "
                    f"{', '.join(holders)}. Wait for them, stop them (`dagster run delete <id>` or "
                    f"the UI), or free the slots with `dagster instance concurrency set {pool} "
                    f"{info.slot_count}` after marking dead runs failed.")
            time.sleep(poll)


def _failed_step(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """``pipeline/asset`` of the step that failed in ``run_id`` (None if no step failed)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        step = record.event_log_entry.step_key
        if step:
            return step.replace("__", "/", 1)
    return None


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
    """None when fresh, else ``missing`` or the first stale cause (code version, upstream data)."""
    from dagster._core.definitions.data_version import StaleStatus

    status = resolver.get_status(asset_key, partition)
    if status == StaleStatus.MISSING:
        return "missing"
    if status == StaleStatus.STALE:
        causes = resolver.get_stale_root_causes(asset_key, partition)
        return causes[0].reason if causes else "unsynced"
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
            reasons.append(f"{name}: {len(stale)} of {len(shards)} shards {', '.join(kinds)}")
    if stage.partitioned and chosen:
        # a shard that one asset of the stage needs runs for every chosen asset (one step each)
        return StagePlan(stage, chosen, _contiguous_ranges(sorted(shards_needed), shards), reasons)
    return StagePlan(stage, chosen, [], reasons)


class StageRunError(RuntimeError):
    """Runs of a stage failed (in worker processes); ``failed_in`` names the first step and shards."""

    def __init__(self, message: str, failed_in: str):
        super().__init__(message)
        self.failed_in = failed_in


def recipe_of(defs: dg.Definitions) -> str | None:
    """The recipe (JSON: specs + profile) ``build_definitions`` recorded in ``defs``, if any."""
    value = (defs.metadata or {}).get(RECIPE_KEY)
    return None if value is None else getattr(value, "value", value)


def _profile_workers(recipe: str | None) -> int:
    """Worker processes of the recipe's profile (1 without one); a ``k8s`` profile is refused:
    its runs are launched by the Dagster deployment on the cluster, not by this process."""
    if recipe is None:
        return 1
    from attribution_assets.defs.profiles import profile_from_json

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


def split_ranges(ranges: Sequence[tuple[str, str]], order: Sequence[str], parts: int) -> list[tuple[str, str]]:
    """Split contiguous shard ``ranges`` (keys of ``order``) until there are ``parts`` of them
    (or every range is one shard), halving the longest each time; ranges keep their order."""
    position = {s: i for i, s in enumerate(order)}
    groups = [list(order[position[a]:position[b] + 1]) for a, b in ranges]
    while groups and len(groups) < parts:
        longest = max(range(len(groups)), key=lambda i: len(groups[i]))
        group = groups[longest]
        if len(group) < 2:
            break
        half = (len(group) + 1) // 2
        groups[longest:longest + 1] = [group[:half], group[half:]]
    return [(g[0], g[-1]) for g in groups]


def _step_errors(result) -> str:
    failures = result.get_step_failure_events()
    return "; ".join(f"{e.step_key}: {e.event_specific_data.error.message.strip()}" for e in failures) \
        or "the run failed before any step"


WORKER_PRELOAD = ("torch", "transformers", "dagster", "attribution_assets.defs.factory")


def run_range(recipe: str, name: str, instance_ref, keys: list[list[str]], run_id: str, tags: dict,
              run_config: dict) -> str | None:
    """In a worker process: run job ``name`` over the shard range in ``tags`` in this process and
    record each shard's data version; return None, or the failed steps' errors."""
    instance = dg.DagsterInstance.from_ref(instance_ref)
    job = reconstructable_job(recipe, name, "in_process").get_definition()
    result = job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey(k) for k in keys],
                                    run_id=run_id, tags=tags, run_config=run_config, raise_on_error=False)
    if not result.success:
        return _step_errors(result)
    record_partition_versions(instance, result)
    return None


def _shard_label(first: str | None, last: str | None) -> str:
    return "" if first is None else f" [{first}]" if first == last else f" [{first} .. {last}]"


def _run_in_workers(recipe: str, name: str, instance: dg.DagsterInstance, keys: list[dg.AssetKey],
                    ranges: list[tuple[str, str]], workers: int, tags: dict, run_config: dict,
                    log: Callable[[str], None]) -> list:
    """Each range a run in a worker process, ``workers`` at once; raise after all ended if any failed."""
    if not instance.is_persistent:
        raise ValueError("Running shards in worker processes needs a persistent Dagster instance (one "
                         "under $DAGSTER_HOME, e.g. `persistent_instance()`), not an ephemeral one; or "
                         "use the `local` profile.")
    log(f"{name}: {len(ranges)} shard ranges in {min(workers, len(ranges))} worker processes")
    failures, runs = [], []
    context = get_context("forkserver")  # no forked torch thread pools or sqlite handles
    context.set_forkserver_preload(list(WORKER_PRELOAD))
    with ProcessPoolExecutor(max_workers=min(workers, len(ranges)), mp_context=context) as pool:
        futures = {}
        for first, last in ranges:
            run_id = make_new_run_id()
            range_tags = {**tags, "dagster/asset_partition_range_start": first,
                          "dagster/asset_partition_range_end": last}
            future = pool.submit(run_range, recipe, name, instance.get_ref(), [list(k.path) for k in keys],
                                 run_id, range_tags, run_config)
            futures[future] = (first, last, run_id)
        for future in as_completed(futures):
            first, last, run_id = futures[future]
            error = future.result()
            runs.append(instance.get_run_by_id(run_id))
            if error is not None:
                where = (_failed_step(instance, run_id) or name) + _shard_label(first, last)
                failures.append((where, error, run_id))
                log(f"failed: {where} (run {run_id}): {error}")
    if failures:
        raise StageRunError("; ".join(f"{where} (run {run_id}): {error}" for where, error, run_id in failures),
                            failures[0][0])
    return runs


def materialize_pipeline(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance,
                         stages: Sequence[Stage] | None = None, log: Callable[[str], None] = print,
                         log_level: str = "INFO", force: bool = False, slot_timeout: float = 0.0) -> list:
    """Run what each stage needs (everything with ``force``); raise if a run fails.

    ``log_level`` filters Dagster's console logger (``DEBUG`` shows every event);
    ``slot_timeout``: seconds to wait for a free ``gpu`` pool slot held by another live run.
    With a ``multiprocess`` profile, shard ranges run in worker processes (module docstring);
    returns the in-process runs' results and the worker runs' ``DagsterRun`` records.
    """
    run_config = {"loggers": {"console": {"config": {"log_level": log_level}}}}
    base_tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PIPELINE_TAG: spec.name}
    if force:
        base_tags[FORCE_TAG] = "true"
    results: list = []
    recipe = recipe_of(defs)
    workers = _profile_workers(recipe)

    def shards_of(stage: Stage) -> list[str]:  # every shard, in partition order
        return instance.get_dynamic_partitions(shards_partitions(spec).name) if stage.partitioned else []

    for stage in pipeline_stages(spec) if stages is None else stages:
        plan = plan_stage(defs, spec, instance, stage, force)
        if not plan.keys:
            if any(key(spec, n) in defs.resolve_asset_graph().get_all_asset_keys() for n in stage.assets):
                log(f"{spec.name} {stage.name}: up to date")
            continue
        log(f"{spec.name} {stage.name}: " + "; ".join(plan.reasons))
        release_dead_runs(instance, log)
        check_pools(instance, slot_timeout)
        job = defs.resolve_job_def(job_name(spec, stage))
        tags = {**base_tags, STAGE_TAG: stage.name}
        ranges = split_ranges(plan.ranges, shards_of(stage), workers) if workers > 1 else plan.ranges
        if len(ranges) > 1 and workers > 1:  # workers > 1 only with a recipe
            results += _run_in_workers(recipe, job.name, instance, plan.keys, ranges, workers, tags, run_config, log)
            continue
        for first, last in plan.ranges or [(None, None)]:
            range_tags = {} if first is None else {"dagster/asset_partition_range_start": first,
                                                   "dagster/asset_partition_range_end": last}
            run_id = make_new_run_id()
            try:
                result = job.execute_in_process(instance=instance, asset_selection=plan.keys, run_id=run_id,
                                                tags={**tags, **range_tags}, run_config=run_config,
                                                raise_on_error=True)
            except Exception as exc:  # re-raised as is, with where it failed in ``failed_in``
                exc.failed_in = (_failed_step(instance, run_id) or f"{spec.name} {stage.name}") + \
                    _shard_label(first, last)
                raise
            record_partition_versions(instance, result)
            results.append(result)
    return results
