"""Optimizer moments from distributed checkpoints: an FSDP2 run on 2 gloo ranks saves its AdamW
state as a full state dict (``optimizer.bin``) and as a sharded ``torch.distributed.checkpoint``
(``optimizer_0/``); both load to the moments of the same training in one process."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import (
    _MetadataUnpickler,
    load_optimizer_state,
    make_normalizer,
)
from attribution_assets.spec import GradientSpec

from . import fsdp_optimizer
from .test_collector import doc_loss, make_docs, tiny_neox

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The FSDP run's checkpoints (two fresh interpreters under torchrun: ~30 s at load 4)."""
    out = tmp_path_factory.mktemp("fsdp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          fsdp_optimizer.__file__, str(out)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    return out


def one_process_adamw():
    """The same training in one process: the loss is the mean over all documents per step."""
    model = tiny_neox()
    optimizer = torch.optim.AdamW(model.parameters(), lr=fsdp_optimizer.LR)
    docs = make_docs(fsdp_optimizer.LENGTHS)
    for _ in range(fsdp_optimizer.STEPS):
        optimizer.zero_grad()
        (sum(doc_loss(model, ids, mask) for ids, mask in docs) / len(docs)).backward()
        optimizer.step()
    return model, optimizer


@pytest.mark.slow  # the torchrun fixture
@pytest.mark.parametrize("layout", ["full", "sharded"])
def test_fsdp_optimizer_states_load_as_the_one_process_moments(one_thread, checkpoints, layout):
    model, optimizer = one_process_adamw()
    want = load_optimizer_state(optimizer, model)
    got = load_optimizer_state(checkpoints / layout, model)  # a Trainer-style checkpoint directory
    assert sorted(got.states) == sorted(want.states) == sorted(n for n, _ in model.named_parameters())
    for name, st in want.states.items():
        assert float(got.states[name]["step"]) == fsdp_optimizer.STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            scale = float(st[key].abs().max())  # reduction order: float noise near zero entries
            torch.testing.assert_close(got.states[name][key], st[key], rtol=1e-4, atol=1e-5 * scale)
        assert tuple(got.hyper[name]["betas"]) == tuple(want.hyper[name]["betas"])
    spec = GradientSpec(projection_dim=4, normalizer="adam")
    docs = make_docs((6, 9))
    rows, _ = GradientCollector(model, spec, make_normalizer("adam", checkpoints / layout, model)).collect(docs)
    ref, _ = GradientCollector(model, spec, make_normalizer("adam", optimizer, model)).collect(docs)
    # 1 / sqrt(v + eps) amplifies the moments' float noise where v is near 0: 1e-3 of the largest entry
    assert abs(rows - ref).max() <= 1e-3 * abs(ref).max(), abs(rows - ref).max() / abs(ref).max()


def test_dcp_metadata_refuses_foreign_classes(tmp_path):
    payload = pickle.dumps(os.system)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        _MetadataUnpickler(__import__("io").BytesIO(payload)).load()
