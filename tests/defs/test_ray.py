"""Ray, for real: the user pipeline materialized through the ``ray`` deployment profile on a
two-node Ray cluster started on this machine (tests/services/ray_cluster.py: a head node and a
worker node, separate processes, directories and ports), each run a Ray job that dagster-ray's
``RayRunLauncher`` submits from the run queue of ``attribution materialize``
(``materialize_pipeline``: Dagster's ``QueuedRunCoordinator``, run monitoring and run retries).

- the ``ray`` profile's instance settings name the launcher, forward the environment by name and
  ask Ray for one GPU per run when the profile says so (no cluster needed);
- while the shards stage runs, the worker node is killed (every process by pid) as soon as a
  shard range is in its step there: Ray declares the node and the run's job dead, run
  monitoring marks the run failed, Dagster's run retry runs the range on the head; a new worker
  node joins and the later stages run on both;
- gradient stores, autocorrelation and score tables are bit-identical to ``local``: every
  shard's rows exactly once.

One materialization serves both checks (each Ray run pays a process start and the code
location's import, 20-40 s on this 2-core machine). The instance is Postgres
(tests/services/postgres.py) where its binaries exist, as a multi-node cluster needs; else
SQLite, which serves here because both nodes are this machine. The output (``-s``) lists the
nodes and which node ran which run, with the killed node.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import numpy as np
import pandas as pd
import pytest
import yaml
from dagster._core.code_pointer import FileCodePointer
from dagster._core.origin import RepositoryPythonOrigin

from attribution_assets.defs import planning, runner
from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.instance import (
    RAY_ENV_VARS,
    instance_settings,
    launcher_settings,
    persistent_instance,
)
from attribution_assets.defs.profiles import (
    DeploymentProfile,
    ProfileError,
    load_profile,
    profile_from_mapping,
)
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.autocorrelation import load_autocorrelation
from tests.helpers import SENTENCES, local_profile, user_pipeline_spec
from tests.services.ray_cluster import RayCluster, running_ray_cluster

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)

try:  # a real PostgreSQL server where tests/services/postgres.py and the binaries exist
    from tests.services import postgres as pg
except ImportError:
    pg = None

PASSWORD_ENV = "ATTRIBUTION_TEST_RAY_PG_PASSWORD"
#: Seconds between run monitoring passes (the profile's default is 30).
MONITOR_SECONDS = 1
TIMEOUT = 300.0


def _profile(root, **ray) -> DeploymentProfile:
    return DeploymentProfile("ray-test", None, StorageResource(root=str(root)), ComputeResource(threads=1),
                             executor="ray", max_concurrent=2, max_retries=1, ray=ray or None)


# -- settings (no cluster) ------------------------------------------------------------------


def test_the_ray_profile_names_dagster_rays_launcher(monkeypatch):
    monkeypatch.setenv("ATTRIBUTION_PG_PASSWORD", "secret")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    profile = load_profile("ray")
    assert profile.executor == "ray" and profile.queued and profile.instance_storage == "postgres"
    settings = instance_settings(profile)
    launcher = settings["run_launcher"]
    assert (launcher["module"], launcher["class"]) == ("dagster_ray", "RayRunLauncher")
    config = launcher["config"]["ray"]
    assert config["address"] == {"env": "RAY_ADDRESS"}
    assert config["num_gpus"] == 1 and config["num_cpus"] == 4
    # names only: dagster-ray takes the values from the daemon's environment; no secret (Ray's job
    # list shows them): the Postgres password comes from the nodes' own environment
    assert config["env_vars"] == list(RAY_ENV_VARS) and "ATTRIBUTION_PG_PASSWORD" not in config["env_vars"]
    assert settings["storage"]["postgres"]["postgres_db"]["password"] == {"env": "ATTRIBUTION_PG_PASSWORD"}
    assert settings["run_retries"]["max_retries"] == 2
    # GPU steps at once over the cluster, not this machine's GPUs
    assert settings["concurrency"] == {"pools": {"default_limit": 8}, "runs": {"max_concurrent_runs": 8}}
    # what dagster.yaml holds is what dagster-ray's launcher accepts (env var resolved)
    from dagster._config import process_config
    from dagster._config.field_utils import Shape
    from dagster_ray import RayRunLauncher

    checked = process_config(Shape(RayRunLauncher.config_type()), launcher["config"])
    assert checked.success, checked.errors
    assert checked.value["ray"]["address"] == "http://127.0.0.1:8265"


def test_one_gpu_per_run_when_the_profile_asks(tmp_path):
    """``num_gpus: 1`` reaches Ray's job submission as ``entrypoint_num_gpus=1`` (Ray then sets the
    run's CUDA_VISIBLE_DEVICES to the GPU it assigned); a cuda profile without it is refused."""
    from dagster_ray import RayRunLauncher

    gpu = DeploymentProfile("ray-gpu", None, StorageResource(root=str(tmp_path)),
                            ComputeResource(device="cuda"), executor="ray",
                            ray={"address": "http://127.0.0.1:1", "num_gpus": 1, "env_vars": ["HF_HOME=/models"]})
    config = launcher_settings(gpu)["run_launcher"]["config"]
    launcher = RayRunLauncher.from_config_value(None, config)
    assert (launcher.num_gpus, launcher.num_cpus) == (1, 1)
    assert "HF_HOME=/models" in launcher.env_vars and "HF_HOME" not in launcher.env_vars

    submitted = {}

    class Client:  # stands in for Ray's JobSubmissionClient: what would be submitted
        def submit_job(self, **kwargs):
            submitted.update(kwargs)

    launcher.__dict__["client"] = Client()  # its cached property
    with dg.instance_for_test() as instance:
        launcher.register_instance(instance)
        origin = RepositoryPythonOrigin(sys.executable, FileCodePointer(__file__, "defs")).get_job_origin("j")
        run = instance.add_run(dg.DagsterRun(job_name="j", run_id="r1", job_code_origin=origin))
        launcher._launch_ray_job("dagster-run-r1", "true", run)
    assert submitted["entrypoint_num_gpus"] == 1 and submitted["entrypoint_num_cpus"] == 1
    assert submitted["runtime_env"]["env_vars"]["HF_HOME"] == "/models"

    with pytest.raises(ProfileError, match="num_gpus: 1"):
        launcher_settings(DeploymentProfile("ray-gpu", None, StorageResource(root=str(tmp_path)),
                                            ComputeResource(device="cuda"), executor="ray"))
    assert launcher_settings(_profile(tmp_path)) == launcher_settings(_profile(tmp_path, num_cpus=1))
    assert launcher_settings(DeploymentProfile("local", None, StorageResource(), ComputeResource())) == {}


def _wait(what, timeout: float = TIMEOUT):
    """``what()`` once it is truthy, polled every 0.2 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"not after {timeout:.0f} s: {what.__doc__ or what}")


def _timeline(instance, run_id: str) -> str:
    """Seconds from a run's creation to its queue, launch, start and end events."""
    records = instance.get_records_for_run(run_id).records
    first = instance.get_run_record_by_id(run_id).create_timestamp.timestamp()
    marks = []
    for record in records:
        entry = record.event_log_entry
        event = entry.dagster_event
        if event is None:
            continue
        label = {"PIPELINE_ENQUEUED": "queued", "PIPELINE_STARTING": "launching", "PIPELINE_START": "started",
                 "STEP_START": "step", "PIPELINE_SUCCESS": "success", "PIPELINE_FAILURE": "failure",
                 }.get(event.event_type_value)
        if event.event_type_value == "ENGINE_EVENT" and event.message == "Ray run job created":
            label = "ray job submitted"
        if label:
            marks.append(f"{label} {entry.timestamp - first:.1f}s")
    return ", ".join(marks)


def _ray_job(run_id: str) -> str:
    """dagster-ray's submission id of a run's Ray job."""
    return f"dagster-run-{run_id}"


# -- the user pipeline through the ray profile ------------------------------------------------

SHARDS = [f"shard-{i:05d}" for i in range(4)]
#: Every stage up to the score tables (the DuckDB views over them are one more run, of no interest here).
STAGES = [s for s in planning.STAGES if s.name != "database"]


def _pipeline_spec(base: Path, model_dir: Path):
    """The user pipeline over 16 documents in 4 shards of 4 (as tests/defs/test_scale_out.py)."""
    spec = user_pipeline_spec(base, model_dir)
    texts = [f"{s} ({i})" for i, s in enumerate((SENTENCES * 3)[:16])]
    (base / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return spec


def _ray_profile(root: Path, postgres) -> DeploymentProfile:
    """resources/ray.yaml as shipped, for this machine: storage under ``root``, CPU, 2 runs of 2
    shards at once with one CPU each (one per node), one retry; the Postgres server of the test
    (else SQLite, which serves because every node is this machine)."""
    raw = yaml.safe_load((Path(__file__).parents[2] / "resources" / "ray.yaml").read_text())
    raw["storage"]["root"] = str(root)
    raw["compute"].update(device="cpu", threads=1, allow_tf32=False)
    raw["executor"].update(max_concurrent=2, shards_per_run=2, max_retries=1)
    raw["executor"]["ray"].update(num_cpus=1)
    del raw["executor"]["ray"]["num_gpus"]
    if postgres is None:
        raw["instance"] = {"storage": "sqlite"}
    else:
        raw["instance"]["postgres"].update(hostname=postgres.host, port=postgres.port, db_name=postgres.db,
                                           username=postgres.user, password_env=PASSWORD_ENV)
    return profile_from_mapping(raw, "resources/ray.yaml (test)", "ray")


@dataclasses.dataclass
class RayPipeline:
    """What the fixture did: the cluster, the instance, both storages, the killed run and its retry."""

    cluster: RayCluster
    instance: dg.DagsterInstance
    local: PipelinePaths
    ray: PipelinePaths
    victim: dg.DagsterRun  # the shards run that was in its step on the worker node when it was killed
    retry_id: str
    reasons: list[str]  # the killed run's failure messages
    secret: str | None  # the instance's Postgres password (None: SQLite)


def _run_nodes(ray: RayPipeline, records) -> list[tuple[str, ...]]:
    """(stage, shard range, run id, Ray node, status, timeline) of each run, in creation order."""
    rows = []
    for record in sorted(records, key=lambda r: r.create_timestamp):
        run = record.dagster_run
        start, end = (run.tags.get(f"dagster/asset_partition_range_{k}") for k in ("start", "end"))
        shards = f"{start[-2:]}..{end[-2:]}" if start else "-"
        node = ray.cluster.job_node(_ray_job(run.run_id))
        retry = f" (retry of {run.parent_run_id[:8]})" if run.parent_run_id else ""
        rows.append((run.tags.get("attribution/stage", "?"), shards, run.run_id[:8] + retry, node,
                     run.status.value, _timeline(ray.instance, run.run_id)))
    return rows


def _print_runs(title: str, rows) -> None:
    print(title)
    for stage, shards, run, node, status, timeline in rows:
        print(f"  {stage:<8} shards {shards:<6} run {run:<27} on {node:<13} {status:<7} ({timeline})")


def _kill_the_worker_mid_stage(cluster: RayCluster, instance: dg.DagsterInstance) -> tuple:
    """Once a shards run is in its step on the worker node, kill the node (every process by pid);
    wait until Ray declared it dead, run monitoring failed the run and Dagster's retry started on
    the head; then a new worker node joins. Returns ``(victim, retry id, failure messages)``."""

    def on_worker():
        """a shards run in its step on the worker node"""
        for run in instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED],
                                                           tags={"attribution/stage": "shards"})):
            if instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.STEP_START).records \
                    and cluster.job_node(_ray_job(run.run_id)) == "worker":
                return run
        return None

    victim = _wait(on_worker)
    shards = f"{victim.tags['dagster/asset_partition_range_start']} .. {victim.tags['dagster/asset_partition_range_end']}"
    print(f"run {victim.run_id[:8]} (shards {shards}) is in its step on the worker node: killing the node")
    killed_at = time.monotonic()
    pids = cluster.worker.kill()
    print(f"killed the worker node: {len(pids)} processes by pid; none is left")
    cluster.wait_for(["head"], 60)
    print(f"Ray declared the node dead after {time.monotonic() - killed_at:.0f} s:\n{cluster.describe()}")

    def failed():
        """the killed run failed"""
        run = instance.get_run_by_id(victim.run_id)
        return run if run.is_finished else None

    run = _wait(failed)
    reasons = [r.event_log_entry.dagster_event.message for r in instance.get_records_for_run(
        victim.run_id, of_type=dg.DagsterEventType.PIPELINE_FAILURE).records]
    print(f"run {victim.run_id[:8]} {run.status.value} {time.monotonic() - killed_at:.0f} s after the kill: "
          f"{reasons[0].splitlines()[0][:150] if reasons else '?'}")
    retry_id = _wait(lambda: instance.get_run_by_id(victim.run_id).tags.get("dagster/auto_retry_run_id"))
    node = _wait(lambda: (node := cluster.job_node(_ray_job(retry_id))) != "?" and node)
    print(f"retry {retry_id[:8]} started on the {node} node {time.monotonic() - killed_at:.0f} s after the kill; "
          "a new worker node joins")
    cluster.restart_worker()
    print(f"nodes:\n{cluster.describe()}")
    return victim, retry_id, reasons


@pytest.fixture(scope="module")
def ray_pipeline(tmp_path_factory, tiny_model_dir) -> Iterator[RayPipeline]:
    """The user pipeline materialized in this process (``local``), and through the ``ray``
    profile on the two-node cluster with ``attribution materialize``'s ``materialize_pipeline``
    (its queue session: daemon threads and a code server; each run a Ray job), the worker node
    killed while a shard range runs on it (:func:`_kill_the_worker_mid_stage`).

    The runner's own check for runs whose process died is off: it sees processes of this host
    only; on a real cluster a run on another node is Ray's (and run monitoring's) to report."""
    started = time.monotonic()
    base = tmp_path_factory.mktemp("ray-pipeline")
    spec = _pipeline_spec(base, tiny_model_dir)
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(pg.running_postgres(db="ray_pipeline")) \
            if pg is not None and pg.skip_reason() is None else None
        secret = {PASSWORD_ENV: server.password} if server is not None else {}
        # the nodes hold the instance's password in their own environment, as on a real cluster
        cluster = stack.enter_context(running_ray_cluster(env=secret, wait=False))
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name, value in {**secret, "RAY_ADDRESS": cluster.dashboard_url,  # the profile's address
                            "DAGSTER_HOME": str(base / "home")}.items():  # persistent_instance sets it
            patch.setenv(name, value)
        patch.setattr(runner, "release_dead_runs", lambda *args, **kwargs: [])
        # meanwhile the nodes start: the same pipeline in this process
        local = build_definitions([spec], local_profile(base / "local", threads=1))
        materialize_pipeline(local, spec, dg.DagsterInstance.ephemeral(), stages=STAGES, log=lambda _: None,
                             log_level="WARNING")
        profile = _ray_profile(base / "ray", server)
        persistent_instance(base / "home", profile).dispose()  # writes dagster.yaml
        config = base / "home" / "dagster.yaml"  # run monitoring every second (the profile's: 30 s)
        settings = yaml.safe_load(config.read_text())
        settings["run_monitoring"].update(poll_interval_seconds=MONITOR_SECONDS)
        config.write_text(yaml.safe_dump(settings, sort_keys=False))
        instance = stack.enter_context(dg.DagsterInstance.from_config(str(base / "home")))
        defs = build_definitions([spec], profile)
        cluster.wait_for(["head", "worker"])
        print(f"\nRay cluster up ({profile.instance_storage} instance) after {time.monotonic() - started:.0f} s; "
              f"nodes:\n{cluster.describe()}")
        errors = []

        def materialize():
            try:
                materialize_pipeline(defs, spec, instance, stages=STAGES, log=lambda _: None, log_level="WARNING")
            except Exception as exc:  # raised below
                errors.append(exc)

        began = time.monotonic()
        thread = threading.Thread(target=materialize)
        thread.start()
        try:
            victim, retry_id, reasons = _kill_the_worker_mid_stage(cluster, instance)
        finally:
            thread.join(2 * TIMEOUT)
        if thread.is_alive() or errors:
            raise RuntimeError(f"materializing through Ray failed: {errors or 'still running'}")
        print(f"materialized through Ray in {time.monotonic() - began:.0f} s")
        yield RayPipeline(cluster, instance, PipelinePaths.under(base / "local", spec.name),
                          PipelinePaths.under(base / "ray", spec.name), victim, retry_id, reasons,
                          server.password if server is not None else None)


def _assert_same_results(local: PipelinePaths, ray: PipelinePaths) -> None:
    """Gradient stores, autocorrelation and score tables bit-identical; every shard's documents
    and score rows exactly once."""
    assert local.gradient_shards() == ray.gradient_shards() == SHARDS
    seen = []
    for shard in SHARDS:
        a, b = GradientStore(local.train_gradients(shard)), GradientStore(ray.train_gradients(shard))
        assert a.doc_ids == b.doc_ids and len(set(b.doc_ids)) == len(b.doc_ids)
        np.testing.assert_array_equal(np.asarray(b.array), np.asarray(a.array))
        sa, sb = (pd.read_parquet(p.scores(shard)).sort_values(["query_id", "doc_id"]).reset_index(drop=True)
                  for p in (local, ray))
        assert not sb.duplicated(["query_id", "doc_id"]).any()
        pd.testing.assert_frame_equal(sb, sa, check_exact=True)
        seen += b.doc_ids
    assert len(seen) == len(set(seen)) == 16
    ra, rb = load_autocorrelation(local.autocorrelation), load_autocorrelation(ray.autocorrelation)
    assert ra.n == rb.n == 16
    for m in ra.layout:
        np.testing.assert_array_equal(rb.matrices[m.name], ra.matrices[m.name])


def test_the_pipeline_through_ray_equals_local(ray_pipeline):
    """Every stage ran as Ray jobs on both nodes; the results are bit-identical to ``local``."""
    ray = ray_pipeline
    rows = _run_nodes(ray, ray.instance.get_run_records())
    _print_runs("runs (stage, shards, run, Ray node, status, seconds from creation):", rows)
    _assert_same_results(ray.local, ray.ray)
    finals = sorted((stage, shards) for stage, shards, _, _, status, _ in rows if status == "SUCCESS")
    assert finals == sorted([("prepare", "-"), ("shards", "00..01"), ("shards", "02..03"), ("fan_in", "-"),
                             ("scores", "00..01"), ("scores", "02..03")])
    assert {node for _, shards, _, node, status, _ in rows if shards != "-" and status == "SUCCESS"} \
        == {"head", "worker"}  # both nodes ran shard ranges (the new worker node the scores)


def test_the_run_on_the_killed_node_was_retried_on_the_head(ray_pipeline):
    """The killed node's run: failed by run monitoring from its Ray job's status (dagster-ray's
    health check; no secret in the message), retried once by Dagster, the retry on the head."""
    ray = ray_pipeline
    failed = ray.instance.get_run_by_id(ray.victim.run_id)
    assert failed.status == dg.DagsterRunStatus.FAILURE
    assert any("Ray job" in reason for reason in ray.reasons), ray.reasons
    assert ray.secret is None or not any(ray.secret in reason for reason in ray.reasons)
    assert ray.cluster.client().get_job_status(_ray_job(failed.run_id)).value == "FAILED"
    assert ray.cluster.job_node(_ray_job(failed.run_id)) == "killed worker"
    retry = ray.instance.get_run_by_id(ray.retry_id)
    assert retry.status == dg.DagsterRunStatus.SUCCESS and retry.parent_run_id == failed.run_id
    assert retry.tags["dagster/retry_number"] == "1"
    assert ray.cluster.job_node(_ray_job(retry.run_id)) == "head"
    assert ray.cluster.client().get_job_status(_ray_job(retry.run_id)).value == "SUCCEEDED"
