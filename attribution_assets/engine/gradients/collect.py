"""Collecting a pipeline's gradient rows: the collector a pipeline asks for, timed runs over
tokenized documents, and the training rows of shards whether stored or streamed.

Stored mode reads each shard's gradient store; streaming mode (``scoring.mode: streaming``)
recomputes the rows from the tokenized shard and never writes them. Consumers (the
autocorrelation, the scorer) take :func:`training_rows` and never branch on the mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attribution_assets.engine.gradients.batching import Document
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.gradients.normalizers import make_normalizer
from attribution_assets.engine.gradients.store import (
    GradientStore,
    check_compatible,
    document_rows,
    rows_hash,
    write_store,
)
from attribution_assets.engine.io.advantages import sequence_weights
from attribution_assets.engine.io.data import TokenizedDoc, read_tokenized
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.runtime import peak_rss_mb
from attribution_assets.spec import GradientSpec, PipelineSpec


def optimizer_state_source(spec: PipelineSpec, paths: PipelinePaths | None) -> str | None:
    """Where the normalizer's optimizer state lives: the spec's path, else the demo model's."""
    if spec.gradients.normalizer == "none":
        return None
    if spec.gradients.optimizer_state:
        return spec.gradients.optimizer_state
    if spec.finetune is not None and paths is not None:  # the fine-tuning run's final state
        return str(paths.finetuned_optimizer)
    if spec.is_demo and paths is not None and (paths.model / "optimizer.pt").exists():
        return str(paths.model / "optimizer.pt")
    raise ValueError(f"Pipeline {spec.name!r} uses the {spec.gradients.normalizer!r} normalizer but has no "
                     "optimizer state: set `gradients.optimizer_state` to an optimizer.pt or a Trainer "
                     "checkpoint directory, or set `gradients.normalizer: none`.")


def make_collector(model, spec: PipelineSpec, paths: PipelinePaths | None = None,
                   device: Any = None, autocast: torch.dtype | None = None,
                   gradients: GradientSpec | None = None) -> GradientCollector:
    """A collector with the pipeline's projection and normalizer (same on query and train side);
    ``gradients`` replaces ``spec.gradients`` (e.g. another ``per_token`` mode) where given."""
    gradients = gradients or spec.gradients
    source = optimizer_state_source(spec, paths)
    normalizer = make_normalizer(gradients.normalizer, source, model) if source else None
    return GradientCollector(model, gradients, normalizer, device, autocast)


@dataclass
class CollectStats:
    """What one collection run cost: rows, tokens, seconds, peak process RSS (since the current
    peak window began: ``engine.runtime.reset_peak_rss``) and peak device memory."""

    rows: int
    dims: int
    tokens: int
    seconds: float
    peak_rss_mb: float
    peak_device_mb: float | None

    def as_metadata(self) -> dict[str, Any]:
        meta = {"rows": self.rows, "dims": self.dims, "tokens": self.tokens, "seconds": round(self.seconds, 3),
                "tokens_per_second": round(self.tokens / max(self.seconds, 1e-9), 1),
                "peak_rss_mb": round(self.peak_rss_mb, 1)}
        if self.peak_device_mb is not None:
            meta["peak_device_mb"] = round(self.peak_device_mb, 1)
        return meta


def doc_weights(docs: Sequence[TokenizedDoc], weighting: str) -> np.ndarray | None:
    """Each document's sequence weight ``w_b`` under ``corpus.advantage_weighting``
    (``engine.io.advantages``); None for ``none``."""
    if weighting == "none":
        return None
    missing = [d.doc_id for d in docs if d.advantage is None]
    if missing:
        raise ValueError(f"advantage_weighting is {weighting!r} but {len(missing)} tokenized documents "
                         f"carry no advantage (e.g. {missing[:3]}); rematerialize `corpus` and "
                         "`tokenized_shards`.")
    return sequence_weights([d.advantage for d in docs], [d.targets for d in docs], weighting)


def weight_rows(array: np.ndarray, info: dict, weights: np.ndarray) -> None:
    """Scale each document's rows (its one row, or its per-token rows) by ``weights`` in place."""
    if info.get("per_token"):
        counts = np.diff(np.asarray(info["token_offsets"], dtype=np.int64))
        array *= np.repeat(weights, counts).astype(np.float32)[:, None]
    else:
        array *= weights.astype(np.float32)[:, None]


def collect(collector: GradientCollector, docs: Sequence[TokenizedDoc],
            weighting: str = "none") -> tuple[np.ndarray, dict, CollectStats]:
    """Gradient rows of ``docs``: ``(array [rows, dims] float32, info, stats)``; with an advantage
    ``weighting`` (``grpo`` / ``dr_grpo``) each document's rows are times its sequence weight and
    ``info`` records ``advantage_weighting`` and ``sequence_weights``."""
    if collector.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(collector.device)
    start = time.perf_counter()
    weights = doc_weights(docs, weighting)
    array, info = collector.collect([(d.input_ids, d.loss_mask) for d in docs])
    if weights is not None:
        weight_rows(array, info, weights)
        info["advantage_weighting"], info["sequence_weights"] = weighting, weights.tolist()
    seconds = time.perf_counter() - start
    device_mb = (torch.cuda.max_memory_allocated(collector.device) / 2**20
                 if collector.device.type == "cuda" else None)
    stats = CollectStats(rows=array.shape[0], dims=array.shape[1], tokens=sum(len(d.input_ids) for d in docs),
                         seconds=seconds, peak_rss_mb=peak_rss_mb(), peak_device_mb=device_mb)
    return array, info, stats


def collect_shard(collector: GradientCollector, docs: Sequence[TokenizedDoc], out: Path,
                  model_fingerprint: str, producer: str = "",
                  weighting: str = "none") -> tuple[GradientStore, CollectStats]:
    """Collect ``docs`` and write a gradient store at ``out`` (atomically); ``producer`` names
    the code that wrote it (recorded in ``info.json``, see :func:`reusable_store`)."""
    array, info, stats = collect(collector, docs, weighting)
    info["producer"] = producer
    store = write_store(out, array, info, doc_ids=[d.doc_id for d in docs],
                        model_fingerprint=model_fingerprint, dtype=collector.gradients.dtype)
    return store, stats


def reusable_store(path: Path, docs: Sequence[TokenizedDoc], model_fingerprint: str,
                   gradients: GradientSpec, producer: str, weighting: str = "none") -> GradientStore | None:
    """The complete store at ``path`` when it holds exactly these documents' rows from the same
    model, settings and producing code (e.g. written by a run that was killed before it could
    record it), else None. Stores are written atomically, so one that opens is complete."""
    try:
        store = GradientStore(path)
    except (OSError, ValueError):
        return None
    info = store.info
    same = (info.get("producer") == producer and info.get("model_fingerprint") == model_fingerprint
            and store.doc_ids == [d.doc_id for d in docs]
            and info.get("config_hash") == rows_hash(gradients, info.get("normalizer")))
    weights = doc_weights(docs, weighting)
    same = same and info.get("sequence_weights") == (None if weights is None else weights.tolist())
    return store if same else None


@dataclass
class ShardRows:
    """One shard's training rows as stored (per document, or per token) with their info."""

    shard: str
    array: np.ndarray
    info: dict
    doc_ids: list[str]

    def document_rows(self) -> np.ndarray:
        return document_rows(self.array, self.info)


def training_rows(spec: PipelineSpec, paths: PipelinePaths, shards: Sequence[str],
                  collector: Callable[[], GradientCollector] | None = None,
                  reference: dict | None = None) -> Iterator[ShardRows]:
    """Each shard's training rows, from its gradient store (``scoring.mode: stored``) or
    recomputed from its tokens (``streaming``; ``collector`` builds the collector once, when
    the first shard needs it). Stores are checked to be compatible with the first one and,
    when given, with ``reference`` (e.g. the query store's info)."""
    if spec.scoring.mode == "streaming":
        if collector is None:
            raise ValueError(f"Pipeline {spec.name!r} streams its training gradients: pass a collector.")
        made = None
        for shard in shards:
            made = made or collector()
            docs = read_tokenized(paths.tokens(shard))
            array, info, _ = collect(made, docs, spec.corpus.advantage_weighting)
            yield ShardRows(shard, array, info, [d.doc_id for d in docs])
        return
    first = reference
    for shard in shards:
        store = GradientStore(paths.train_gradients(shard))
        if first is not None:
            check_compatible(store.info, first)
        first = first or store.info
        yield ShardRows(shard, store.array, store.info, store.doc_ids)


def collect_to_store(
    model: torch.nn.Module,
    docs: Sequence[Document],
    doc_ids: Sequence[str],
    path,
    gradients: GradientSpec | None = None,
    model_fingerprint: str = "",
    normalizer=None,
    device=None,
):
    """Collect ``docs`` and write one gradient shard at ``path``; returns the ``GradientStore``."""
    if len(doc_ids) != len(docs):
        raise ValueError(f"{len(doc_ids)} doc_ids for {len(docs)} documents")
    collector = GradientCollector(model, gradients, normalizer, device)
    array, info = collector.collect(docs)
    return write_store(
        path,
        array,
        info,
        doc_ids=doc_ids,
        model_fingerprint=model_fingerprint,
        dtype=collector.gradients.dtype,
    )
