"""Quality as assets: fact tracing against baselines, and the LDS retrains of the demo.

``fact_tracing`` (pipelines whose queries know their gold documents) and the demo's
``lds_retrain[subset-NNN-seed-S]`` / ``lds`` are not part of ``attribution demo``: they
are materialized on demand (``attribution evaluate``, or the UI), the retrains as
partitions that run in parallel and incrementally.
"""

import json

import dagster as dg
import numpy as np

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
from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import PipelineSpec

ALL = dg.AllPartitionMapping()
SEEDS = (0, 1)
#: Why the UI shows these assets "Never materialized" after `make demo`.
ON_DEMAND = (" On demand, not part of `make demo` (the UI shows it 'Never materialized' until then): "
             "`attribution evaluate --pipeline {name}{lds}` or Materialize here. The fact-tracing figures "
             "`make demo` prints come from `train_time_fact_tracing` and `overview`.")


def lds_partitions(spec: PipelineSpec) -> dg.StaticPartitionsDefinition:
    """``subset-NNN-seed-S``: every subset retrained as seed a (``S = 0``: the demo model's init
    and data order) and seed b (``S = 1``: what ``lds_seed_b_varies`` says; ``lds.retrain_seeds``)."""
    return dg.StaticPartitionsDefinition([f"subset-{k:03d}-seed-{s}" for k in range(spec.evaluation.lds_subsets)
                                          for s in SEEDS])


def _gold(paths: PipelinePaths) -> dict[str, list[str]]:
    import polars as pl

    table = pl.read_parquet(paths.queries)
    return dict(zip(table["doc_id"].to_list(), table["gold_doc_ids"].to_list()))


def evaluation_assets(spec: PipelineSpec, compute: ComputeResource) -> list[dg.AssetsDefinition]:
    if spec.queries is None or not (spec.is_demo or spec.queries.gold_column):
        return []
    group = f"{spec.name}_evaluation"
    ft_key = key(spec, "fact_tracing")

    @dg.asset(key=ft_key, group_name=group,
              deps=[dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL),
                    key(spec, "tokenized_queries"), key(spec, "query_set"), key(spec, "model")]
              + ([dg.AssetDep(key(spec, "magic_scores"), partition_mapping=ALL)] if spec.magic.enabled else []),
              code_version=code_version("fact-tracing-v4", spec, "gradients", "scoring", "evaluation")
              + compute_version(compute) + ("-magic" if spec.magic.enabled else ""),
              pool="gpu",
              description="Recall@1/10/50, MRR and tail patch (answer log-probability gained by one "
                          "training step on the top documents) of random documents, BM25, raw dot "
                          "product, cosine, TrackStar (each optimizer normalization), the preconditioned "
                          "dot product and EK-FAC / K-FAC influence, with answer-only and whole-text "
                          "query loss." + ON_DEMAND.format(name=spec.name, lds=""))
    def fact_tracing_asset(context: dg.AssetExecutionContext, storage: StorageResource,
                           compute: ComputeResource) -> dg.MaterializeResult:
        from attribution_assets.engine.evaluation import fact_tracing  # torch

        timer = Timer()
        paths = storage.paths(spec)
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        docs = [d for s in shards for d in data.read_tokenized(paths.tokens(s))]
        queries = data.read_tokenized(paths.query_tokens)
        model, _ = compute.load_model(spec, paths)
        result = fact_tracing.fact_tracing_table(model, spec, paths, docs, queries, _gold(paths))
        fact_tracing.write_tables(result.frame, result.markdown, paths.evaluation, "fact_tracing")
        with atomic_dir(paths.evaluation_scores) as scores_dir:  # [q, n] per method, columns in doc_ids order
            for name, matrix in result.scores["completion"].items():
                np.save(scores_dir / f"{name}.npy", matrix.astype(np.float32), allow_pickle=False)
            (scores_dir / "doc_ids.json").write_text(json.dumps([d.doc_id for d in docs]))
            (scores_dir / "query_ids.json").write_text(json.dumps([q.doc_id for q in queries]))
        return dg.MaterializeResult(metadata={
            "table": dg.MetadataValue.md(result.markdown), "documents": len(docs), "queries": len(queries),
            "path": path_metadata(paths.evaluation / "fact_tracing.parquet"), "seconds": timer.seconds})

    if not spec.is_demo:
        return [fact_tracing_asset]
    partitions = lds_partitions(spec)
    retrain_key = key(spec, "lds_retrain")

    def masks(paths: PipelinePaths) -> np.ndarray:
        from attribution_assets.engine.evaluation import lds
        from attribution_assets.engine.io import corpus as corpus_io

        n = len(corpus_io.read_documents(paths.documents))
        e = spec.evaluation
        return lds.lds_subsets(n, e.lds_subsets, e.lds_fraction, e.lds_seed)

    @dg.asset(key=retrain_key, group_name=group, partitions_def=partitions,
              deps=[key(spec, "corpus"), key(spec, "tokenizer"), key(spec, "tokenized_queries")],
              code_version=code_version("lds-retrain-v2", spec, "demo", "evaluation"), pool="gpu",
              description="The demo model retrained on one random subset of the corpus (a share "
                          "evaluation.lds_fraction of the documents; removed documents get loss weight 0; "
                          "same steps; seed a: the demo's init and data order, seed b: another data order "
                          "and, unless lds_seed_b_varies is data_order, another init); records the query "
                          "losses and the subset." + ON_DEMAND.format(name=spec.name, lds=" --lds"))
    def lds_retrain(context: dg.AssetExecutionContext, storage: StorageResource,
                    compute: ComputeResource) -> dg.MaterializeResult:
        from transformers import AutoTokenizer

        from attribution_assets.engine.evaluation import lds
        from attribution_assets.engine.io import corpus as corpus_io

        timer = Timer()
        paths = storage.paths(spec)
        subset, seed = context.partition_key.split("-seed-")
        k = int(subset.split("-")[1])
        texts = [d["text"] for d in corpus_io.read_documents(paths.documents)]
        queries = data.read_tokenized(paths.query_tokens)
        tokenizer = AutoTokenizer.from_pretrained(paths.tokenizer)
        keep = masks(paths)[k]
        runs = lds.retrain_seeds(spec.demo.seed, spec.evaluation.lds_seed_b_varies)
        init_seed, order_seed = runs["seed b" if int(seed) else "seed a"]
        losses = lds.retrain_partition(tokenizer, texts, keep, spec.demo, queries,
                                       paths.lds_retrain(context.partition_key), seed=init_seed, order_seed=order_seed)
        return dg.MaterializeResult(metadata={"kept_documents": int(keep.sum()), "mean_query_loss": round(float(losses.mean()), 4),
                                              "init_seed": init_seed, "order_seed": order_seed,
                                              "seconds": timer.seconds})

    @dg.asset(key=key(spec, "lds"), group_name=group,
              deps=[dg.AssetDep(retrain_key, partition_mapping=ALL), ft_key, key(spec, "corpus"),
                    key(spec, "query_set")],
              code_version=code_version("lds-v4", spec, "evaluation"),
              description="Linear datamodeling score per method and score variant (all scores, top k), "
                          "Spearman of predicted vs measured query loss over the subsets, bootstrap 95% CI; "
                          "the gold documents as a reference predictor; against each retrain seed and their "
                          "mean loss; two-seed agreement and the noise ceilings."
                          + ON_DEMAND.format(name=spec.name, lds=" --lds"))
    def lds_asset(storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.evaluation import fact_tracing, lds
        from attribution_assets.engine.io import corpus as corpus_io

        timer = Timer()
        paths = storage.paths(spec)
        scores_dir = paths.evaluation_scores
        dirs = {s: [paths.lds_retrain(f"subset-{k:03d}-seed-{s}") for k in range(spec.evaluation.lds_subsets)]
                for s in SEEDS}
        position = {d: i for i, d in enumerate(json.loads((scores_dir / "doc_ids.json").read_text()))}
        corpus_ids = [d["doc_id"] for d in corpus_io.read_documents(paths.documents)]
        order = np.array([position[d] for d in corpus_ids])
        scores = {p.stem: np.load(p, allow_pickle=False)[:, order] for p in sorted(scores_dir.glob("*.npy"))}
        query_ids = json.loads((scores_dir / "query_ids.json").read_text())
        references = {"gold documents (reference)": lds.gold_indicator(query_ids, corpus_ids, _gold(paths))}
        subsets = masks(paths)
        frame, markdown = lds.lds_table(scores, subsets, lds.read_partition_losses(dirs[0], query_ids, subsets),
                                        lds.read_partition_losses(dirs[1], query_ids, subsets),
                                        top_k=spec.evaluation.lds_top_k, references=references,
                                        baseline="dot" if "dot" in scores else None)
        fact_tracing.write_tables(frame, markdown, paths.evaluation, "lds")
        return dg.MaterializeResult(metadata={"table": dg.MetadataValue.md(markdown),
                                              "subsets": spec.evaluation.lds_subsets,
                                              "fraction": spec.evaluation.lds_fraction,
                                              "seed_b_varies": spec.evaluation.lds_seed_b_varies,
                                              "path": path_metadata(paths.evaluation / "lds.parquet"),
                                              "seconds": timer.seconds})

    return [fact_tracing_asset, lds_retrain, lds_asset]


def train_time_evaluation_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    """``train_time_fact_tracing``: fact tracing from the training run's own rows next to the
    post-hoc rows (``engine.evaluation.train_time``), for a pipeline that records train-time
    rows, scores post hoc and has gold queries; part of ``attribution demo`` (its last stage)."""
    if not (spec.records_train_time and spec.scoring.train_rows == "post_hoc" and spec.scoring.mode == "stored"
            and spec.queries is not None and (spec.is_demo or spec.queries.gold_column)):
        return []
    precond = [key(spec, "preconditioner")] if spec.scoring.preconditioner == "trackstar" else []

    @dg.asset(key=key(spec, "train_time_fact_tracing"), group_name=f"{spec.name}_evaluation",
              deps=[dg.AssetDep(key(spec, "train_gradients"), partition_mapping=ALL), key(spec, "model"),
                    key(spec, "query_gradients"), key(spec, "query_set"), *precond]
              + ([key(spec, "finetune")] if spec.finetune is not None else []),
              code_version=code_version("train-time-fact-tracing-v1", spec, "gradients", "scoring", "demo",
                                        "finetune"),
              description="Recall@1/10/50 and MRR of the pipeline's scoring from train-time rows (summed "
                          "per document over the recorded steps, their own TrackStar preconditioner) "
                          "next to the post-hoc rows of the final model.")
    def train_time_fact_tracing(context: dg.AssetExecutionContext,
                                storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.evaluation import fact_tracing, train_time

        timer = Timer()
        paths = storage.paths(spec)
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        frame, markdown = train_time.train_time_fact_tracing(spec, paths, shards, _gold(paths))
        fact_tracing.write_tables(frame, markdown, paths.evaluation, "train_time_fact_tracing")
        figures = {f"{row['train_rows']}_{m}": row[m] for row in frame.iter_rows(named=True)
                   for m in ("recall@1", "recall@10", "mrr")}
        return dg.MaterializeResult(metadata={
            "table": dg.MetadataValue.md(markdown), **figures, "queries": int(frame["queries"][0]),
            "path": path_metadata(paths.evaluation / "train_time_fact_tracing.parquet"),
            "seconds": timer.seconds})

    return [train_time_fact_tracing]
