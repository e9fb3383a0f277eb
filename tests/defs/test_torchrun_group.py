"""The torchrun group's launch line (standalone, c10d on one node, several nodes) and its
validation, and the pieces of FSDP's sharded loading that need no process group: parameters
built on the meta device with real buffers, a rank's rows read from a safetensors file."""

import math

import pytest
import torch
from safetensors.torch import save_file

from attribution_assets.defs.profiles import ProfileError, profile_from_mapping
from attribution_assets.defs.resources import ComputeResource
from attribution_assets.engine.gradients.distributed import RankWorker
from attribution_assets.engine.gradients.fsdp import (
    checkpoint_tensors,
    parameters_on_meta,
    read_rows,
)


def test_standalone_launch_line():
    compute = ComputeResource(processes_per_shard=3)
    assert compute.ranks == 3
    assert compute.torchrun_args("run-1") == ["--standalone", "--nproc-per-node=3", "--max-restarts=0"]


def test_one_node_c10d_rendezvous_takes_the_run_id():
    compute = ComputeResource(processes_per_shard=2, rdzv_endpoint="localhost:29511")
    assert compute.torchrun_args("run-1") == [
        "--nnodes=1", "--rdzv-backend=c10d", "--rdzv-endpoint=localhost:29511", "--rdzv-id=run-1",
        "--nproc-per-node=2", "--max-restarts=0"]


def test_several_nodes_share_the_profiles_rendezvous():
    compute = ComputeResource(processes_per_shard=4, nnodes=2, rdzv_endpoint="node0.cluster:29400",
                              rdzv_id="attribution-grads", fsdp=True)
    assert compute.ranks == 8
    assert compute.torchrun_args("run-1") == [
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0.cluster:29400",
        "--rdzv-id=attribution-grads", "--nproc-per-node=4", "--max-restarts=0"]
    assert ComputeResource(nnodes=2, processes_per_shard=1, rdzv_endpoint="h:1", rdzv_id="x", fsdp=True).ranks == 2


@pytest.mark.parametrize("compute, message", [
    ({"nnodes": 2}, "nnodes: 2 needs `rdzv_endpoint`"),
    ({"nnodes": 2, "rdzv_endpoint": "node0:29400"}, "and `rdzv_id`"),
    ({"rdzv_endpoint": "node0"}, "must be `host:port`"),
    ({"rdzv_endpoint": "node0:http"}, "must be `host:port`"),
    ({"rdzv_endpoint": "node0:70000"}, "must be `host:port`"),
    ({"rdzv_endpoint": "node0:29400", "rdzv_id": "a b"}, "rdzv_id may hold"),
    ({"rdzv_id": "grads"}, "set rdzv_endpoint too"),
    ({"fsdp": True}, "processes_per_shard >= 2"),
    ({"nnodes": 0}, "nnodes"),
])
def test_rendezvous_settings_are_validated_with_the_fix(compute, message):
    with pytest.raises(ProfileError, match=message) as error:
        profile_from_mapping({"compute": compute}, "p.yaml", "p")
    assert "p.yaml" in str(error.value)


def test_fsdp_refuses_a_backward_pass_per_target_token():
    from attribution_assets.spec import GradientSpec, spec_to_json
    from tests.helpers import tiny_demo_spec

    spec = tiny_demo_spec(gradients=GradientSpec(per_token="loss", projection_dim=4))
    with pytest.raises(ValueError, match="per_token `loss`"):
        RankWorker({"spec": spec_to_json(spec), "storage_root": "/nonexistent", "fsdp": True}, 0, 2)


def test_parameters_on_meta_keep_real_buffers():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 3)
            self.register_buffer("freq", torch.arange(3.0), persistent=False)

    with parameters_on_meta():
        block = Block()
    assert block.linear.weight.is_meta and block.linear.bias.is_meta and block.linear.weight.requires_grad
    assert torch.equal(block.freq, torch.arange(3.0))
    assert not Block().linear.weight.is_meta  # restored on exit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rank_reads_exactly_its_rows(tmp_path, dtype):
    """Rank r of W holds rows [r c, (r + 1) c) of dim 0 (c = ceil(n / W), FSDP2's torch.chunk rule)."""
    full = {"a.weight": torch.randn(7, 5).to(dtype), "b.bias": torch.randn(3).to(dtype),
            "scale": torch.tensor(2.5).to(dtype)}
    save_file(full, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"c.weight": torch.randn(2, 2).to(dtype)}, tmp_path / "model-00002-of-00002.safetensors")
    tensors = checkpoint_tensors(str(tmp_path))
    assert sorted(tensors) == ["a.weight", "b.bias", "c.weight", "scale"]
    for world in (1, 2, 3):
        for rank in range(world):
            for name in ("a.weight", "b.bias"):
                chunks = torch.chunk(full[name], world)
                c = math.ceil(full[name].shape[0] / world)
                expected = chunks[rank] if rank < len(chunks) else full[name][:0]
                out = torch.empty(expected.shape, dtype=torch.float32)
                path, entry, start = tensors[name]
                read_rows(path, entry, rank * c, start, out)
                assert torch.equal(out, expected.float())
    out = torch.empty(())
    read_rows(*tensors["scale"][:2], 0, tensors["scale"][2], out)
    assert out.item() == full["scale"].float().item()
