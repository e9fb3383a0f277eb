"""MAGIC for a pipeline: its training run (checkpoints under ``PipelinePaths.magic_training``)
and its score tables (``magic_scores/<batch>/scores.parquet``, the score-table schema).

The run trains on the pipeline's tokenized documents in corpus order (shards sorted, then
their order in the shard): the demo from a fresh seeded init of its architecture (the run
that the demo's own training mirrors), any other pipeline from its model's weights (a
fine-tuning run). ``run.json`` records the settings, the number of steps, the checkpoint
steps and a digest of the documents, so scores are never computed against other data.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.engine.io.digests import parts_digest
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.magic.metagradients import magic_scores
from attribution_assets.engine.magic.training import Objective, TrainingRun
from attribution_assets.engine.scoring.tables import write_scores
from attribution_assets.spec import MagicSpec, PipelineSpec


def resolved_magic(spec: PipelineSpec) -> MagicSpec:
    """The pipeline's MAGIC settings with the demo's training settings filled in."""
    if not spec.magic.enabled:
        raise ValueError(f"pipeline {spec.name!r} has `magic.enabled: false`; set it to true to run MAGIC")
    return spec.magic.resolved(spec.demo)


def initial_model(spec: PipelineSpec, model: torch.nn.Module) -> torch.nn.Module:
    """The model the run starts from, in ``magic.dtype``: for the demo a fresh init of
    ``model``'s architecture seeded with ``magic.seed``; otherwise ``model`` itself."""
    from transformers import AutoModelForCausalLM

    magic = resolved_magic(spec)
    if spec.is_demo:
        torch.manual_seed(magic.seed)
        model = AutoModelForCausalLM.from_config(model.config).to(next(model.parameters()).device)
    return model.to(getattr(torch, magic.dtype)).eval()


def documents_digest(docs: Sequence[TokenizedDoc]) -> str:
    """Digest of the training sequences (ids, tokens and loss masks, in order)."""
    return parts_digest(f"{d.doc_id}:{d.input_ids}:{d.loss_mask}" for d in docs)


def pipeline_run(spec: PipelineSpec, paths: PipelinePaths, model: torch.nn.Module,
                 docs: Sequence[TokenizedDoc], pad_id: int,
                 checkpoint_path: Callable[[int], Path] | None = None) -> TrainingRun:
    """The pipeline's run over ``docs`` from ``model`` (already :func:`initial_model`)."""
    objective = Objective(model, [(d.input_ids, d.loss_mask) for d in docs], pad_id)
    return TrainingRun(objective, resolved_magic(spec), checkpoint_path or paths.magic_checkpoint)


def train_pipeline(spec: PipelineSpec, paths: PipelinePaths, model: torch.nn.Module,
                   docs: Sequence[TokenizedDoc], pad_id: int,
                   log: Callable[[str], None] = lambda _: None) -> dict:
    """Train the run and write its checkpoints and ``run.json`` (one atomic directory)."""
    with atomic_dir(paths.magic_training) as tmp:
        def checkpoint(step: int) -> Path:
            path = tmp / paths.magic_checkpoint(step).relative_to(paths.magic_training)
            path.parent.mkdir(parents=True, exist_ok=True)
            return path

        run = pipeline_run(spec, paths, initial_model(spec, model), docs, pad_id, checkpoint)
        _, metrics = run.train(log)
        record = {"magic": dataclasses.asdict(run.magic), "steps": run.total_steps,
                  "checkpoints": run.checkpoints, "documents": len(docs),
                  "documents_digest": documents_digest(docs), "metrics": metrics}
        (tmp / paths.magic_run.relative_to(paths.magic_training)).write_text(json.dumps(record, indent=1))
    return record


def read_run(paths: PipelinePaths, docs: Sequence[TokenizedDoc]) -> dict:
    """``run.json``, checked against ``docs`` (ValueError naming the fix on a mismatch)."""
    if not paths.magic_run.is_file():
        raise ValueError(f"{paths.magic_run} is missing: materialize `magic_training` first")
    record = json.loads(paths.magic_run.read_text())
    if record["documents_digest"] != documents_digest(docs):
        raise ValueError("the MAGIC run was trained on other documents than the pipeline's tokenized "
                         "shards now hold; re-materialize `magic_training`")
    return record


def query_batches(query_ids: Sequence[str], size: int) -> dict[str, list[int]]:
    """``{"batch-NNNN": query positions}``: consecutive groups of ``size`` queries."""
    return {f"batch-{k // size:04d}": list(range(k, min(k + size, len(query_ids))))
            for k in range(0, len(query_ids), size)}


def score_batch(spec: PipelineSpec, paths: PipelinePaths, model: torch.nn.Module,
                docs: Sequence[TokenizedDoc], shards: Sequence[str], queries: Sequence[TokenizedDoc],
                batch: str, pad_id: int, log: Callable[[str], None] = lambda _: None) -> dict:
    """MAGIC scores of the queries of ``batch`` against every document (``shards``: each
    document's shard), written to ``paths.magic_scores(batch)``; returns stats."""
    record = read_run(paths, docs)
    positions = query_batches([q.doc_id for q in queries], spec.magic.query_batch_size).get(batch)
    if positions is None:
        raise ValueError(f"no query batch {batch!r}: the queries changed since `magic_training`; "
                         "re-materialize it")
    run = pipeline_run(spec, paths, initial_model(spec, model), docs, pad_id)
    if run.total_steps != record["steps"] or dataclasses.asdict(run.magic) != record["magic"]:
        raise ValueError("the MAGIC settings changed since `magic_training`; re-materialize it")
    chosen = [queries[i] for i in positions]
    scores, stats = magic_scores(run, [(q.input_ids, q.loss_mask) for q in chosen], log=log)
    rows = write_scores(paths.magic_scores(batch), scores, [q.doc_id for q in chosen],
                        [d.doc_id for d in docs], list(shards), top_k=spec.scoring.top_k)
    return {"queries": len(chosen), "rows": rows, "seconds_per_query":
            round(float(np.mean([s["seconds"] for s in stats])), 3)}


def read_scores(paths: PipelinePaths, query_ids: Sequence[str], doc_ids: Sequence[str]) -> np.ndarray:
    """``[q, n]`` float32 MAGIC scores from every batch table (0 where a table keeps only the top
    ``k``); ValueError naming the missing queries when a batch is missing."""
    files = [paths.magic_scores(batch) for batch in paths.magic_score_batches()]
    if not files:
        raise ValueError("no MAGIC score tables: materialize `magic_scores` (every query batch)")
    table = pl.concat([pl.read_parquet(f) for f in files])
    row = {q: i for i, q in enumerate(query_ids)}
    col = {d: j for j, d in enumerate(doc_ids)}
    missing = sorted(set(query_ids) - set(table["query_id"].unique().to_list()))
    if missing:
        raise ValueError(f"{len(missing)} queries have no MAGIC scores (e.g. {missing[0]!r}): materialize "
                         "every `magic_scores` partition")
    table = table.filter(pl.col("query_id").is_in(list(row)) & pl.col("doc_id").is_in(list(col)))
    out = np.zeros((len(query_ids), len(doc_ids)), dtype=np.float32)
    out[[row[q] for q in table["query_id"]], [col[d] for d in table["doc_id"]]] = table["score"].to_numpy()
    return out
