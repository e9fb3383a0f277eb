"""Scale-out through Dagster's run queue: shard ranges as queued runs (each in a process of its
own, two at once) give the same stores and scores as one process; a failed range does not stop
the others and is retried by Dagster's run retries; a run whose process is killed is released
and retried (both in one stage); per-shard autocorrelation sums merge exactly."""

import dataclasses
import json
import os
import signal
import threading
import time

import dagster as dg
import numpy as np
import pandas as pd
import pytest

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.instance import persistent_instance
from attribution_assets.defs.planning import Stage, chunk_ranges
from attribution_assets.defs.profiles import DeploymentProfile, profile_from_json
from attribution_assets.defs.queue import QueuedRunsError
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.defs.runs import PID_TAG
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.autocorrelation import load_autocorrelation
from tests.helpers import SENTENCES, user_pipeline_spec
from tests.services import postgres as postgres_service

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)

postgres_server = postgres_service.postgres_server  # the fixture, for this module

SHARDS = [f"shard-{i:05d}" for i in range(4)]


def _spec(base, model_dir):
    """The user pipeline over 16 documents in 4 shards of 4."""
    spec = user_pipeline_spec(base, model_dir)
    texts = [f"{s} ({i})" for i, s in enumerate((SENTENCES * 3)[:16])]
    (base / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return spec


def _profile(root, executor="in_process", workers=None, retries=0, shards_per_run=None):
    return DeploymentProfile("test", None, StorageResource(root=str(root)), ComputeResource(threads=1),
                             executor=executor, max_concurrent=workers, max_retries=retries,
                             shards_per_run=shards_per_run)


@pytest.fixture(scope="module")
def two_ways(tmp_path_factory, tiny_model_dir):
    """The same pipeline materialized in one process and through the run queue (2 shards a run,
    2 runs at once, one retry)."""
    base = tmp_path_factory.mktemp("scale")
    spec = _spec(base, tiny_model_dir)
    one = build_definitions([spec], _profile(base / "one"))
    here = dg.DagsterInstance.ephemeral()
    materialize_pipeline(one, spec, here, log=lambda _: None, log_level="WARNING")
    profile = _profile(base / "two", "multiprocess", 2, retries=1, shards_per_run=2)
    instance = persistent_instance(base / "home", profile)
    two = build_definitions([spec], profile)
    messages = []
    materialize_pipeline(two, spec, instance, log=messages.append, log_level="WARNING")
    return spec, PipelinePaths.under(base / "one", spec.name), PipelinePaths.under(base / "two", spec.name), \
        instance, messages, two, here


def _overlapping(instance, records) -> int:
    """Pairs of runs in flight at the same time: from the queue's launch (RUN_STARTING: its
    process starts) to the run's end."""
    def window(record):
        launched = instance.get_records_for_run(record.dagster_run.run_id,
                                                of_type=dg.DagsterEventType.RUN_STARTING).records
        return launched[0].event_log_entry.timestamp, record.end_time

    windows = [window(r) for r in records]
    return sum(a[0] < b[1] and b[0] < a[1] for i, a in enumerate(windows) for b in windows[i + 1:])


def test_chunk_ranges_cuts_what_a_multi_run_backfill_would():
    order = [f"s{i}" for i in range(7)]
    assert chunk_ranges([("s0", "s3")], order, 2) == [("s0", "s1"), ("s2", "s3")]
    assert chunk_ranges([("s0", "s0"), ("s2", "s6")], order, 2) == [("s0", "s0"), ("s2", "s3"), ("s4", "s5"),
                                                                    ("s6", "s6")]
    assert chunk_ranges([("s0", "s6")], order, None) == [("s0", "s6")]
    assert chunk_ranges([], order, 2) == []


def test_profile_survives_the_trip_to_another_process(tmp_path):
    profile = _profile(tmp_path, "multiprocess", 3, retries=2, shards_per_run=4)
    again = profile_from_json(profile.to_json())
    assert (again.executor, again.max_concurrent, again.max_retries, again.workers, again.shards_per_run) == \
        ("multiprocess", 3, 2, 3, 4)
    assert again.storage.root == str(tmp_path) and again.compute.threads == 1


def test_shard_assets_take_the_profiles_backfill_policy(tmp_path, tiny_model_dir):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    graph = build_definitions([spec], _profile(tmp_path / "s", "multiprocess", 2, shards_per_run=3)) \
        .resolve_asset_graph()
    policies = {k.path[-1]: graph.get(k).backfill_policy for k in graph.get_all_asset_keys()
                if graph.get(k).partitions_def is not None}
    assert set(policies) >= {"tokenized_shards", "train_gradients", "shard_autocorr", "scores"}
    assert all(p == dg.BackfillPolicy.multi_run(max_partitions_per_run=3) for p in policies.values())


def test_specs_survive_the_trip_to_a_worker(tmp_path, tiny_model_dir):
    from attribution_assets.spec import GradientSpec, demo_spec, spec_from_json, spec_to_json

    for spec in (demo_spec(gradients=GradientSpec(projection_dim=8, include=("*mlp*",))),
                 user_pipeline_spec(tmp_path, tiny_model_dir)):
        assert spec_from_json(json.loads(json.dumps(spec_to_json(spec)))) == spec


def test_two_workers_give_the_same_stores_and_scores_as_one_process(two_ways):
    spec, one, two, instance, messages, _, _ = two_ways
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
    # the shards stage ran as two queued runs of two shards, at the same time, in processes of their
    # own, with the code location's origin (the UI lists them under their job)
    records = instance.get_run_records(filters=dg.RunsFilter(tags={"attribution/stage": "shards"}))
    ranges = sorted((r.dagster_run.tags["dagster/asset_partition_range_start"],
                     r.dagster_run.tags["dagster/asset_partition_range_end"]) for r in records)
    assert ranges == [(SHARDS[0], SHARDS[1]), (SHARDS[2], SHARDS[3])]
    assert {r.dagster_run.remote_job_origin.location_name for r in records} == {"attribution_assets"}
    assert {r.dagster_run.job_name for r in records} == {"ops_shards"}
    pids = {r.dagster_run.tags[PID_TAG] for r in records}
    assert len(pids) == 2 and str(os.getpid()) not in pids
    assert _overlapping(instance, records) == 1  # both in flight at once
    assert "ops shards: 2 runs queued, 2 at once" in messages


@pytest.mark.parametrize("where", ["in this process", "queued"])
def test_runs_belong_to_their_jobs_and_shards_to_their_runs(two_ways, where):
    """What the UI shows: every run carries the code location's origin (its job page lists it);
    each shard's latest materialization belongs to the run that made it, with the shard's own data
    version; each check of the run is evaluated against the asset's latest materialization; one
    materialization per shard and run, none runless."""
    from dagster._core.storage.tags import REPOSITORY_LABEL_TAG

    spec, _, _, queued, _, _, here = two_ways
    instance = here if where == "in this process" else queued
    runs = instance.get_runs()
    assert runs and all(r.remote_job_origin.location_name == "attribution_assets" for r in runs)
    labelled = instance.get_runs(filters=dg.RunsFilter(tags={REPOSITORY_LABEL_TAG: "__repository__@attribution_assets"}))
    assert len(labelled) == len(runs)  # what a job page's run list filters on
    assert {r.job_name for r in runs} >= {"ops_prepare", "ops_shards", "ops_scores"}
    train = dg.AssetKey(["ops", "train_gradients"])
    versions = set()
    for shard in SHARDS:
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=train, asset_partitions=[shard]), limit=1).records
        run = instance.get_run_by_id(record.run_id)
        assert run.job_name == "ops_shards" and run.tags["dagster/asset_partition_range_start"] <= shard
        materialization = record.asset_materialization
        version = materialization.tags["dagster/data_version"]
        assert version == materialization.metadata["content_version"].value
        versions.add(version)
    assert len(versions) == len(SHARDS)  # each shard its own version, not its run's
    latest = instance.fetch_materializations(train, limit=1).records[0]
    for name in ("finite", "row_count", "settings", "files_intact"):
        (execution,) = instance.event_log_storage.get_asset_check_execution_history(
            dg.AssetCheckKey(train, name), limit=1)
        assert execution.status.value == "SUCCEEDED" and execution.run_id == latest.run_id, name
        assert execution.event.dagster_event.event_specific_data.target_materialization_data.storage_id \
            == latest.storage_id, name
    records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=train), limit=1000).records
    assert all(r.run_id for r in records)  # no runless materialization
    made = [(r.run_id, r.partition_key) for r in records]
    assert len(made) == len(set(made)) and {shard for _, shard in made} == set(SHARDS)  # one per shard and run


def test_merged_shard_sums_equal_the_autocorrelation_of_all_rows(two_ways):
    _, _, two, _, _, _, _ = two_ways
    rows = np.concatenate([GradientStore(two.train_gradients(s)).document_rows() for s in SHARDS])
    merged = load_autocorrelation(two.autocorrelation)
    for m in merged.layout:
        x = rows[:, m.start:m.stop].astype(np.float64)
        np.testing.assert_allclose(merged.matrices[m.name], x.T @ x / len(x), rtol=1e-10, atol=1e-14)


def test_a_failed_range_and_a_killed_run_leave_every_other_shard_written_once(two_ways):
    """One stage, two queued runs of two shards: shard 3's tokens are corrupt, so its range's run
    fails, is retried once by Dagster (the profile's ``max_retries``) and fails again; the other
    range's process is killed with SIGKILL (as the OOM killer would), the runner marks the run
    failed and Dagster's run retry re-executes it. The stage raises after both settled, naming the
    failed range and its run; the killed range's shards are written exactly once and equal one
    process; the failed shard's old store is untouched."""
    spec, one, two, instance, _, defs, _ = two_ways
    tokens = two.tokens(SHARDS[3])
    saved = tokens.read_bytes()
    before = {s: two.train_gradients(s).stat().st_mtime_ns for s in SHARDS}
    grads = [Stage("shards", ("train_gradients",), True)]
    killed, errors = [], []

    def materialize():
        try:
            materialize_pipeline(defs, spec, instance, stages=grads, log=lambda _: None, log_level="CRITICAL",
                                 force=True)
        except Exception as exc:  # asserted below
            errors.append(exc)

    tokens.write_bytes(b"not parquet")
    try:
        started = time.time()
        worker = threading.Thread(target=materialize)
        worker.start()
        while not killed and worker.is_alive() and time.time() - started < 600:
            for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED], tags={
                    "attribution/force": "true", "dagster/asset_partition_range_start": SHARDS[0]})):
                if run.tags.get(PID_TAG, "").isdigit() and int(run.tags[PID_TAG]) != os.getpid():
                    os.kill(int(run.tags[PID_TAG]), signal.SIGKILL)
                    killed.append(run.run_id)
                    break
            time.sleep(0.2)
        worker.join()
    finally:
        tokens.write_bytes(saved)
    assert killed and len(errors) == 1 and isinstance(errors[0], QueuedRunsError), errors
    failure = errors[0]
    assert failure.failed_in.endswith(f"[{SHARDS[2]} .. {SHARDS[3]}]") and "train_gradients" in failure.failed_in
    assert str(failure).count("(run ") == 1  # the killed range's retry succeeded: not named
    failed_run = str(failure).split("(run ")[1].split(",")[0]
    assert instance.get_run_by_id(failed_run).tags["dagster/parent_run_id"]  # the retry failed too
    assert instance.get_run_by_id(killed[0]).status == dg.DagsterRunStatus.FAILURE
    retries = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/parent_run_id": killed[0]}))
    assert [r.status for r in retries] == [dg.DagsterRunStatus.SUCCESS]
    after = {s: two.train_gradients(s).stat().st_mtime_ns for s in SHARDS}
    assert after[SHARDS[0]] > before[SHARDS[0]] and after[SHARDS[1]] > before[SHARDS[1]]  # rerun by the retry
    assert after[SHARDS[3]] == before[SHARDS[3]]  # the failed shard's old store is untouched
    for shard in SHARDS:  # every shard's rows exactly once, as one process wrote them
        a, b = GradientStore(one.train_gradients(shard)), GradientStore(two.train_gradients(shard))
        assert a.doc_ids == b.doc_ids
        np.testing.assert_allclose(np.asarray(b.array), np.asarray(a.array), rtol=0, atol=1e-6)


def test_profile_retries_reach_the_stage_jobs(tmp_path, tiny_model_dir):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    defs = build_definitions([spec], _profile(tmp_path / "s", retries=2))
    assert defs.resolve_job_def("ops_shards").op_retry_policy.max_retries == 2
    assert build_definitions([spec], _profile(tmp_path / "s")).resolve_job_def("ops_shards").op_retry_policy is None
    queued = build_definitions([spec], _profile(tmp_path / "s", "multiprocess", 2, retries=2))
    assert queued.resolve_job_def("ops_shards").op_retry_policy is None  # run retries instead, not both


def test_parallel_shards_need_a_persistent_instance(tmp_path, tiny_model_dir):
    spec = _spec(tmp_path, tiny_model_dir)
    defs = build_definitions([spec], _profile(tmp_path / "s", "multiprocess", 2))
    with pytest.raises(ValueError, match="persistent Dagster instance"):
        materialize_pipeline(defs, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None,
                             log_level="CRITICAL")


def test_a_ui_backfill_of_8_shards_runs_as_concurrent_queued_runs(tmp_path, tiny_model_dir, postgres_server,
                                                                 monkeypatch):
    """The UI's own GraphQL mutation launches a backfill of 8 shards; the backfill daemon cuts it
    by the profile's policy (4 shards a run) and the run queue runs them, 2 at once, on an
    instance in a real PostgreSQL server (what several processes or nodes share). The backfill
    daemon looks every second here instead of Dagster's 30 s, which only shortens its waits."""
    from dagster._core.execution.backfill import BulkActionStatus
    from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION
    from dagster_graphql.test.utils import execute_dagster_graphql

    from attribution_assets.defs.queue import DAEMONS, QueueSession
    from attribution_assets.defs.runs import recipe_of

    spec = _spec(tmp_path, tiny_model_dir)
    spec = dataclasses.replace(spec, shard_size=2)  # 16 documents: 8 shards
    pytest.importorskip("dagster_postgres", reason="dagster-postgres is not installed")
    monkeypatch.setenv("ATTRIBUTION_TEST_PG_PASSWORD", postgres_server.password)  # the runs inherit it
    monkeypatch.setattr("dagster._daemon.controller.DEFAULT_DAEMON_INTERVAL_SECONDS", 1)
    postgres = {"hostname": postgres_server.host, "port": postgres_server.port, "username": postgres_server.user,
                "db_name": postgres_server.create_database("backfill"), "password_env": "ATTRIBUTION_TEST_PG_PASSWORD"}
    profile = dataclasses.replace(_profile(tmp_path / "storage", "multiprocess", 2, shards_per_run=4),
                                  instance={"storage": "postgres", "postgres": postgres})
    instance = persistent_instance(tmp_path / "home", profile)
    defs = build_definitions([spec], profile)
    materialize_pipeline(defs, spec, instance, stages=[Stage("prepare", ("corpus", "tokenizer"), False)],
                         log=lambda _: None, log_level="CRITICAL")
    shards = instance.get_dynamic_partitions("ops_shards")
    assert len(shards) == 8
    with QueueSession(instance, recipe_of(defs), log=lambda _: None, daemons=(*DAEMONS, "BACKFILL")) as queue:
        with queue.context.create_request_context() as workspace:
            launched = execute_dagster_graphql(workspace, LAUNCH_PARTITION_BACKFILL_MUTATION, {"backfillParams": {
                "partitionNames": shards, "assetSelection": [{"path": ["ops", "tokenized_shards"]}]}})
        backfill_id = launched.data["launchPartitionBackfill"]["backfillId"]
        deadline = time.time() + 900
        while instance.get_backfill(backfill_id).status == BulkActionStatus.REQUESTED and time.time() < deadline:
            time.sleep(1)
    assert instance.get_backfill(backfill_id).status == BulkActionStatus.COMPLETED_SUCCESS
    records = instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
    ranges = sorted((r.dagster_run.tags["dagster/asset_partition_range_start"],
                     r.dagster_run.tags["dagster/asset_partition_range_end"]) for r in records)
    assert ranges == [(shards[0], shards[3]), (shards[4], shards[7])]
    assert {r.dagster_run.status for r in records} == {dg.DagsterRunStatus.SUCCESS}
    assert _overlapping(instance, records) == 1  # both runs in flight at once
    paths = PipelinePaths.under(tmp_path / "storage", spec.name)
    assert all(paths.tokens(s).exists() for s in shards)
    assert int(postgres_server.psql("select count(*) from runs", db=postgres["db_name"])) == len(records) + 1
