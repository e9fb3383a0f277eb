"""Stages and plans: which asset jobs a pipeline has, and which assets and shards of a stage
need a run (Dagster's own staleness resolver: the "unsynced" of the UI).

Each stage is a named asset job (``<pipeline>_<stage>``), so the runs list says what each run
was. Before a stage runs, the resolver (missing, code version changed, upstream data changed)
says which assets and shards need work; with ``force`` everything runs. A partitioned stage runs
its shards in ranges of the profile's ``shards_per_run`` (:func:`chunk_ranges`, what the backfill
policy of every shard asset makes of a UI backfill).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import dagster as dg

from attribution_assets.defs.common import key, shards_partitions
from attribution_assets.defs.freshness import FreshnessProof
from attribution_assets.spec import PipelineSpec

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
    Stage("shards", ("tokenized_shards", "train_gradients", "shard_autocorr", "kfac_covariance"),
          True),
    Stage("kfac_factors", ("kfac_factors", "kfac_eigendecomposition"), False),
    Stage("ekfac_correction", ("ekfac_correction",), True),
    Stage("ekfac_eigenvalues", ("ekfac_eigenvalues",), False),
    Stage("fan_in", ("kfac_query_gradients", "autocorrelation", "preconditioner", "faiss_index"),
          False),
    Stage("scores", ("scores",), True),
    Stage("database", ("attribution_db", "overview", "train_time_fact_tracing"), False),
)
# With a `finetune` section, the model that gradients come from is trained on the tokenized
# corpus first: query gradients wait for it and tokens get a stage of their own.
FINETUNE_STAGES: tuple[Stage, ...] = (
    Stage("prepare", ("corpus", "query_set", "tokenizer", "model", "tokenized_queries"), False),
    Stage("tokens", ("tokenized_shards",), True),
    Stage("finetune", ("finetune", "query_gradients"), False),
    Stage("shards", ("train_gradients", "shard_autocorr", "kfac_covariance"), True),
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


#: The last staleness resolver: ``(defs, instance, latest event id, resolver, proof)``. Its caches
#: hold every status it computed (a shard's upstream statuses are the previous stage's), so it
#: serves every stage of a command until an event is stored (a run, a materialization); the
#: :class:`freshness.FreshnessProof` of the same state answers first.
_LAST_RESOLVER: tuple | None = None


def _resolver(defs: dg.Definitions, instance: dg.DagsterInstance):
    """Dagster's caching staleness resolver over ``defs`` and ``instance``, reused while the
    instance has stored no event since it was made (so planning every stage of an up-to-date
    pipeline reads each status once)."""
    global _LAST_RESOLVER
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    latest = instance.event_log_storage.get_maximum_record_id()
    if _LAST_RESOLVER is not None and latest is not None:
        last_defs, last_instance, last_event, resolver, _ = _LAST_RESOLVER
        if last_defs is defs and last_instance is instance and last_event == latest:
            return resolver
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(temporal_context=TemporalContext(effective_dt=get_current_datetime(),
                                                          last_event_id=latest),
                          instance=instance, asset_graph=graph)
    resolver = CachingStaleStatusResolver(instance=instance, asset_graph=graph, loading_context=view)
    # every asset's latest materialization in one query, not one query per asset as statuses ask
    resolver.instance_queryer.prefetch_asset_records(graph.get_all_asset_keys())
    _LAST_RESOLVER = (defs, instance, latest, resolver, FreshnessProof(graph, instance, resolver.instance_queryer))
    return resolver


def _checker(defs: dg.Definitions, instance: dg.DagsterInstance):
    """``stale(asset_key, partitions)``: partition (None: unpartitioned) -> why it needs a run
    (:func:`_why`), for the ``partitions`` of ``asset_key`` that are not fresh. Those the
    freshness proof shows up to date (a few queries per asset) skip the resolver, which asks
    about each partition on its own."""
    resolver = _resolver(defs, instance)
    proof: FreshnessProof = _LAST_RESOLVER[4]

    def stale(asset_key: dg.AssetKey, partitions: Sequence[str | None]) -> dict[str | None, str]:
        fresh = proof.fresh(asset_key, partitions)
        return {p: why for p in partitions if p not in fresh and (why := _why(resolver, asset_key, p))}

    return stale


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


def _reusable_shards(defs: dg.Definitions, spec: PipelineSpec, asset_key: dg.AssetKey,
                     shards: Sequence[str]) -> list[str]:
    """The ``shards`` of ``train_gradients`` whose store on disk the asset will reuse rather than
    recompute (complete, same documents, model, settings and code: left by a run killed before it
    recorded them; ``engine.gradients.collect.reusable_store``, the asset's own test)."""
    if asset_key.path[-1] != "train_gradients" or spec.scoring.train_rows != "post_hoc" or not shards:
        return []
    import json

    from attribution_assets.engine.gradients.collect import reusable_store
    from attribution_assets.engine.io import data

    paths = defs.resources["storage"].paths(spec)
    record = paths.finetune_record if spec.finetune is not None else paths.model_record
    if not record.exists():
        return []
    fingerprint = json.loads(record.read_text())["fingerprint"]
    version = defs.resolve_assets_def(asset_key).code_versions_by_key[asset_key]
    reused = []
    for shard in shards:
        if not paths.train_gradients(shard).exists() or not paths.tokens(shard).exists():
            continue
        docs = data.read_tokenized(paths.tokens(shard))
        if reusable_store(paths.train_gradients(shard), docs, fingerprint, spec.gradients, version,
                          spec.corpus.advantage_weighting) is not None:
            reused.append(shard)
    return reused


def unsynced_partitions(defs: dg.Definitions, instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                        partitions: Sequence[str]) -> list[str]:
    """The ``partitions`` of ``asset_key`` that are missing or stale (its code version or an
    upstream's data changed since they were materialized), in order."""
    return list(_checker(defs, instance)(asset_key, partitions))


def plan_stage(defs: dg.Definitions, spec: PipelineSpec, instance: dg.DagsterInstance, stage: Stage,
               force: bool = False) -> StagePlan:
    """The assets (and shards) of ``stage`` that are missing or unsynced (all with ``force``)."""
    present = defs.resolve_asset_graph().get_all_asset_keys()
    keys = [key(spec, n) for n in stage.assets if key(spec, n) in present]
    stale_of = None if force else _checker(defs, instance)
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
            why = stale_of(asset_key, [None]).get(None)
            if why:
                chosen.append(asset_key)
                reasons.append(f"{name}: {why}")
            continue
        stale = stale_of(asset_key, shards)
        if stale:
            chosen.append(asset_key)
            shards_needed.update(stale)
            kinds = sorted({w for w in stale.values()})
            reused = _reusable_shards(defs, spec, asset_key, [s for s, w in stale.items() if w == "missing"])
            kept = (f" ({len(reused)} of them complete on disk from an earlier run: reused, not recomputed)"
                    if reused else "")
            reasons.append(f"{name} ({len(stale)} of {len(shards)} shards): {', '.join(kinds)}{kept}")
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
