"""Incremental by default: a rerun with nothing changed does no work, a change reruns only what
it affects, and runs killed with ``kill -9`` neither hang later runs nor lose finished shards."""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest

from attribution_assets.defs.instance import persistent_instance
from attribution_assets.defs.runner import materialize_pipeline
from tests.helpers import definitions_for, user_pipeline_spec

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)


def _plan_lines(defs, spec, instance, **kwargs):
    lines = []
    materialize_pipeline(defs, spec, instance, log=lines.append, log_level="ERROR", **kwargs)
    return [line for line in lines if line.startswith(spec.name)]


@pytest.fixture
def ops(tmp_path, tiny_model_dir):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    instance = dg.DagsterInstance.ephemeral()
    defs = definitions_for([spec], tmp_path / "storage")
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="ERROR")
    return spec, instance, tmp_path


def test_second_materialize_with_nothing_changed_does_no_work(ops):
    from attribution_assets.defs.runner import HOST_TAG, PID_TAG

    spec, instance, base = ops
    # a run whose process died (kill -9) is marked failed even though no stage has work
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    dead = dg.DagsterRun(job_name="ops_fan_in", status=dg.DagsterRunStatus.STARTED,
                         tags={HOST_TAG: socket.gethostname(), PID_TAG: gone})
    instance.add_run(dead)
    runs = len(instance.get_runs())
    lines = []
    materialize_pipeline(definitions_for([spec], base / "storage"), spec, instance, log=lines.append,
                         log_level="ERROR")
    assert lines[0] == f"released run {dead.run_id} of ops_fan_in: its process {gone} died"
    assert all(line.endswith("up to date") for line in lines[1:]) and len(lines) > 1, lines
    assert len(instance.get_runs()) == runs
    assert instance.get_run_by_id(dead.run_id).status == dg.DagsterRunStatus.FAILURE


def test_a_setting_change_reruns_only_what_it_affects(ops):
    spec, instance, base = ops
    changed = dataclasses.replace(spec, gradients=dataclasses.replace(spec.gradients, projection_dim=2))
    lines = dict(line.split(": ", 1) for line in
                 _plan_lines(definitions_for([changed], base / "storage"), changed, instance))
    assert "query_gradients: has a new code version" in lines["ops prepare"]
    assert "corpus" not in lines["ops prepare"] and "model" not in lines["ops prepare"]
    assert lines["ops shards"] == ("train_gradients (2 of 2 shards): has a new code version; "
                                   "shard_autocorr (2 of 2 shards): has a new code version")
    assert lines["ops scores"] == "scores (2 of 2 shards): has a new code version"


def test_force_redoes_everything(ops):
    spec, instance, base = ops
    lines = _plan_lines(definitions_for([spec], base / "storage"), spec, instance, force=True)
    assert all("forced" in line for line in lines) and len(lines) == 5


KILLED_RUN = """
import os, signal, sys
sys.path.insert(0, {root!r})
from attribution_assets.engine.gradients import collect
from attribution_assets.defs.instance import persistent_instance
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.spec import load_pipeline_file
from tests.helpers import definitions_for
real = collect.collect_shard
def collect_then_die(collector, docs, out, *args, **kwargs):
    result = real(collector, docs, out, *args, **kwargs)
    if "train_gradients" in str(out):  # the first shard's store is complete on disk
        os.kill(os.getpid(), signal.SIGKILL)
    return result
collect.collect_shard = collect_then_die
(spec,) = load_pipeline_file({pipelines!r})
materialize_pipeline(definitions_for([spec], {storage!r}), spec, persistent_instance(), log_level="ERROR")
"""


def test_runs_killed_mid_shard_neither_hang_later_runs_nor_lose_finished_shards(tmp_path, tiny_model_dir,
                                                                                monkeypatch):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    home, storage = tmp_path / "home", tmp_path / "storage"
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    script = KILLED_RUN.format(root=str(ROOT), pipelines=str(tmp_path / "pipelines.yaml"), storage=str(storage))
    env = {**os.environ, "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # two kills would hold both slots of the gpu pool (limit 2)
        done = subprocess.run([sys.executable, "-c", script], env=env, cwd=tmp_path, timeout=300,
                              capture_output=True)
        assert done.returncode == -9, done.stderr.decode()[-2000:]
    instance = persistent_instance(home)
    started = time.monotonic()
    lines = []
    materialize_pipeline(definitions_for([spec], storage), spec, instance, log=lines.append,
                         log_level="ERROR")
    assert time.monotonic() - started < 240
    assert any("released run" in line for line in lines), lines
    info = instance.event_log_storage.get_concurrency_info("gpu")
    assert not info.claimed_slots, "no slot stays claimed by a dead run"
    killed = instance.get_runs(filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.FAILURE]))
    assert len(killed) == 2 and all(r.job_name == "ops_shards" for r in killed)
    event = instance.get_latest_materialization_event(dg.AssetKey(["ops", "train_gradients"]))
    reused = {}
    for record in instance.fetch_materializations(dg.AssetKey(["ops", "train_gradients"]), limit=10).records:
        m = record.asset_materialization
        reused[m.partition] = m.metadata.get("reused") is not None
    assert event is not None and reused == {"shard-00000": True, "shard-00001": True}, reused
    assert json.loads((storage / "ops" / "train_gradients" / "shard-00000" / "info.json").read_text())["producer"]


def test_each_shard_records_its_own_content_data_version(ops):
    from attribution_assets.defs.planning import _resolver
    from attribution_assets.engine.gradients.store import GradientStore

    spec, instance, base = ops
    resolver = _resolver(definitions_for([spec], base / "storage"), instance)  # what staleness reads
    asset_key = dg.AssetKey(["ops", "train_gradients"])
    shards = instance.get_dynamic_partitions("ops_shards")
    versions = {s: resolver.get_current_data_version(asset_key, s).value for s in shards}
    for shard in shards:
        assert versions[shard] == GradientStore(base / "storage" / "ops" / "train_gradients" / shard).digest()
    assert len(set(versions.values())) == len(shards) == 2


def test_precision_and_weights_replaced_in_place_make_the_model_side_unsynced(ops, tiny_model_dir):
    spec, instance, base = ops
    lines = dict(line.split(": ", 1) for line in _plan_lines(
        definitions_for([spec], base / "storage", precision="bfloat16"), spec, instance))
    assert "query_gradients: has a new code version" in lines["ops prepare"]
    assert lines["ops shards"].startswith("train_gradients (2 of 2 shards): has a new code version")
    weights = next(Path(tiny_model_dir).glob("*.safetensors"))
    stamp = weights.stat().st_mtime_ns
    try:
        os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))  # same size, new file: replaced in place
        lines = dict(line.split(": ", 1) for line in _plan_lines(
            definitions_for([spec], base / "storage"), spec, instance))
        assert lines["ops prepare"].startswith("model: has a new code version"), lines
        # downstream, the cause is named with the upstream asset whose data it changes
        assert lines["ops scores"] == "scores (2 of 2 shards): ops/preconditioner has a new data version", lines
        assert "preconditioner: ops/query_gradients has a new data version" in lines["ops fan_in"], lines
    finally:
        os.utime(weights, ns=(stamp, stamp))
