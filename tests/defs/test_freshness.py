"""The planner's freshness proof (defs/freshness.py) against Dagster's staleness resolver, the
ground truth: it never calls a partition fresh that the resolver calls missing or stale, it
proves every partition of an up-to-date pipeline (so planning skips the resolver), and every
stage's plan is the one the resolver alone makes, after code, data, wipes and new shards."""

import dagster as dg
import pytest
from dagster._core.definitions.data_version import DATA_VERSION_TAG

from attribution_assets.defs import planning
from attribution_assets.defs.common import key, shards_partitions
from attribution_assets.defs.freshness import FreshnessProof
from attribution_assets.defs.runner import materialize_pipeline
from tests.helpers import definitions_for, user_pipeline_spec


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("freshness")
    spec = user_pipeline_spec(base, tiny_model_dir)
    instance = dg.DagsterInstance.ephemeral()
    defs = definitions_for([spec], base / "storage")
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="ERROR")
    return spec, instance, base


def _statuses(defs, spec, instance):
    """``(proven, fresh, all)``: (asset key, partition) pairs the proof proves, that the resolver
    calls fresh, and every pair of the pipeline."""
    graph = defs.resolve_asset_graph()
    resolver = planning._resolver(defs, instance)
    proof = planning._LAST_RESOLVER[4]
    shards = instance.get_dynamic_partitions(shards_partitions(spec).name)
    proven, fresh, every = set(), set(), set()
    for asset_key in graph.get_all_asset_keys():
        node = graph.get(asset_key)
        if asset_key.path[0] != spec.name or not node.is_materializable:
            continue
        partitions = shards if node.is_partitioned else [None]
        proven |= {(asset_key, p) for p in proof.fresh(asset_key, partitions)}
        fresh |= {(asset_key, p) for p in partitions if planning._why(resolver, asset_key, p) is None}
        every |= {(asset_key, p) for p in partitions}
    return proven, fresh, every


def _plans(defs, spec, instance):
    return [(p.keys, p.ranges, p.reasons) for p in (planning.plan_stage(defs, spec, instance, stage)
                                                   for stage in planning.pipeline_stages(spec))]


def _check(defs, spec, instance, monkeypatch):
    """The proof never contradicts the resolver, and plans are the resolver's own; returns the
    statuses."""
    proven, fresh, every = _statuses(defs, spec, instance)
    assert proven <= fresh, sorted(proven - fresh)
    with_proof = _plans(defs, spec, instance)
    with monkeypatch.context() as patch:
        patch.setattr(FreshnessProof, "fresh", lambda self, asset_key, partitions: set())
        planning._LAST_RESOLVER = None
        assert _plans(defs, spec, instance) == with_proof
    planning._LAST_RESOLVER = None
    return proven, fresh, every


def test_an_up_to_date_pipeline_is_proven_fresh_everywhere(built, monkeypatch):
    spec, instance, base = built
    proven, fresh, every = _check(definitions_for([spec], base / "storage"), spec, instance, monkeypatch)
    assert proven == fresh == every and len({p for _, p in every}) >= 3  # shards and unpartitioned


def test_the_proof_follows_the_resolver_through_changes(built, monkeypatch):
    spec, instance, base = built
    defs = definitions_for([spec], base / "storage")
    shards = instance.get_dynamic_partitions(shards_partitions(spec).name)
    tokens, gradients = key(spec, "tokenized_shards"), key(spec, "train_gradients")

    # a new code version (the model runs in another precision)
    _, fresh, every = _check(definitions_for([spec], base / "storage", precision="bfloat16"), spec, instance,
                             monkeypatch)
    assert (gradients, shards[0]) not in fresh and (tokens, shards[0]) in fresh

    # one shard's tokens with new content, another's materialized again with the same content
    same = instance.get_latest_materialization_event(tokens)  # the newest shard's event
    version = same.asset_materialization.tags[DATA_VERSION_TAG]
    instance.report_runless_asset_event(dg.AssetMaterialization(tokens, partition=shards[0],
                                                                tags={DATA_VERSION_TAG: "new content"}))
    instance.report_runless_asset_event(dg.AssetMaterialization(
        tokens, partition=same.asset_materialization.partition, tags={DATA_VERSION_TAG: version}))
    proven, fresh, _ = _check(defs, spec, instance, monkeypatch)
    assert (gradients, shards[0]) not in fresh
    assert (gradients, same.asset_materialization.partition) in fresh - proven  # left to the resolver
    assert (gradients, shards[1]) in proven or shards[1] == same.asset_materialization.partition

    # a new model (an unpartitioned upstream of every shard)
    instance.report_runless_asset_event(dg.AssetMaterialization(key(spec, "model"),
                                                                tags={DATA_VERSION_TAG: "new weights"}))
    _, fresh, _ = _check(defs, spec, instance, monkeypatch)
    assert not {(gradients, s) for s in shards} & fresh and (key(spec, "query_gradients"), None) not in fresh

    # a wiped asset, then a new shard
    instance.wipe_assets([key(spec, "scores")])
    _, fresh, _ = _check(defs, spec, instance, monkeypatch)
    assert not any(k == key(spec, "scores") for k, _ in fresh)
    instance.add_dynamic_partitions(shards_partitions(spec).name, ["shard-99999"])
    _, fresh, every = _check(defs, spec, instance, monkeypatch)
    assert (tokens, "shard-99999") in every - fresh
