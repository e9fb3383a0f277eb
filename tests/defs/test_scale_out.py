"""Scale-out: shard ranges in worker processes give the same stores and scores as one process;
a failed range does not stop the others; per-shard autocorrelation sums merge exactly."""

import json

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.profiles import DeploymentProfile, profile_from_json
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import Stage, materialize_pipeline, split_ranges
from attribution_assets.defs.workers import WorkerRunsError
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.autocorrelation import load_autocorrelation
from tests.helpers import SENTENCES, user_pipeline_spec

SHARDS = [f"shard-{i:05d}" for i in range(4)]


def _spec(base, model_dir):
    """The user pipeline over 16 documents in 4 shards of 4."""
    spec = user_pipeline_spec(base, model_dir)
    texts = [f"{s} ({i})" for i, s in enumerate((SENTENCES * 3)[:16])]
    (base / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return spec


def _profile(root, executor="in_process", workers=None, retries=0):
    return DeploymentProfile("test", None, StorageResource(root=str(root)), ComputeResource(threads=1),
                             executor=executor, max_concurrent=workers, max_retries=retries)


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory, tiny_model_dir):
    """The same pipeline materialized in one process and with 2 worker processes."""
    base = tmp_path_factory.mktemp("scale")
    spec = _spec(base, tiny_model_dir)
    one = build_definitions([spec], _profile(base / "one"))
    materialize_pipeline(one, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None, log_level="WARNING")
    (base / "home").mkdir()
    instance = dg.DagsterInstance.local_temp(tempdir=str(base / "home"))
    two = build_definitions([spec], _profile(base / "two", "multiprocess", 2))
    messages = []
    materialize_pipeline(two, spec, instance, log=messages.append, log_level="WARNING")
    return spec, PipelinePaths.under(base / "one", spec.name), PipelinePaths.under(base / "two", spec.name), \
        instance, messages, two


def test_split_ranges_halves_the_longest_range():
    order = [f"s{i}" for i in range(7)]
    assert split_ranges([("s0", "s3")], order, 2) == [("s0", "s1"), ("s2", "s3")]
    assert split_ranges([("s0", "s0"), ("s2", "s6")], order, 3) == [("s0", "s0"), ("s2", "s4"), ("s5", "s6")]
    assert split_ranges([("s0", "s1")], order, 4) == [("s0", "s0"), ("s1", "s1")]
    assert split_ranges([], order, 2) == []


def test_profile_survives_the_trip_to_a_worker(tmp_path):
    profile = _profile(tmp_path, "multiprocess", 3, retries=2)
    again = profile_from_json(profile.to_json())
    assert (again.executor, again.max_concurrent, again.max_retries, again.workers) == ("multiprocess", 3, 2, 3)
    assert again.storage.root == str(tmp_path) and again.compute.threads == 1


def test_specs_survive_the_trip_to_a_worker(tmp_path, tiny_model_dir):
    from attribution_assets.spec import GradientSpec, demo_spec, spec_from_json, spec_to_json

    for spec in (demo_spec(gradients=GradientSpec(projection_dim=8, include=("*mlp*",))),
                 user_pipeline_spec(tmp_path, tiny_model_dir)):
        assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


def test_two_workers_give_the_same_stores_and_scores_as_one_process(two_ways):
    spec, one, two, instance, messages, _ = two_ways
    assert one.gradient_shards() == two.gradient_shards() == SHARDS
    for shard in SHARDS:
        a, b = GradientStore(one.train_gradients(shard)), GradientStore(two.train_gradients(shard))
        assert a.doc_ids == b.doc_ids
        np.testing.assert_allclose(np.asarray(b.array), np.asarray(a.array), rtol=0, atol=1e-6)
        sa, sb = (pd.read_parquet(p.scores(shard)).sort_values(["query_id", "doc_id"]).reset_index(drop=True)
                  for p in (one, two))
        assert sa[["query_id", "doc_id"]].equals(sb[["query_id", "doc_id"]])
        np.testing.assert_allclose(sb["score"], sa["score"], rtol=1e-6, atol=1e-6)
    ra, rb = load_autocorrelation(one.autocorrelation), load_autocorrelation(two.autocorrelation)
    assert ra.n == rb.n == 16
    for m in ra.layout:
        np.testing.assert_allclose(rb.matrices[m.name], ra.matrices[m.name], rtol=1e-9, atol=1e-12)
    # the shards stage ran as two runs of two shards, one per worker process
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"attribution/stage": "shards"}))
    ranges = sorted((r.tags["dagster/asset_partition_range_start"], r.tags["dagster/asset_partition_range_end"])
                    for r in runs)
    assert ranges == [(SHARDS[0], SHARDS[1]), (SHARDS[2], SHARDS[3])]
    assert any("2 worker processes" in m for m in messages)


def test_merged_shard_sums_equal_the_autocorrelation_of_all_rows(two_ways):
    _, _, two, _, _, _ = two_ways
    rows = np.concatenate([GradientStore(two.train_gradients(s)).document_rows() for s in SHARDS])
    merged = load_autocorrelation(two.autocorrelation)
    for m in merged.layout:
        x = rows[:, m.start:m.stop].astype(np.float64)
        np.testing.assert_allclose(merged.matrices[m.name], x.T @ x / len(x), rtol=1e-10, atol=1e-14)


def test_a_failed_range_does_not_stop_the_others_and_a_rerun_completes(two_ways):
    spec, _, two, instance, _, defs = two_ways
    tokens = two.tokens(SHARDS[3])
    saved = tokens.read_bytes()
    before = {s: two.train_gradients(s).stat().st_mtime_ns for s in SHARDS}
    tokens.write_bytes(b"not parquet")
    grads = [Stage("shards", ("train_gradients",), True)]
    try:
        with pytest.raises(WorkerRunsError) as failure:
            materialize_pipeline(defs, spec, instance, stages=grads, log=lambda _: None, log_level="CRITICAL",
                                 force=True)
    finally:
        tokens.write_bytes(saved)
    assert failure.value.failed_in.endswith(f"[{SHARDS[2]} .. {SHARDS[3]}]")
    assert "train_gradients" in failure.value.failed_in
    after = {s: two.train_gradients(s).stat().st_mtime_ns for s in SHARDS}
    assert after[SHARDS[0]] > before[SHARDS[0]] and after[SHARDS[1]] > before[SHARDS[1]]  # other range ran
    assert after[SHARDS[3]] == before[SHARDS[3]]  # the failed shard's old store is untouched
    materialize_pipeline(defs, spec, instance, stages=grads, log=lambda _: None, log_level="CRITICAL", force=True)
    assert two.train_gradients(SHARDS[3]).stat().st_mtime_ns > before[SHARDS[3]]


def test_profile_retries_reach_the_stage_jobs(tmp_path, tiny_model_dir):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    defs = build_definitions([spec], _profile(tmp_path / "s", retries=2))
    assert defs.resolve_job_def("ops_shards").op_retry_policy.max_retries == 2
    assert build_definitions([spec], _profile(tmp_path / "s")).resolve_job_def("ops_shards").op_retry_policy is None


def test_parallel_shards_need_a_persistent_instance(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, tiny_model_dir)
    defs = build_definitions([spec], _profile(tmp_path / "s", "multiprocess", 2))
    with pytest.raises(ValueError, match="persistent Dagster instance"):
        materialize_pipeline(defs, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None,
                             log_level="CRITICAL")
