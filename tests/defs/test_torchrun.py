"""A stage across processes: ONE torchrun group launched through Dagster Pipes (gloo on CPU)
serves every shard of the step and writes the same stores as one process; a rank that dies fails
the step and leaves no store; FSDP2 ranks collect their own documents with sharded parameters."""

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
from attribution_assets.engine.gradients.distributed import (
    merge_parts,
    rank_batches,
    rank_documents,
)
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
    plan = rank_batches(lengths, 20, 2)  # what fsdp pads: ranks' batch counts differ
    assert [[i for b in p for i in b] for p in plan] == [rank_documents(lengths, 20, r, 2) for r in range(2)]
    assert sorted(i for p in plan for b in p for i in b) == list(range(len(lengths)))


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
    launches = set()
    for shard in two.gradient_shards():  # one torchrun group served both shards of the step
        (record,) = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey(["ops", "train_gradients"]),
                                  asset_partitions=[shard]), limit=1).records
        launches.add(record.asset_materialization.metadata["launch"].value)
    assert len(launches) == 1 and "" not in launches


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


def test_fsdp2_ranks_collect_their_own_documents_and_give_the_single_process_rows(pipelines, tmp_path):
    """FSDP2 on CPU with gloo, ONE launch for both shards through a real c10d rendezvous on
    localhost: parameters sharded over 2 ranks and loaded shard by shard, each rank collecting
    its own batches (the one with fewer padded to equal passes), every row equal to one process."""
    import json
    import socket
    import subprocess
    import sys

    from attribution_assets.engine.io.data import read_tokenized
    from attribution_assets.spec import spec_from_json, spec_to_json

    spec, one, two, _, _ = pipelines
    shards = one.gradient_shards()
    lengths = [[len(d.input_ids) for d in read_tokenized(one.tokens(s))] for s in shards]
    budget = next(m for m in range(8, 200) if any(  # a batch budget where some shard's ranks get unequal batches
        len(p[0]) != len(p[1]) and all(p) for p in (rank_batches(lens, m, 2) for lens in lengths)))
    raw = json.loads(json.dumps(spec_to_json(spec)))
    raw["gradients"]["max_tokens_per_batch"] = budget
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    compute = ComputeResource(processes_per_shard=2, fsdp=True, rdzv_endpoint=f"localhost:{port}")
    job = {"spec": spec_to_json(spec_from_json(raw)), "storage_root": str(one.root.parent),
           "shards": shards, "fingerprint": GradientStore(one.train_gradients(shards[0])).info["model_fingerprint"],
           "producer": "fsdp-test", "device": "cpu", "threads": 1, "fsdp": True, "out": str(tmp_path / "fsdp")}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", *compute.torchrun_args("fsdp-test"),
                           "-m", "attribution_assets.defs.torchrun_ranks", str(tmp_path / "job.json")],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["shard"] for r in reports] == shards and len({r["launch"] for r in reports}) == 1
    for report in reports:
        assert (report["ranks"], report["fsdp"], report["backend"]) == (2, True, "gloo")
        assert all(local < report["parameters"] for local in report["rank_parameters"])  # each rank a shard
        assert sum(report["rank_parameters"]) == report["parameters"]  # and together all of it, once
        passes = [len(p) for p in rank_batches([len(d.input_ids) for d in read_tokenized(one.tokens(
            report["shard"]))], budget, 2)]
        assert report["rank_padding_passes"] == [max(passes) - n for n in passes]
        assert report["rank_documents"] == [sum(len(b) for b in p) for p in rank_batches(
            [len(d.input_ids) for d in read_tokenized(one.tokens(report["shard"]))], budget, 2)]
    assert any(sum(r["rank_padding_passes"]) and min(r["rank_documents"]) for r in reports)
    from attribution_assets.engine.gradients.collect import collect, make_collector
    from attribution_assets.engine.io.models import load_pipeline_model

    budget_spec = spec_from_json(raw)  # the one-process collector with the same batches
    collector = make_collector(load_pipeline_model(budget_spec, one, "cpu")[0], budget_spec, one)
    for shard in shards:
        reference, store = GradientStore(one.train_gradients(shard)), GradientStore(tmp_path / "fsdp" / shard)
        assert store.doc_ids == reference.doc_ids and np.abs(np.asarray(reference.array)).max() > 0
        rows = collect(collector, read_tokenized(one.tokens(shard)))[0]
        np.testing.assert_allclose(np.asarray(store.array), rows, rtol=0, atol=1e-6)
        np.testing.assert_allclose(np.asarray(store.array), np.asarray(reference.array), rtol=1e-6, atol=1e-6)
