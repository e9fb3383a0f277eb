"""Preconditioner (fan-in), per-shard score tables and the DuckDB database of views."""

import dagster as dg

from ..engine import data, database, workflow
from ..engine.preconditioners import Preconditioner, check_preconditioner
from ..engine.store import GradientStore, check_compatible
from ..spec import PipelineSpec
from .common import (
    COMPUTE,
    STORAGE,
    Timer,
    code_version,
    digest,
    key,
    model_resource_key,
    shards_partitions,
)
from .corpus import load_model
from .gradients import model_dir

ALL = dg.AllPartitionMapping()


def score_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    if spec.queries is None:
        return []
    streaming = spec.scoring.mode == "streaming"
    resources = {STORAGE, COMPUTE, model_resource_key(spec)}
    train_source = key(spec, "tokenized_shards") if streaming else key(spec, "train_gradients")
    precond_key = key(spec, "preconditioner")
    score_version = code_version("scores-v1", spec, "gradients", "scoring")

    def streamed_blocks(context, shards):
        """Document-row gradient blocks computed on the fly, one shard at a time (streaming mode)."""
        storage = context.resources.storage
        model, _ = load_model(spec, context)
        collector = workflow.make_collector(model, spec, model_dir(spec, storage))
        for shard in shards:
            docs = data.read_tokenized(storage.path(spec.name, "tokenized_shards", shard) / "tokens.parquet")
            array, info, _ = workflow.collect(collector, docs)
            yield array, info, [d.doc_id for d in docs]

    @dg.asset(key=precond_key, group_name=spec.name, required_resource_keys=resources,
              deps=[dg.AssetDep(train_source, partition_mapping=ALL), key(spec, "query_gradients")],
              code_version=score_version, pool="gpu" if streaming else None,
              check_specs=[dg.AssetCheckSpec("positive_definite", asset=precond_key, blocking=True,
                                             description="symmetric, finite, positive definite after damping")],
              description="TrackStar autocorrelation of training (and query) gradients, per module, "
                          "mixed and damped; streamed shard by shard.")
    def preconditioner(context: dg.AssetExecutionContext):
        timer = Timer()
        storage = context.resources.storage
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        queries = GradientStore(storage.path(spec.name, "query_gradients"))
        layout = queries.info["modules"]
        if streaming:
            train = workflow.accumulate((workflow.document_rows(array, info)
                                         for array, info, _ in streamed_blocks(context, shards)), layout)
        else:
            paths = [storage.path(spec.name, "train_gradients", s) for s in shards]
            for path in paths:
                check_compatible(GradientStore(path), queries)
            train = workflow.accumulate(workflow.store_blocks(paths), layout)
        query = workflow.accumulate([workflow.document_rows(queries.array, queries.info)], layout)
        result = workflow.build_preconditioner(train, query, spec.scoring)
        out = storage.path(spec.name, "preconditioner")
        result.save(out)
        report = check_preconditioner(Preconditioner.load(out))
        yield dg.MaterializeResult(
            metadata={"shards": len(shards), "n_train": train.n, "n_query": query.n,
                      "lambda": float(result.lam) if result.lam is not None else "off",
                      "damping": spec.scoring.damping, "modules": len(layout), "dims": result.dims,
                      "path": dg.MetadataValue.path(str(out)), "seconds": timer.seconds},
            data_version=dg.DataVersion(digest([str(train.n), str(query.n), str(result.settings())]
                                               + [result.matrices[m.name].tobytes() for m in result.layout])))
        yield dg.AssetCheckResult(asset_key=precond_key, check_name="positive_definite", passed=report["ok"],
                                  metadata={"modules": dg.MetadataValue.json(report["modules"])})

    scores_key = key(spec, "scores")

    @dg.asset(key=scores_key, group_name=spec.name, partitions_def=shards_partitions(spec),
              deps=[train_source, key(spec, "query_gradients")] + ([precond_key] if spec.scoring.precondition else []),
              required_resource_keys=resources, code_version=score_version,
              pool="gpu" if streaming else None,
              description="Long-format Parquet `query_id, doc_id, shard, score` (higher = supports the query).")
    def scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        shard = context.partition_key
        queries = GradientStore(storage.path(spec.name, "query_gradients"))
        precond = Preconditioner.load(storage.path(spec.name, "preconditioner")) if spec.scoring.precondition \
            else None
        prepared = workflow.prepare(queries.array, queries.info, precond, spec.scoring)
        if streaming:
            ((array, info, doc_ids),) = streamed_blocks(context, [shard])
        else:
            store = GradientStore(storage.path(spec.name, "train_gradients", shard))
            check_compatible(store, queries)
            array, info, doc_ids = store.array, store.info, store.doc_ids
        matrix = workflow.score_block(prepared, workflow.document_rows(array, info), precond, spec.scoring)
        query_ids = workflow.score_query_ids(queries.doc_ids, spec.scoring.aggregate)
        out = storage.path(spec.name, "scores", shard)
        n = workflow.write_scores(out / "scores.parquet", matrix, query_ids, doc_ids, shard, spec.scoring.top_k)
        if info.get("per_token"):
            tokens = workflow.score_block(prepared, array, precond, spec.scoring)
            workflow.write_token_scores(out / "token_scores.parquet", tokens, query_ids, doc_ids, info, shard)
        return dg.MaterializeResult(
            metadata={"rows": n, "queries": len(query_ids), "documents": len(doc_ids),
                      "path": dg.MetadataValue.path(str(out / "scores.parquet")), "seconds": timer.seconds},
            data_version=dg.DataVersion(digest([matrix.tobytes()])))

    db_key = key(spec, "attribution_db")

    @dg.asset(key=db_key, group_name=spec.name, required_resource_keys={STORAGE},
              deps=[dg.AssetDep(scores_key, partition_mapping=ALL),
                    dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL), key(spec, "query_set")],
              code_version="duckdb-views-v1",
              check_specs=[dg.AssetCheckSpec("schema", asset=db_key, blocking=False,
                                             description="views answer with the documented columns")],
              description="DuckDB file of views (scores, documents, queries, top_influences) over the Parquet files.")
    def attribution_db(context: dg.AssetExecutionContext):
        storage = context.resources.storage
        path = storage.path(spec.name, "attribution.duckdb")
        database.build_database(path, storage.path(spec.name, ""), with_token_scores=spec.gradients.per_token)
        columns = database.view_columns(path)
        yield dg.MaterializeResult(
            metadata={"path": dg.MetadataValue.path(str(path)), "views": dg.MetadataValue.json(columns),
                      "example": dg.MetadataValue.md(f"```sql\n{database.TOP_K_SQL.strip()}\n```")})
        yield dg.AssetCheckResult(asset_key=db_key, check_name="schema",
                                  passed=columns.get("scores") == ["query_id", "doc_id", "shard", "score"])

    return [preconditioner, scores, attribution_db]
