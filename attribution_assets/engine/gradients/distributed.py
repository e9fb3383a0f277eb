"""A stage's gradient rows from one long-lived group of processes, the body of every torchrun
rank (:func:`run`). The entry point is ``torchrun --nproc-per-node N -m
attribution_assets.defs.torchrun_ranks [JOB.json]``, which reads the job from the file or from
Dagster Pipes (the ``job`` extra) and reports back there; this module knows neither.

One launch serves every shard of the job: each rank loads the model once, then for each shard
collects its own documents, a contiguous run of the shard's batches (the batches one process
would make, split into N runs of about equal padded tokens: :func:`rank_documents`), so each row
is computed exactly as in one process; rank 0 gathers the slices and writes the shard's ONE store
atomically (``engine.io.atomic``), rows in document order, and reports it (one message per
shard) before the next shard begins. If any rank fails, torchrun stops the others and exits
non-zero; the shards reported before stay written (complete stores), no shard is half written.
Backend: NCCL when the job's device resolves to CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), else
gloo (CPU).

FSDP2 (``"fsdp": true``) as data parallelism, for models that do not fit one device: the model
is built on the meta device and sharded with ``fully_shard`` (``engine.gradients.fsdp``), each
rank reading only its rows of the checkpoint (no rank ever holds all parameters; a block's are
gathered for its forward and backward only). Each rank still collects only its own documents;
FSDP's collectives need every rank in every forward and backward pass, so a rank with fewer
batches than another runs dummy batches (one short document, rows discarded) until the counts
are equal. Per-example rows come from each module's inputs and output gradients, computed with
the gathered weights: the same rows as one process. ``gradients.per_token: loss`` (one backward
pass per target position, so pass counts differ within a batch) is refused with fsdp.

Job (JSON): ``spec`` (``spec.spec_to_json``), ``storage_root``, ``shards`` (a list), ``fingerprint``,
``producer``, and optionally ``device``, ``precision``, ``autocast``, ``threads``, ``fsdp``,
``out`` (a folder whose ``<shard>`` subfolders get the stores instead of the shards' own paths).
Each shard's report: ``shard``, ``path``, ``launch`` (torchrun's run id), ``rows``, ``tokens``, ``seconds`` and per rank
``rank_documents``, ``rank_seconds``, ``rank_padding_passes``, ``rank_parameters`` (local),
``rank_load_seconds``, ``rank_peak_rss_mb`` (``ru_maxrss`` so far).
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from attribution_assets.engine.gradients.batching import pack_batches
from attribution_assets.engine.gradients.collect import doc_weights, make_collector, weight_rows
from attribution_assets.engine.gradients.fsdp import load_sharded
from attribution_assets.engine.gradients.store import write_store
from attribution_assets.engine.io import models
from attribution_assets.engine.io.data import read_tokenized
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.runtime import limit_threads
from attribution_assets.spec import spec_from_json


def rank_batches(lengths: Sequence[int], max_tokens: int, world: int) -> list[list[list[int]]]:
    """Each rank's batches: the shard's batches (``batching.pack_batches``, longest first) cut into
    ``world`` contiguous runs balanced by padded tokens (a batch goes where its middle falls)."""
    batches = pack_batches(lengths, max_tokens)
    costs = np.array([len(b) * lengths[b[0]] for b in batches], dtype=np.float64)  # b[0]: longest
    mids, total = np.cumsum(costs) - costs / 2, costs.sum()
    return [[b for b, mid in zip(batches, mids) if r * total <= mid * world < (r + 1) * total]
            for r in range(world)]


def rank_documents(lengths: Sequence[int], max_tokens: int, rank: int, world: int) -> list[int]:
    """Indices of the documents rank ``rank`` of ``world`` collects (:func:`rank_batches`).
    Packing a rank's documents again gives exactly its batches, so every row is computed in
    the same batch as in one process: the rows are identical, not merely close."""
    return [i for b in rank_batches(lengths, max_tokens, world)[rank] for i in b]


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


def _peak_rss_mb() -> float:
    """This process's peak resident set size so far, MiB (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


#: A padding pass's document: two tokens, the second in the loss (every pass must reach the backward).
DUMMY_DOCUMENT = ([0, 0], [0, 1])


class RankWorker:
    """One rank's model and collector, loaded once for every shard of the job; with ``fsdp`` the
    model is sharded over the group (``engine.gradients.fsdp.load_sharded``)."""

    def __init__(self, job: dict, rank: int, world: int):
        self.job, self.rank, self.world = job, rank, world
        self.spec = spec_from_json(job["spec"])
        self.paths = PipelinePaths.under(job["storage_root"], self.spec.name)
        self.fsdp = bool(job.get("fsdp"))
        if self.fsdp and self.spec.gradients.per_token == "loss":
            raise ValueError("fsdp needs the same forward and backward passes on every rank, and "
                             "gradients.per_token `loss` runs one backward pass per target token of each batch; "
                             "use per_token `positional` (or `none`), or set fsdp: false.")
        began, device, precision = time.perf_counter(), _device(job), job.get("precision", "auto")
        if self.fsdp:
            model = load_sharded(self.spec, self.paths, device, precision)
        else:
            model, _ = models.load_pipeline_model(self.spec, self.paths, device)
            if precision != "auto":
                model = model.to(models.DTYPES[precision])
        autocast = None if job.get("autocast", "off") == "off" else models.DTYPES[job["autocast"]]
        self.collector = make_collector(model, self.spec, self.paths, device=device, autocast=autocast)
        self.load_seconds = round(time.perf_counter() - began, 3)
        self.parameters = sum(p.numel() for p in model.parameters())  # a DTensor's numel is global
        self.local_parameters = sum(getattr(p, "to_local", lambda p=p: p)().numel() for p in model.parameters())

    def _empty(self) -> tuple[np.ndarray, dict]:
        info = self.collector.layout_info()
        token_rows = self.spec.gradients.token_rows
        info.update(rows=0, token_offsets=[0] if token_rows else None, token_positions=[] if token_rows else None)
        return np.zeros((0, self.collector.dims), dtype=np.float32), info

    def collect(self, shard: str) -> tuple[list[int], np.ndarray, dict, dict]:
        """This rank's documents of ``shard``: ``(document indices, rows [r, dims] float32, info,
        stats)``; with ``fsdp``, then the padding passes that bring its batch count to the most
        any rank has."""
        docs = read_tokenized(self.paths.tokens(shard))
        plan = rank_batches([len(d.input_ids) for d in docs], self.spec.gradients.max_tokens_per_batch, self.world)
        mine = [i for b in plan[self.rank] for i in b]
        began = time.perf_counter()
        array, info = self.collector.collect([(docs[i].input_ids, docs[i].loss_mask) for i in mine]) if mine \
            else self._empty()
        padding = max(len(p) for p in plan) - len(plan[self.rank]) if self.fsdp else 0
        for _ in range(padding):
            self.collector.collect([DUMMY_DOCUMENT])
        stats = {"documents": len(mine), "rows": int(array.shape[0]), "padding_passes": padding,
                 "tokens": sum(len(docs[i].input_ids) for i in mine),
                 "seconds": round(time.perf_counter() - began, 3), "parameters": self.local_parameters,
                 "load_seconds": self.load_seconds, "peak_rss_mb": round(_peak_rss_mb(), 1)}
        return mine, array, info, stats


def write_shard(job: dict, shard: str, parts: Sequence[tuple[Sequence[int], np.ndarray, dict]]) -> Path:
    """Rank 0: the gathered slices as the shard's one store, written atomically; its path."""
    spec = spec_from_json(job["spec"])
    paths = PipelinePaths.under(job["storage_root"], spec.name)
    out = Path(job["out"]) / shard if job.get("out") else paths.train_gradients(shard)
    docs = read_tokenized(paths.tokens(shard))
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
    ``read_job()`` for the job and, after writing each shard's store, ``report(message)`` (see the
    module docstring); other ranks call neither."""
    backend = "nccl" if models.resolve_device(os.environ.get("ATTRIBUTION_DEVICE", "auto")).type == "cuda" \
        and torch.cuda.is_available() else "gloo"
    if backend == "nccl":  # NCCL's object collectives use the current device: this rank's GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
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
        worker = RankWorker(job, rank, world)
        for shard in job["shards"]:
            began = time.perf_counter()
            part = worker.collect(shard)
            gathered: list[Any] = [None] * world if rank == 0 else None
            dist.gather_object(part, gathered, dst=0)
            if rank == 0:
                out = write_shard(job, shard, [(m, a, i) for m, a, i, _ in gathered])
                stats = [s for *_, s in gathered]
                report({"shard": shard, "path": str(out), "launch": os.environ.get("TORCHELASTIC_RUN_ID", ""), "ranks": world, "backend": backend, "fsdp": worker.fsdp,
                        "rows": sum(s["rows"] for s in stats), "tokens": sum(s["tokens"] for s in stats),
                        "seconds": round(time.perf_counter() - began, 3), "parameters": worker.parameters,
                        **{f"rank_{k}": [s[k] for s in stats] for k in stats[0]}})
    finally:
        restore()
    dist.barrier()
