"""SIGTERM and Ctrl-C (SIGINT) stop `attribution materialize` within seconds on the full-gradient
path (`projection_dim: 0`, the slowest and largest), leaving no partial store: every gradient
shard on disk opens complete and no temporary is left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.corpus import shard_sizes
from attribution_assets.engine.io.paths import PipelinePaths
from tests.helpers import SENTENCES


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_mid_collection_stops_within_seconds_and_leaves_no_partial_store(tmp_path, tiny_model_dir, signum):
    documents = [f"{s} Note {i}." for i in range(40) for s in SENTENCES]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    (tmp_path / "queries.jsonl").write_text(json.dumps({"text": "Mara Quill was born in Lisbon."}) + "\n")
    body = {"pipelines": [{"name": "full", "model": {"name_or_path": str(tiny_model_dir)},
                           "corpus": {"path": "corpus.jsonl", "max_length": 64},
                           "queries": {"path": "queries.jsonl", "max_length": 64},
                           "shard_size": 30, "gradients": {"projection_dim": 0}}]}
    (tmp_path / "pipelines.yaml").write_text(yaml.safe_dump(body))
    storage = tmp_path / "storage"
    env = {**os.environ, "ATTRIBUTION_PIPELINES": str(tmp_path / "pipelines.yaml"), "CI": "",
           "DAGSTER_HOME": str(tmp_path / "home"), "ATTRIBUTION_STORAGE": str(storage)}
    process = subprocess.Popen([sys.executable, "-m", "attribution_assets.cli", "materialize", "--pipeline", "full"],
                               env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in process.stdout:  # until the shard stage is collecting its first shard
            output.append(line)
            if line.startswith("gradients: ") and any(seen.startswith("full shards: ") for seen in output):
                break
        assert output and output[-1].startswith("gradients: "), "".join(output)
        sent = time.monotonic()
        process.send_signal(signum)
        try:
            rest, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # show what the command did instead of stopping
            process.kill()
            pytest.fail("still running 60 s after the signal:\n" + "".join(output) + process.communicate()[0])
        stopped = time.monotonic() - sent
    finally:
        process.kill()
    output.append(rest)
    # stopping mid-stage is proved by the shards left unwritten below; the bound on seconds is loose
    # (2.8 s measured idle, 5.6 s once with the machine's 2 cores shared by other test processes)
    assert process.returncode == 130 and stopped < 15.0, (stopped, "".join(output))
    assert "Interrupted. Finished shards are kept" in rest
    paths = PipelinePaths.under(storage, "full")
    shards = sorted(shard_sizes(paths.documents))
    assert len(shards) == 8
    kept = [s for s in shards if paths.train_gradients(s).exists()]
    assert len(kept) < len(shards)  # stopped mid-stage
    for shard in kept:  # complete: opens, and holds the shard's rows
        assert GradientStore(paths.train_gradients(shard)).rows == 30
    assert [p for p in storage.rglob("*") if ".tmp-" in p.name] == []


def test_a_signal_dagster_records_but_never_raises_still_stops_the_command():
    """A SIGINT that lands while an in-process run is not inside a step's compute (events being
    written, the run ending) is only recorded by Dagster, then forgotten when the run ends: the
    runner raises it after the run (real signals, Dagster's own capture as execute_run uses it)."""
    from dagster._utils.interrupts import capture_interrupts

    from attribution_assets.defs.runner import interrupts_kept

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt), interrupts_kept(), capture_interrupts():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs here: recorded, not raised
    with interrupts_kept(), capture_interrupts():  # no signal: nothing raised
        time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) is before
