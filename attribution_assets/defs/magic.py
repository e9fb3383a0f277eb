"""MAGIC as assets (pipelines with ``magic.enabled``; not part of ``attribution demo``).

``magic_training``: the deterministic training run with its checkpoints (one folder per
checkpoint under ``magic_training/``); it registers the query batches.
``magic_scores[batch-NNNN]``: exact metagradient scores of one batch of queries against every
training document (one reverse pass per query), a score table like ``scores``; the DuckDB file
gets a ``magic_scores`` view.
"""

import dagster as dg

from attribution_assets.defs.common import (
    Timer,
    code_version,
    compute_version,
    key,
    path_metadata,
    shards_partitions,
)
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.engine.io import data
from attribution_assets.engine.scoring import database
from attribution_assets.spec import PipelineSpec

ALL = dg.AllPartitionMapping()


def magic_batches(spec: PipelineSpec) -> dg.DynamicPartitionsDefinition:
    return dg.DynamicPartitionsDefinition(name=f"{spec.name}_magic_query_batches")


def _training_docs(context, spec: PipelineSpec, paths):
    """Every tokenized document in corpus order (shards sorted), and each one's shard."""
    shards = sorted(context.instance.get_dynamic_partitions(shards_partitions(spec).name))
    docs = [(d, s) for s in shards for d in data.read_tokenized(paths.tokens(s))]
    return [d for d, _ in docs], [s for _, s in docs]


def magic_assets(spec: PipelineSpec, compute: ComputeResource) -> list[dg.AssetsDefinition]:
    if not spec.magic.enabled:
        return []
    group = f"{spec.name}_magic"
    training_key, scores_key = key(spec, "magic_training"), key(spec, "magic_scores")
    batches = magic_batches(spec)
    version = code_version("magic-v1", spec, "model", "demo", "corpus", "magic") + compute_version(compute)

    @dg.asset(key=training_key, group_name=group, pool="gpu", code_version=version,
              deps=[dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL), key(spec, "model"),
                    key(spec, "tokenized_queries")],
              description="Deterministic training run (seeded data order, no dropout, functional "
                          "AdamW/SGD) with a safetensors checkpoint every `magic.checkpoint_every` steps, "
                          "the run that MAGIC differentiates; registers the query batches.")
    def magic_training(context: dg.AssetExecutionContext, storage: StorageResource,
                       compute: ComputeResource) -> dg.MaterializeResult:
        from attribution_assets.engine.magic import pipeline as magic  # torch

        timer = Timer()
        paths = storage.paths(spec)
        docs, _ = _training_docs(context, spec, paths)
        model, tokenizer = compute.load_model(spec, paths)
        record = magic.train_pipeline(spec, paths, model, docs, tokenizer.pad_token_id or 0,
                                      log=context.log.info)
        queries = data.read_tokenized(paths.query_tokens)
        wanted = list(magic.query_batches([q.doc_id for q in queries], spec.magic.query_batch_size))
        stale = [b for b in context.instance.get_dynamic_partitions(batches.name) if b not in wanted]
        for batch in stale:
            context.instance.delete_dynamic_partition(batches.name, batch)
        context.instance.add_dynamic_partitions(batches.name, wanted)
        return dg.MaterializeResult(metadata={
            "steps": record["steps"], "checkpoints": dg.MetadataValue.json(record["checkpoints"]),
            "documents": record["documents"], "query_batches": len(wanted),
            "path": path_metadata(paths.magic_training), "train_seconds": record["metrics"]["train_seconds"],
            "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb})

    @dg.asset(key=scores_key, group_name=group, pool="gpu", partitions_def=batches, code_version=version,
              deps=[training_key, key(spec, "tokenized_queries")],
              description="MAGIC scores -d(query loss after training)/d(document weight) of one batch of "
                          "queries against every training document (exact for this training run), as a "
                          "score table `query_id, doc_id, shard, score`; higher = proponent.")
    def magic_scores(context: dg.AssetExecutionContext, storage: StorageResource,
                     compute: ComputeResource) -> dg.MaterializeResult:
        from attribution_assets.engine.magic import pipeline as magic  # torch

        timer = Timer()
        paths = storage.paths(spec)
        docs, shards = _training_docs(context, spec, paths)
        model, tokenizer = compute.load_model(spec, paths)
        queries = data.read_tokenized(paths.query_tokens)
        stats = magic.score_batch(spec, paths, model, docs, shards, queries, context.partition_key,
                                  tokenizer.pad_token_id or 0, log=context.log.info)
        if paths.database.exists():
            database.build_database(paths, with_token_scores=spec.gradients.token_rows,
                                    breakdown=spec.scoring.breakdown)
        return dg.MaterializeResult(metadata={**stats, "path": path_metadata(paths.magic_scores(context.partition_key)),
                                              "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb})

    return [magic_training, magic_scores]
