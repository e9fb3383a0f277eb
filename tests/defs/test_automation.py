"""Lineage drives rebuilds: Dagster's own automation evaluation on a materialized pipeline."""

import dataclasses
import json

import dagster as dg
import pytest

from attribution_assets.defs.automation import directory_state
from attribution_assets.defs.runner import FORCE_TAG, materialize_pipeline
from tests.helpers import definitions_for, user_pipeline_spec

TRAIN_SIDE = {"tokenized_shards", "train_gradients", "shard_autocorr", "autocorrelation"}


def _requested(result) -> dict[str, set]:
    """Asset name -> requested partition keys, for every asset with a request."""
    keys = {r.key for r in result.results if isinstance(r.key, dg.AssetKey)}
    return {k.path[-1]: set(result.get_requested_partitions(k)) for k in keys
            if result.get_requested_partitions(k)}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("ops")
    spec = user_pipeline_spec(base, tiny_model_dir)
    corpus = base / "corpus"
    storage = base / "storage"
    instance = dg.DagsterInstance.ephemeral()
    defs = definitions_for([spec], storage)
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="WARNING")
    first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    return spec, storage, instance, first.cursor, corpus


def _evaluate(spec, storage, instance, cursor):
    return dg.evaluate_automation_conditions(defs=definitions_for([spec], storage),
                                             instance=instance, cursor=cursor)


def test_changing_nothing_rebuilds_nothing(pipeline):
    spec, storage, instance, cursor, _ = pipeline
    assert _evaluate(spec, storage, instance, cursor).total_requested == 0


def test_projection_change_rebuilds_gradient_side_only(pipeline):
    spec, storage, instance, cursor, _ = pipeline
    changed = dataclasses.replace(spec, gradients=dataclasses.replace(spec.gradients, projection_dim=8))
    requested = _requested(_evaluate(changed, storage, instance, cursor))
    assert set(requested) == {"train_gradients", "query_gradients", "shard_autocorr", "autocorrelation",
                              "preconditioner", "scores", "faiss_index"}
    assert requested["train_gradients"] == set(instance.get_dynamic_partitions("ops_shards"))


def test_query_change_rebuilds_query_side_only(pipeline):
    spec, storage, instance, cursor, _ = pipeline
    changed = dataclasses.replace(spec, queries=dataclasses.replace(spec.queries, max_length=32))
    requested = set(_requested(_evaluate(changed, storage, instance, cursor)))
    # The mixed TrackStar preconditioner (and so the index) depends on the query gradients;
    # the expensive fan-in over training shards (autocorrelation) does not.
    assert {"query_set", "tokenized_queries", "query_gradients"} <= requested
    assert requested <= {"query_set", "tokenized_queries", "query_gradients", "preconditioner", "faiss_index",
                         "scores"}
    assert not TRAIN_SIDE & requested


def test_new_file_becomes_new_shards_without_touching_old_ones(pipeline):
    spec, storage, instance, cursor, corpus = pipeline
    defs = definitions_for([spec], storage)
    sensor = defs.resolve_sensor_def("ops_new_data")
    before = instance.get_dynamic_partitions("ops_shards")
    assert isinstance(sensor(dg.build_sensor_context(instance=instance, cursor=directory_state(corpus))),
                      dg.SkipReason)
    (corpus / "b.jsonl").write_text("".join(json.dumps({"text": f"New fact number {i} is here."}) + "\n"
                                            for i in range(5)))
    result = sensor(dg.build_sensor_context(instance=instance, cursor=directory_state(corpus) + "-old"))
    assert len(result.run_requests) == 1
    dg.materialize(defs.assets, selection=[dg.AssetKey(["ops", "corpus"])], resources=defs.resources,
                   instance=instance)
    new = sorted(set(instance.get_dynamic_partitions("ops_shards")) - set(before))
    assert len(new) == 2 and all(s > max(before) for s in new)
    requested = _requested(_evaluate(spec, storage, instance, cursor))
    # Only the new shards' own work; the fan-in over all shards waits for the schedule.
    assert requested == {"tokenized_shards": set(new), "train_gradients": set(new),
                         "shard_autocorr": set(new), "scores": set(new)}


def test_single_run_backfill_loads_the_model_once(pipeline, monkeypatch):
    from attribution_assets.engine.io import models

    spec, storage, instance, cursor, _ = pipeline
    calls = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: calls.append(a) or real(*a, **k))
    shards = instance.get_dynamic_partitions("ops_shards")[:2]  # the shards tokenized by the fixture
    defs = definitions_for([spec], storage)
    result = dg.materialize(defs.assets, selection=[dg.AssetKey(["ops", "train_gradients"])], instance=instance,
                            resources=defs.resources, tags={"dagster/asset_partition_range_start": shards[0],
                                                            "dagster/asset_partition_range_end": shards[-1],
                                                            FORCE_TAG: "true"})  # recompute, no reuse
    materialized = {e.partition for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}
    assert materialized == set(shards) and len(shards) == 2
    assert len(calls) == 1, "one model load for every shard of the run"
