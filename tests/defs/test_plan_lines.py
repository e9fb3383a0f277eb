"""Plan lines tell the truth (defs/planning.py): shards whose complete gradient store a killed run
left on disk are planned as reused, not as plain missing."""

import json

import dagster as dg

from attribution_assets.defs.common import key
from attribution_assets.defs.planning import STAGES, plan_stage
from attribution_assets.engine.gradients.collect import reusable_store
from attribution_assets.engine.io import data
from attribution_assets.engine.io.corpus import shard_sizes
from attribution_assets.spec import GradientSpec
from tests.helpers import definitions_for, tiny_demo_spec


def _fresh_plan(spec, paths):
    """The shards stage as planned by an instance that recorded nothing (a run killed before it
    recorded its shards) over the tiny demo's files."""
    defs = definitions_for([spec], paths.root.parent)
    instance = dg.DagsterInstance.ephemeral()
    shards = sorted(shard_sizes(paths.documents))
    instance.add_dynamic_partitions(f"{spec.name}_shards", shards)
    (stage,) = [s for s in STAGES if s.name == "shards"]
    return defs, shards, plan_stage(defs, spec, instance, stage)


def test_shards_a_killed_run_left_complete_are_planned_as_reused(tiny_demo):
    spec, paths = tiny_demo
    defs, shards, plan = _fresh_plan(spec, paths)
    train = key(spec, "train_gradients")
    version = defs.resolve_assets_def(train).code_versions_by_key[train]
    fingerprint = json.loads(paths.model_record.read_text())["fingerprint"]
    reusable = [s for s in shards if reusable_store(paths.train_gradients(s), data.read_tokenized(paths.tokens(s)),
                                                    fingerprint, spec.gradients, version) is not None]
    assert reusable == shards and len(shards) >= 2  # ground truth: the asset's own test
    n = len(shards)
    assert f"train_gradients ({n} of {n} shards): missing ({n} of them complete on disk from an earlier run: " \
           "reused, not recomputed)" in plan.reasons
    assert f"tokenized_shards ({n} of {n} shards): missing" in plan.reasons


def test_stores_of_other_settings_are_not_announced_as_reused(tiny_demo):
    spec, paths = tiny_demo
    other = tiny_demo_spec(GradientSpec(projection_dim=8, normalizer="adafactor"))
    _, shards, plan = _fresh_plan(other, paths)
    n = len(shards)
    assert f"train_gradients ({n} of {n} shards): missing" in plan.reasons
