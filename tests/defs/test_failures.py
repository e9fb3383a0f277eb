"""Surviving failures: kills mid-write, corrupted files, NaN gradients, races, bad storage."""

import subprocess
import sys
import threading

import dagster as dg
import numpy as np
import pytest

from attribution_assets.defs.resources import StorageResource
from attribution_assets.defs.runner import FORCE_TAG, materialize_pipeline
from attribution_assets.engine.gradients import collect as collect_module
from attribution_assets.engine.gradients.store import GradientStore, write_store
from tests.helpers import definitions_for, user_pipeline_spec

INFO = {"dims": 4, "modules": [{"name": "m", "start": 0, "stop": 4, "shape": [2, 2], "has_bias": False}],
        "projection": {"dim": 2, "kind": "rademacher", "seed": 0}, "normalizer": None, "config_hash": "x"}


@pytest.fixture
def pipeline(tmp_path, tiny_model_dir):
    spec = user_pipeline_spec(tmp_path, tiny_model_dir)
    defs = definitions_for([spec], tmp_path / "storage")
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="WARNING")
    return spec, defs, instance, tmp_path / "storage" / "ops"


def _check(defs, instance, name="files_intact"):
    result = dg.materialize(defs.assets, selection=dg.AssetSelection.checks(
        dg.AssetCheckKey(dg.AssetKey(["ops", "train_gradients"]), name)), resources=defs.resources,
        instance=instance, raise_on_error=False)
    (evaluation,) = [e.asset_check_evaluation_data for e in result.all_events
                     if e.event_type_value == "ASSET_CHECK_EVALUATION"]
    return evaluation


def test_process_killed_mid_write_leaves_no_complete_looking_partition(tmp_path):
    final = tmp_path / "train_gradients" / "shard-00000"
    script = f"""
import os, numpy as np
from attribution_assets.engine.gradients import store
def write_then_die(path, *args):
    with open(path, "wb") as f:
        f.write(b"\\x93NUMPY half a file")
    os._exit(137)  # a kill: no cleanup handler runs
store._write_array = write_then_die
store.write_store({str(final)!r}, np.ones((3, 4), np.float32), {INFO!r}, doc_ids=["a", "b", "c"],
                  model_fingerprint="f")
"""
    assert subprocess.run([sys.executable, "-c", script]).returncode == 137
    assert not final.exists(), "a killed write must not leave the final partition path"
    write_store(final, np.ones((3, 4), np.float32), INFO, doc_ids=["a", "b", "c"], model_fingerprint="f")
    assert GradientStore(final).rows == 3


def test_truncated_gradient_file_fails_check_naming_it_and_is_rebuilt(pipeline):
    spec, defs, instance, root = pipeline
    assert _check(defs, instance).passed
    broken = root / "train_gradients" / "shard-00001" / "gradients.npy"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])
    evaluation = _check(defs, instance)
    assert not evaluation.passed and str(broken) in evaluation.description
    dg.materialize(defs.assets, selection=[dg.AssetKey(["ops", "train_gradients"])], partition_key="shard-00001",
                   resources=defs.resources, instance=instance)
    assert _check(defs, instance).passed


def test_nan_gradients_fail_and_nothing_downstream_runs(pipeline, monkeypatch):
    spec, defs, instance, root = pipeline
    real = collect_module.collect

    def poisoned(collector, docs, *args):
        array, info, stats = real(collector, docs, *args)
        array[0, 0] = np.nan
        return array, info, stats

    monkeypatch.setattr(collect_module, "collect", poisoned)
    before = (root / "train_gradients" / "shard-00000" / "gradients.npy").read_bytes()
    result = dg.materialize(defs.assets, selection=[dg.AssetKey(["ops", "train_gradients"]),
                                                     dg.AssetKey(["ops", "scores"])],
                            partition_key="shard-00000", resources=defs.resources, instance=instance,
                            raise_on_error=False, tags={FORCE_TAG: "true"})  # recompute, no reuse
    assert not result.success
    failed = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "NaN or Inf" in failed[0].event_specific_data.error.to_string()
    materialized = {e.asset_key.path[-1] for e in result.all_events if e.event_type_value == "ASSET_MATERIALIZATION"}
    assert materialized == set(), "scores must not run on NaN gradients"
    assert (root / "train_gradients" / "shard-00000" / "gradients.npy").read_bytes() == before


def test_concurrent_writers_of_one_partition_never_corrupt_it(tmp_path):
    final = tmp_path / "shard"
    arrays = [np.full((50, 4), i, np.float32) for i in range(6)]

    def write(array):
        write_store(final, array, INFO, doc_ids=[str(i) for i in range(50)], model_fingerprint="f")

    threads = [threading.Thread(target=write, args=(a,)) for a in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = GradientStore(final)
    assert any(np.array_equal(store.array, a) for a in arrays)
    assert [p.name for p in tmp_path.iterdir()] == ["shard"], "no temporary directories left"


def test_unwritable_or_full_storage_fails_before_any_work(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="not writable"):
        StorageResource(root=str(blocker / "root")).ensure_writable()
    monkeypatch.setattr("shutil.disk_usage", lambda _: type("U", (), {"free": 1 << 20})())
    with pytest.raises(OSError, match="MiB free"):
        StorageResource(root=str(tmp_path / "ok")).ensure_writable()
