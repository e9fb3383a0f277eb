"""One shard across processes: torchrun ranks launched through Dagster Pipes (gloo on CPU)
write the same store as one process; a rank that dies fails the step and leaves no store."""

import os
import signal
import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.planning import Stage
from attribution_assets.defs.profiles import DeploymentProfile
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.gradients.distributed import merge_parts, rank_documents
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.paths import PipelinePaths
from tests.helpers import user_pipeline_spec

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)

MARKER = "ATTRIBUTION_TEST_MARKER"


def _profile(root, ranks):
    return DeploymentProfile("t", None, StorageResource(root=str(root)),
                             ComputeResource(threads=1, processes_per_shard=ranks))


def test_rank_documents_are_whole_batches_that_cover_the_shard_once():
    from attribution_assets.engine.gradients.batching import pack_batches

    lengths = [5, 17, 3, 9, 9, 12, 1, 30, 4]
    for world in (1, 2, 3):
        mine = [rank_documents(lengths, 40, r, world) for r in range(world)]
        assert sorted(i for m in mine for i in m) == list(range(len(lengths)))
        for m in mine:  # packing a rank's documents again gives the shard's own batches
            again = [[m[i] for i in b] for b in pack_batches([lengths[i] for i in m], 40)]
            assert all(b in pack_batches(lengths, 40) for b in again)
    assert rank_documents([], 40, 0, 2) == []


def test_merged_parts_are_in_document_order_with_token_offsets():
    a = ([2, 0], np.array([[2.0], [2.1], [0.0]], np.float32),
         {"rows": 3, "token_offsets": [0, 2, 3], "token_positions": [7, 8, 4]})
    b = ([1], np.array([[1.0]], np.float32), {"rows": 1, "token_offsets": [0, 1], "token_positions": [5]})
    array, info = merge_parts([a, b], 3)
    assert array[:, 0].tolist() == [0.0, 1.0, 2.0, np.float32(2.1)] and info["rows"] == 4
    assert info["token_offsets"] == [0, 1, 2, 4] and info["token_positions"] == [4, 5, 7, 8]
    with pytest.raises(ValueError, match="exactly once"):
        merge_parts([b], 3)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory, tiny_model_dir):
    base = tmp_path_factory.mktemp("torchrun")
    spec = user_pipeline_spec(base, tiny_model_dir)
    one = build_definitions([spec], _profile(base / "one", 1))
    materialize_pipeline(one, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None, log_level="WARNING")
    two = build_definitions([spec], _profile(base / "two", 2))
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(two, spec, instance, log=lambda _: None, log_level="WARNING")
    return spec, PipelinePaths.under(base / "one", spec.name), PipelinePaths.under(base / "two", spec.name), \
        two, instance


def test_two_gloo_ranks_write_the_single_process_store(pipelines):
    _, one, two, _, instance = pipelines
    assert one.gradient_shards() == two.gradient_shards() and len(two.gradient_shards()) == 2
    for shard in two.gradient_shards():
        a, b = GradientStore(one.train_gradients(shard)), GradientStore(two.train_gradients(shard))
        assert a.doc_ids == b.doc_ids and a.info["modules"] == b.info["modules"]
        np.testing.assert_array_equal(np.asarray(b.array), np.asarray(a.array))  # same batches: same rows
    (record,) = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(["ops", "train_gradients"]),
                              asset_partitions=["shard-00000"]), limit=1).records
    metadata = record.asset_materialization.metadata
    assert metadata["ranks"].value == 2 and metadata["backend"].value == "gloo"


def _kill_rank_one(marker: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL the first process with LOCAL_RANK=1 and ``marker`` in its environment."""
    while not stop.is_set() and not killed:
        for pid in (p for p in os.listdir("/proc") if p.isdigit()):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"{MARKER}={marker}".encode() in environ and b"LOCAL_RANK=1" in environ:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
                return
        time.sleep(0.05)


def test_a_killed_rank_fails_the_step_leaves_no_store_and_a_rerun_completes(pipelines, monkeypatch):
    spec, one, two, defs, instance = pipelines
    shard = "shard-00001"
    store = two.train_gradients(shard)
    for f in store.iterdir():
        f.unlink()
    store.rmdir()
    marker = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, marker)
    stop, killed = threading.Event(), []
    watcher = threading.Thread(target=_kill_rank_one, args=(marker, stop, killed), daemon=True)
    watcher.start()
    grads = [Stage("shards", ("train_gradients",), True)]
    try:
        with pytest.raises(Exception) as failure:
            materialize_pipeline(defs, spec, instance, stages=grads, log=lambda _: None, log_level="CRITICAL",
                                 force=True)
    finally:
        stop.set()
        watcher.join()
    assert killed, "the watcher found no rank 1 to kill"
    assert "train_gradients" in failure.value.failed_in and shard in failure.value.failed_in
    assert not store.exists()
    assert not [p for p in store.parent.iterdir() if p.name.startswith(f".{shard}")], "temporary left behind"
    materialize_pipeline(defs, spec, instance, stages=grads, log=lambda _: None, log_level="CRITICAL", force=True)
    np.testing.assert_allclose(np.asarray(GradientStore(store).array),
                               np.asarray(GradientStore(one.train_gradients(shard)).array), rtol=0, atol=1e-6)


def test_fsdp2_ranks_give_the_single_process_rows(pipelines, tmp_path):
    """FSDP2 (``fully_shard``) on CPU with gloo: parameters sharded over 2 ranks, the same rows."""
    import json
    import subprocess
    import sys

    from attribution_assets.spec import spec_to_json

    spec, one, two, _, _ = pipelines
    shard = "shard-00000"
    reference = GradientStore(one.train_gradients(shard))
    job = {"spec": spec_to_json(spec), "storage_root": str(two.root.parent), "shard": shard,
           "fingerprint": reference.info["model_fingerprint"], "producer": "fsdp-test", "device": "cpu",
           "threads": 1, "fsdp": True, "out": str(tmp_path / "fsdp_store")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "attribution_assets.defs.torchrun_ranks", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert (report["ranks"], report["fsdp"], report["backend"]) == (2, True, "gloo")
    assert all(local < report["parameters"] for local in report["rank_parameters"])  # each rank holds a shard
    store = GradientStore(tmp_path / "fsdp_store")
    assert store.doc_ids == reference.doc_ids and np.abs(np.asarray(reference.array)).max() > 0
    np.testing.assert_allclose(np.asarray(store.array), np.asarray(reference.array), rtol=0, atol=1e-6)
