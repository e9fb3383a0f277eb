"""Preconditioner (fan-in), per-shard score tables and the DuckDB database of views."""

import dagster as dg

from ..engine import data, database, workflow
from ..engine.preconditioners import Preconditioner, check_preconditioner
from ..engine.store import GradientStore, check_compatible
from ..spec import PipelineSpec
from .automation import rebuild_condition
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

    autocorr_key = key(spec, "train_autocorrelation")

    @dg.asset(key=autocorr_key, group_name=spec.name, required_resource_keys=resources,
              deps=[dg.AssetDep(train_source, partition_mapping=ALL)],
              code_version=code_version("autocorrelation-v1", spec, "model", "demo", "corpus", "gradients"),
              pool="gpu" if streaming else None, automation_condition=rebuild_condition(on_deps_updated=False),
              description="Per-module autocorrelation (1/n) sum g g^T of the training gradients, streamed "
                          "shard by shard; rebuilt on schedule or on demand, not once per new shard.")
    def train_autocorrelation(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        if streaming:
            blocks = streamed_blocks(context, shards)
            first_array, first_info, _ = next(blocks)
            layout = first_info["modules"]
            rows = (workflow.document_rows(a, i) for a, i, _ in blocks)
            train = workflow.accumulate([workflow.document_rows(first_array, first_info), *rows], layout)
        else:
            paths = [storage.path(spec.name, "train_gradients", s) for s in shards]
            layout = GradientStore(paths[0]).info["modules"]
            for path in paths[1:]:
                check_compatible(GradientStore(path), GradientStore(paths[0]))
            train = workflow.accumulate(workflow.store_blocks(paths), layout)
        out = storage.path(spec.name, "train_autocorrelation")
        workflow.save_autocorrelation(out, train)
        return dg.MaterializeResult(
            metadata={"shards": len(shards), "n_train": train.n, "modules": len(layout),
                      "path": dg.MetadataValue.path(str(out)), "seconds": timer.seconds},
            data_version=dg.DataVersion(workflow.digest_files(out)))

    @dg.asset(key=precond_key, group_name=spec.name, required_resource_keys={STORAGE, COMPUTE},
              deps=[autocorr_key, key(spec, "query_gradients")],
              code_version=code_version("preconditioner-v2", spec, "gradients", "scoring"),
              automation_condition=rebuild_condition(),
              check_specs=[dg.AssetCheckSpec("positive_definite", asset=precond_key, blocking=True,
                                             description="symmetric, finite, positive definite after damping")],
              description="TrackStar preconditioner: lambda R_query + (1 - lambda) R_train per module, "
                          "damped, float64 eigendecomposition.")
    def preconditioner(context: dg.AssetExecutionContext):
        timer = Timer()
        storage = context.resources.storage
        train = workflow.load_autocorrelation(storage.path(spec.name, "train_autocorrelation"))
        queries = GradientStore(storage.path(spec.name, "query_gradients"))
        query = workflow.accumulate([workflow.document_rows(queries.array, queries.info)], queries.info["modules"])
        result = workflow.build_preconditioner(train, query, spec.scoring)
        out = storage.path(spec.name, "preconditioner")
        result.save(out)
        report = check_preconditioner(Preconditioner.load(out))
        yield dg.MaterializeResult(
            metadata={"n_train": train.n, "n_query": query.n,
                      "lambda": float(result.lam) if result.lam is not None else "off",
                      "damping": spec.scoring.damping, "modules": len(result.layout), "dims": result.dims,
                      "path": dg.MetadataValue.path(str(out)), "seconds": timer.seconds},
            data_version=dg.DataVersion(workflow.digest_files(out)))
        yield dg.AssetCheckResult(asset_key=precond_key, check_name="positive_definite", passed=report["ok"],
                                  metadata={"modules": dg.MetadataValue.json(report["modules"])})

    scores_key = key(spec, "scores")

    @dg.asset(key=scores_key, group_name=spec.name, partitions_def=shards_partitions(spec),
              deps=[train_source, key(spec, "query_gradients")] + ([precond_key] if spec.scoring.precondition else []),
              required_resource_keys=resources, code_version=score_version,
              pool="gpu" if streaming else None, automation_condition=rebuild_condition(),
              backfill_policy=dg.BackfillPolicy.single_run(),
              description="Long-format Parquet `query_id, doc_id, shard, score` (higher = supports the query).")
    def scores(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        queries = GradientStore(storage.path(spec.name, "query_gradients"))
        precond = Preconditioner.load(storage.path(spec.name, "preconditioner")) if spec.scoring.precondition \
            else None
        prepared = workflow.prepare(queries.array, queries.info, precond, spec.scoring)
        query_ids = workflow.score_query_ids(queries.doc_ids, spec.scoring.aggregate)
        shards = context.partition_keys
        if streaming:
            sources = streamed_blocks(context, shards)
        else:
            sources = ((s.array, s.info, s.doc_ids) for s in
                       (GradientStore(storage.path(spec.name, "train_gradients", shard)) for shard in shards))
        versions = {}
        for shard, (array, info, doc_ids) in zip(shards, sources):
            timer = Timer()
            if not streaming:
                check_compatible(info, queries)
            matrix = workflow.score_block(prepared, workflow.document_rows(array, info), precond, spec.scoring)
            out = storage.path(spec.name, "scores", shard)
            n = workflow.write_scores(out / "scores.parquet", matrix, query_ids, doc_ids, shard,
                                      spec.scoring.top_k)
            if info.get("per_token"):
                tokens = workflow.score_block(prepared, array, precond, spec.scoring)
                workflow.write_token_scores(out / "token_scores.parquet", tokens, query_ids, doc_ids, info, shard)
            versions[shard] = digest([matrix.tobytes()])
            context.add_asset_metadata(
                {"rows": n, "queries": len(query_ids), "documents": len(doc_ids),
                 "path": dg.MetadataValue.path(str(out / "scores.parquet")), "seconds": timer.seconds},
                partition_key=shard)
        single = next(iter(versions.values())) if len(versions) == 1 else None
        return dg.MaterializeResult(data_version=dg.DataVersion(single) if single else None)

    db_key = key(spec, "attribution_db")

    @dg.asset(key=db_key, group_name=spec.name, required_resource_keys={STORAGE},
              deps=[dg.AssetDep(scores_key, partition_mapping=ALL),
                    dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL), key(spec, "query_set")],
              code_version="duckdb-views-v1", automation_condition=rebuild_condition(on_deps_updated=False),
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

    return [train_autocorrelation, preconditioner, scores, attribution_db]
