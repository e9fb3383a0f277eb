"""Writes an FSDP2 run's AdamW state as a full state dict and as a sharded
``torch.distributed.checkpoint``, for ``test_distributed_optimizer.py``. Under ``torchrun`` (gloo on
CPU): the tiny GPT-NeoX of ``test_collector`` sharded over the ranks, ``STEPS`` AdamW steps, rank
``r`` taking documents ``r, r + n, ...`` of ``make_docs(LENGTHS)`` with the loss summed over its
documents and divided by their count (FSDP averages over ranks: the mean over all documents).

    torchrun --standalone --nproc-per-node 2 tests/engine/gradients/fsdp_optimizer.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

LENGTHS, STEPS, LR = (5, 11, 8, 3, 14, 7), 2, 1e-2


def main(out: Path) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from tests.engine.gradients.test_collector import doc_loss, make_docs, tiny_neox

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_neox()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    docs = make_docs(LENGTHS)[rank::world]
    for _ in range(STEPS):
        optimizer.zero_grad()
        (sum(doc_loss(model, ids, mask) for ids, mask in docs) / len(docs)).backward()
        optimizer.step()
    full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
    if rank == 0:
        (out / "full").mkdir(parents=True)
        torch.save(full, out / "full" / "optimizer.bin")
    dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=out / "sharded" / "optimizer_0")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
