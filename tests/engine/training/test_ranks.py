"""Train-time rows under DDP: 2 gloo ranks under ``torchrun`` keep every trained document once,
in the order (and with the rows) of one process with twice the gradient accumulation."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.training.stored_rows import training_tags
from tests.engine.training import ddp_trainer

ROOT = Path(__file__).resolve().parents[3]


def shard_rows(root: Path):
    """``(shard names, doc_ids, steps, rows)`` of every shard under ``root`` in step order."""
    names = sorted(p.name for p in root.iterdir())
    stores = [GradientStore(root / n) for n in names]
    return (names, [d for s in stores for d in s.doc_ids], [t for s in stores for t in training_tags(s)[0]],
            np.concatenate([np.asarray(s.array) for s in stores]))


@pytest.mark.slow  # two fresh interpreters import torch and the Trainer (~15 s CPU each): 62 s at load 5
def test_two_ranks_keep_every_document_once_as_one_process_does(one_thread, tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(Path(ddp_trainer.__file__)), str(tiny_model_dir), str(tmp_path / "ddp"), "2"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    names, ids, steps, rows = shard_rows(tmp_path / "ddp" / "rows")
    assert names == ["steps_000001-000005", "steps_000006-000010", "steps_000011-000012"]  # no parts left
    assert len(ids) == ddp_trainer.DOCUMENTS and sorted(ids) == sorted(f"d{k}" for k in range(48))
    assert GradientStore(tmp_path / "ddp" / "rows" / names[0]).info["training"]["ranks"] == 2

    callback = ddp_trainer.train(tiny_model_dir, tmp_path / "one", ranks=2)
    one_names, one_ids, one_steps, one_rows = shard_rows(tmp_path / "one" / "rows")
    assert [p.name for p in callback.shards] == one_names == names
    assert ids == one_ids and steps == one_steps == [s for s in range(1, 13) for _ in range(4)]
    scale = np.abs(one_rows).max()
    assert np.abs(rows - one_rows).max() <= 1e-6 * scale, np.abs(rows - one_rows).max() / scale
