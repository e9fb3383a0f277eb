"""Quality as assets: fact tracing against baselines, and the LDS retrains of the demo.

``fact_tracing`` (pipelines whose queries know their gold documents) and the demo's
``lds_retrain[subset-NNN-seed-S]`` / ``lds`` are not part of ``attribution demo``: they
are materialized on demand (``attribution evaluate``, or the UI), the retrains as
partitions that run in parallel and incrementally.
"""

import json

import dagster as dg
import numpy as np
import polars as pl

from ..engine import data, evaluation, lds, pipeline_io
from ..engine.atomic import atomic_dir
from ..spec import PipelineSpec
from .common import (
    COMPUTE,
    STORAGE,
    Timer,
    code_version,
    key,
    model_resource_key,
    shards_partitions,
)
from .corpus import load_model
from .gradients import model_dir

ALL = dg.AllPartitionMapping()


def lds_partitions(spec: PipelineSpec) -> dg.StaticPartitionsDefinition:
    """``subset-NNN-seed-S``: every subset retrained with the demo's seed and seed + 1."""
    seeds = (0, 1)
    return dg.StaticPartitionsDefinition([f"subset-{k:03d}-seed-{s}" for k in range(spec.evaluation.lds_subsets)
                                          for s in seeds])


def evaluation_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    if spec.queries is None or not (spec.is_demo or spec.queries.gold_column):
        return []
    group = f"{spec.name}_evaluation"
    ft_key = key(spec, "fact_tracing")

    @dg.asset(key=ft_key, group_name=group, required_resource_keys={STORAGE, COMPUTE, model_resource_key(spec)},
              deps=[dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL),
                    key(spec, "tokenized_queries"), key(spec, "query_set"), key(spec, "model")],
              code_version=code_version("fact-tracing-v2", spec, "gradients", "scoring"), pool="gpu",
              description="Recall@1/10/50 and MRR of BM25, raw dot product, cosine, TrackStar (each "
                          "optimizer normalization) and the preconditioned dot product, with answer-only "
                          "and whole-text query loss.")
    def fact_tracing(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        docs = [d for s in shards
                for d in data.read_tokenized(storage.path(spec.name, "tokenized_shards", s) / "tokens.parquet")]
        queries = data.read_tokenized(storage.path(spec.name, "tokenized_queries") / "tokens.parquet")
        table = pl.read_parquet(storage.path(spec.name, "query_set") / "queries.parquet")
        gold = dict(zip(table["doc_id"].to_list(), table["gold_doc_ids"].to_list()))
        model, _ = load_model(spec, context)
        result = evaluation.fact_tracing_table(model, spec, model_dir(spec, storage), docs, queries, gold)
        out = storage.path(spec.name, "evaluation")
        evaluation.write_tables(result.frame, result.markdown, out, "fact_tracing")
        with atomic_dir(out / "scores") as scores_dir:  # [q, n] per method, columns in doc_ids order
            for name, matrix in result.scores["completion"].items():
                np.save(scores_dir / f"{name}.npy", matrix.astype(np.float32), allow_pickle=False)
            (scores_dir / "doc_ids.json").write_text(json.dumps([d.doc_id for d in docs]))
            (scores_dir / "query_ids.json").write_text(json.dumps([q.doc_id for q in queries]))
        return dg.MaterializeResult(metadata={
            "table": dg.MetadataValue.md(result.markdown), "documents": len(docs), "queries": len(queries),
            "path": dg.MetadataValue.path(str(out / "fact_tracing.parquet")), "seconds": timer.seconds})

    if not spec.is_demo:
        return [fact_tracing]
    partitions = lds_partitions(spec)
    retrain_key = key(spec, "lds_retrain")

    def masks(storage) -> np.ndarray:
        n = len(pipeline_io.read_documents(storage.path(spec.name, "corpus") / "documents.parquet"))
        e = spec.evaluation
        return lds.lds_subsets(n, e.lds_subsets, e.lds_fraction, e.lds_seed)

    @dg.asset(key=retrain_key, group_name=group, partitions_def=partitions,
              required_resource_keys={STORAGE, COMPUTE},
              deps=[key(spec, "corpus"), key(spec, "tokenizer"), key(spec, "tokenized_queries")],
              code_version=code_version("lds-retrain-v1", spec, "demo", "evaluation"), pool="gpu",
              description="The demo model retrained on one random half of the corpus (removed documents get "
                          "loss weight 0; same init, data order and steps); records the query losses.")
    def lds_retrain(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        from transformers import AutoTokenizer

        from ..engine.demo_model import DemoModelConfig

        timer = Timer()
        storage = context.resources.storage
        subset, seed = context.partition_key.split("-seed-")
        k = int(subset.split("-")[1])
        texts = [d["text"] for d in pipeline_io.read_documents(storage.path(spec.name, "corpus") / "documents.parquet")]
        config = DemoModelConfig(**spec.demo.model_overrides())
        queries = data.read_tokenized(storage.path(spec.name, "tokenized_queries") / "tokens.parquet")
        tokenizer = AutoTokenizer.from_pretrained(storage.path(spec.name, "tokenizer"))
        keep = masks(storage)[k]
        out = storage.path(spec.name, "lds_retrain", context.partition_key)
        losses = lds.retrain_partition(tokenizer, texts, keep, config, queries, out, seed=config.seed + int(seed))
        return dg.MaterializeResult(metadata={"kept_documents": int(keep.sum()), "mean_query_loss": float(losses.mean()),
                                              "seconds": timer.seconds})

    @dg.asset(key=key(spec, "lds"), group_name=group, required_resource_keys={STORAGE},
              deps=[dg.AssetDep(retrain_key, partition_mapping=ALL), ft_key, key(spec, "corpus"),
                    key(spec, "query_set")],
              code_version=code_version("lds-v2", spec, "evaluation"),
              description="Linear datamodeling score per method and score variant (all scores, top k), "
                          "Spearman of predicted vs measured query loss over the subsets, bootstrap 95% CI; "
                          "the gold documents as a reference predictor; two-seed agreement and noise ceiling.")
    def lds_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        scores_dir = storage.path(spec.name, "evaluation") / "scores"
        dirs = {s: [storage.path(spec.name, "lds_retrain", f"subset-{k:03d}-seed-{s}")
                    for k in range(spec.evaluation.lds_subsets)] for s in (0, 1)}
        position = {d: i for i, d in enumerate(json.loads((scores_dir / "doc_ids.json").read_text()))}
        corpus_ids = [d["doc_id"] for d in
                      pipeline_io.read_documents(storage.path(spec.name, "corpus") / "documents.parquet")]
        order = np.array([position[d] for d in corpus_ids])
        scores = {p.stem: np.load(p, allow_pickle=False)[:, order] for p in sorted(scores_dir.glob("*.npy"))}
        query_ids = json.loads((scores_dir / "query_ids.json").read_text())
        table = pl.read_parquet(storage.path(spec.name, "query_set") / "queries.parquet")
        gold = dict(zip(table["doc_id"].to_list(), table["gold_doc_ids"].to_list()))
        references = {"gold documents (reference)": lds.gold_indicator(query_ids, corpus_ids, gold)}
        frame, markdown = lds.lds_table(scores, masks(storage), lds.read_partition_losses(dirs[0], query_ids),
                                        lds.read_partition_losses(dirs[1], query_ids),
                                        top_k=spec.evaluation.lds_top_k, references=references,
                                        baseline="dot" if "dot" in scores else None)
        out = storage.path(spec.name, "evaluation")
        evaluation.write_tables(frame, markdown, out, "lds")
        return dg.MaterializeResult(metadata={"table": dg.MetadataValue.md(markdown),
                                              "subsets": spec.evaluation.lds_subsets,
                                              "path": dg.MetadataValue.path(str(out / "lds.parquet")),
                                              "seconds": timer.seconds})

    return [fact_tracing, lds_retrain, lds_asset]
