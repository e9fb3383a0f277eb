"""Train-time rows read back: the ranks' part stores merged into one shard, a pipeline's
train-time stores, and each document's rows summed over the optimizer steps that saw it
(``scoring.train_rows: train_time``: its total projected, normalized contribution to the
updates; the learning rate is not applied; zero for a document no step saw). The rows
themselves are written by ``engine.training.recorder``."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from attribution_assets.engine.gradients.store import GradientStore, write_store
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import PipelineSpec

DROPOUT_WARNING = ("train-time rows recorded with `record_dropout: step` on a model with dropout {p:g} carry "
                   "each step's dropout masks: they are what the optimizer saw, but differ from post-hoc rows "
                   "(eval mode, no dropout; up to ~100% on GPT-2's 0.1). Record with `record_dropout: off` "
                   "for rows comparable with post-hoc (query) rows")


def merge_parts(parts: Sequence[GradientStore], final: Path) -> GradientStore:
    """One store at ``final`` of the ranks' part stores (in rank order), rows ordered by (step,
    rank, row within the rank: micro-batch order); removes the parts."""
    first = parts[0].info
    steps = np.concatenate([np.asarray(training_tags(p)[0], dtype=np.int64) for p in parts])
    order = np.argsort(steps, kind="stable")
    epochs = np.concatenate([np.asarray(training_tags(p)[1], dtype=np.float64) for p in parts])
    doc_ids = np.array([d for p in parts for d in p.doc_ids], dtype=object)
    array = np.concatenate([np.asarray(p.array) for p in parts])[order]
    info = dict(first)
    info["rows"] = int(array.shape[0])
    info["training"] = {**first["training"], "steps": steps[order].tolist(), "epochs": epochs[order].tolist()}
    store = write_store(final, array, info, doc_ids=doc_ids[order].tolist(),
                        model_fingerprint=first.get("model_fingerprint", ""), dtype=first["dtype"])
    for p in parts:
        shutil.rmtree(p.path)
    return store


def training_tags(store: GradientStore) -> tuple[list[int], list[float]]:
    """``(steps, epochs)`` per row of a train-time shard (``ValueError`` for a post-hoc one)."""
    tags = store.info.get("training")
    if not tags:
        raise ValueError(f"gradient store {store.path} holds post-hoc rows (no `training` tags)")
    return list(tags["steps"]), list(tags["epochs"])


def train_time_stores(spec: PipelineSpec, paths: PipelinePaths) -> list[GradientStore]:
    """The train-time gradient stores of the pipeline's training run, in step order: the
    ``finetune`` asset's, else the demo model's own (``demo.record_epochs``)."""
    if spec.finetune is not None:
        return [GradientStore(paths.train_time_gradients(s)) for s in paths.train_time_shards()]
    return [GradientStore(p) for p in paths.demo_train_time_stores()]


def train_time_document_rows(stores: Sequence[GradientStore], doc_ids: Sequence[str]) -> tuple[np.ndarray, dict]:
    """``(array [len(doc_ids), dims] float32, info)``: each document's train-time rows summed over
    the steps that saw it (zero where none did); ``info`` is the first store's (settings, layout).
    Warns when the rows carry dropout masks (``dropout: step`` on a model with dropout > 0): they
    are then scored against post-hoc (dropout-free) query rows."""
    if not stores:
        raise FileNotFoundError("no train-time gradient shards: materialize the pipeline's `finetune` asset "
                                "(the demo: its `model` with `demo.record_epochs` >= 1)")
    first = stores[0].info
    tags = first.get("training") or {}
    if tags.get("dropout", "step") == "step" and tags.get("model_dropout", 0.0) > 0:
        warnings.warn(DROPOUT_WARNING.format(p=tags["model_dropout"]), stacklevel=2)
    index = {d: i for i, d in enumerate(doc_ids)}
    out = np.zeros((len(doc_ids), first["dims"]), dtype=np.float64)
    total = torch.from_numpy(out)  # shares memory with `out`; index_add_ sums repeated documents
    for store in stores:
        for key in ("dims", "modules", "projection", "normalizer", "config_hash"):
            if store.info.get(key) != first.get(key):
                raise ValueError(f"train-time gradient shards disagree on {key}: {store.path}")
        rows = [(r, index[d]) for r, d in enumerate(store.doc_ids) if d in index]
        if rows:
            src, dst = (np.array(x) for x in zip(*rows))
            total.index_add_(0, torch.from_numpy(dst), torch.from_numpy(np.asarray(store.array[src], np.float64)))
    info = {k: first[k] for k in ("dims", "modules", "projection", "normalizer", "config_hash")}
    info.update(per_token=False, rows=len(doc_ids), producer=first.get("producer", ""))
    return out.astype(np.float32), info
