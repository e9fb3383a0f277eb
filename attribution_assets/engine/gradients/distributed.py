"""One shard's gradient rows from several processes, the body of every torchrun rank
(:func:`run`). The entry point is ``torchrun --nproc-per-node N -m
attribution_assets.defs.torchrun_ranks [JOB.json]``, which reads the job from the file or from
Dagster Pipes (the ``job`` extra) and reports back there; this module knows neither.

Each rank loads the model once and collects a contiguous slice of the shard's batches (the
batches one process would make, split into N runs of about equal padded tokens:
:func:`rank_documents`), so each row is computed exactly as in one process; rank 0 gathers
the slices and writes ONE store atomically (``engine.io.atomic``), rows in document order. If any rank fails, torchrun stops
the others and exits non-zero before rank 0 has written anything: no partial store.
Backend: NCCL when the job's device resolves to CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``),
else gloo (CPU).

FSDP2 (``"fsdp": true``): for models that do not fit one device. Each rank loads the model
on CPU and ``torch.distributed.fsdp.fully_shard`` shards every transformer block (the classes
in the model's ``_no_split_modules``) and the root over the ranks; a block's parameters are
gathered for its forward and backward only. FSDP's collectives need every rank to run the
same passes, so every rank collects the whole shard (per-example rows come from each
module's inputs and output gradients, computed with the gathered weights: the same rows as
one process) and rank 0 writes them. It trades speed for memory: N ranks take as long as
one, each holding 1/N of the parameters (plus one block gathered).

Job (JSON): ``spec`` (``spec.spec_to_json``), ``storage_root``, ``shard``, ``fingerprint``,
``producer``, and optionally ``device``, ``precision``, ``autocast``, ``threads``, ``fsdp``,
``out`` (a store directory other than the shard's own).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attribution_assets.engine.gradients.batching import pack_batches
from attribution_assets.engine.gradients.collect import doc_weights, make_collector, weight_rows
from attribution_assets.engine.gradients.store import write_store
from attribution_assets.engine.io import models
from attribution_assets.engine.io.data import read_tokenized
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.runtime import limit_threads
from attribution_assets.spec import spec_from_json


def rank_documents(lengths: Sequence[int], max_tokens: int, rank: int, world: int) -> list[int]:
    """Indices of the documents rank ``rank`` of ``world`` collects: a contiguous run of the
    shard's batches (``batching.pack_batches``, longest first), runs balanced by padded tokens.
    Packing a rank's documents again gives exactly those batches, so every row is computed in
    the same batch as in one process: the rows are identical, not merely close."""
    batches = pack_batches(lengths, max_tokens)
    costs = np.array([len(b) * lengths[b[0]] for b in batches], dtype=np.float64)  # b[0]: longest
    mids, total = np.cumsum(costs) - costs / 2, costs.sum()  # a batch goes where its middle falls
    mine = [b for b, mid in zip(batches, mids) if rank * total <= mid * world < (rank + 1) * total]
    return [i for b in mine for i in b]


def merge_parts(parts: Sequence[tuple[Sequence[int], np.ndarray, dict]], n_docs: int) -> tuple[np.ndarray, dict]:
    """Rows and info of the whole shard, in document order, from each rank's ``(document
    indices, rows, info)`` (per-token rows: each document's block of rows, offsets and token
    positions rebuilt for the shard)."""
    blocks: dict[int, tuple[np.ndarray, list]] = {}
    for indices, array, info in parts:
        offsets = info.get("token_offsets") or list(range(len(indices) + 1))
        positions = info.get("token_positions")
        for k, doc in enumerate(indices):
            a, b = offsets[k], offsets[k + 1]
            blocks[doc] = (array[a:b], positions[a:b] if positions is not None else [])
    if sorted(blocks) != list(range(n_docs)):
        raise ValueError(f"the ranks' documents do not cover the shard's {n_docs} documents exactly once")
    array = np.concatenate([blocks[d][0] for d in range(n_docs)])
    info = dict(parts[0][2])
    info["rows"] = int(array.shape[0])
    if info.get("token_offsets") is not None:
        info["token_offsets"] = np.concatenate([[0], np.cumsum([len(blocks[d][0]) for d in range(n_docs)])]).tolist()
        info["token_positions"] = [t for d in range(n_docs) for t in blocks[d][1]]
    return array, info


def _device(job: dict) -> torch.device:
    device = models.resolve_device(job.get("device", "auto"))
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """FSDP2: every transformer block (``model._no_split_modules``) and the root sharded over
    all ranks on ``device``'s type (parameters become ``DTensor`` shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer blocks (`_no_split_modules`); "
                         "FSDP needs them to shard the model block by block.")
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def collect_rank(job: dict, rank: int, world: int) -> tuple[list[int], np.ndarray, dict, dict]:
    """This rank's slice of the shard (with ``fsdp``, the whole shard): ``(document indices,
    rows [r, dims] float32, info, stats)``."""
    spec = spec_from_json(job["spec"])
    paths = PipelinePaths.under(job["storage_root"], spec.name)
    docs = read_tokenized(paths.tokens(job["shard"]))
    fsdp = bool(job.get("fsdp"))
    mine = list(range(len(docs))) if fsdp else rank_documents(
        [len(d.input_ids) for d in docs], spec.gradients.max_tokens_per_batch, rank, world)
    device = _device(job)
    model, _ = models.load_pipeline_model(spec, paths, "cpu" if fsdp else device)
    if job.get("precision", "auto") != "auto":
        model = model.to(models.DTYPES[job["precision"]])
    if fsdp:
        model = shard_model(model, device)
    autocast = None if job.get("autocast", "off") == "off" else models.DTYPES[job["autocast"]]
    collector = make_collector(model, spec, paths, device=device, autocast=autocast)
    began = time.perf_counter()
    array, info = collector.collect([(docs[i].input_ids, docs[i].loss_mask) for i in mine])
    stats = {"rank": rank, "documents": len(mine), "rows": int(array.shape[0]),
             "tokens": sum(len(docs[i].input_ids) for i in mine),
             "seconds": round(time.perf_counter() - began, 3),
             "parameters": sum(p.numel() for p in model.parameters()),  # a DTensor's numel is global
             "local_parameters": sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())}
    return mine, array, info, stats


def write_shard(job: dict, parts: Sequence[tuple[Sequence[int], np.ndarray, dict]]) -> Path:
    """Rank 0: the gathered slices as the shard's one store, written atomically; its path."""
    spec = spec_from_json(job["spec"])
    paths = PipelinePaths.under(job["storage_root"], spec.name)
    out = Path(job["out"]) if job.get("out") else paths.train_gradients(job["shard"])
    docs = read_tokenized(paths.tokens(job["shard"]))
    array, info = merge_parts(parts, len(docs))
    weighting = spec.corpus.advantage_weighting
    weights = doc_weights(docs, weighting)  # over the whole shard, as one process weights them
    if weights is not None:
        weight_rows(array, info, weights)
        info["advantage_weighting"], info["sequence_weights"] = weighting, weights.tolist()
    info["producer"] = job.get("producer", "")
    write_store(out, array, info, doc_ids=[d.doc_id for d in docs], model_fingerprint=job["fingerprint"],
                dtype=spec.gradients.dtype)
    return out


def run(read_job: Callable[[], dict], report: Callable[[dict], None]) -> None:
    """Every rank's body (under torchrun: ``RANK``/``WORLD_SIZE`` set). Rank 0 calls
    ``read_job()`` for the job and, after writing the store, ``report(message)`` with its path,
    rows, tokens and per-rank figures; other ranks call neither."""
    backend = "nccl" if models.resolve_device(os.environ.get("ATTRIBUTION_DEVICE", "auto")).type == "cuda" \
        and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    try:
        _run_rank(read_job, report, backend)
    finally:
        dist.destroy_process_group()


def _run_rank(read_job: Callable[[], dict], report: Callable[[dict], None], backend: str) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    box: list[Any] = [None]
    if rank == 0:
        box[0] = read_job()
    dist.broadcast_object_list(box, src=0)
    job = box[0]
    restore = limit_threads(int(job.get("threads", 0)))
    try:
        mine, array, info, stats = collect_rank(job, rank, world)
    finally:
        restore()
    part = (mine, array, info, stats) if rank == 0 or not job.get("fsdp") else (None, None, None, stats)
    gathered: list[Any] = [None] * world if rank == 0 else None
    dist.gather_object(part, gathered, dst=0)
    if rank == 0:
        out = write_shard(job, [(m, a, i) for m, a, i, _ in gathered if a is not None])
        all_stats = [s for *_, s in gathered]
        fsdp = bool(job.get("fsdp"))
        message = {"path": str(out), "ranks": world, "backend": backend, "fsdp": fsdp,
                   "rows": all_stats[0]["rows"] if fsdp else sum(s["rows"] for s in all_stats),
                   "tokens": all_stats[0]["tokens"] if fsdp else sum(s["tokens"] for s in all_stats),
                   "rank_seconds": [s["seconds"] for s in all_stats],
                   "rank_parameters": [s["local_parameters"] for s in all_stats],
                   "parameters": all_stats[0]["parameters"]}
        report(message)
    dist.barrier()
