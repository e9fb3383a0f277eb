"""TrackStar's autocorrelation and preconditioner (fan-in), per-shard score tables, the DuckDB
views. With ``scoring.preconditioner: ekfac | kfac`` the scores take the preconditioned query
rows of ``defs/kfac.py`` instead, and the TrackStar assets are not declared."""

import dagster as dg

from attribution_assets.defs.automation import rebuild_condition
from attribution_assets.defs.common import (
    CONTENT_VERSION,
    Timer,
    code_version,
    compute_version,
    key,
    path_metadata,
    progress_logs,
    shard_results,
    shards_partitions,
)
from attribution_assets.defs.gradients import pipeline_collector
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.engine.explain import plots
from attribution_assets.engine.explain.overview import (
    overview_histogram,
    pipeline_overview,
    samples_markdown,
    summary_markdown,
)
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.atomic import write_text_atomic
from attribution_assets.engine.io.digests import files_digest, json_digest
from attribution_assets.engine.progress import tracked
from attribution_assets.engine.scoring import database
from attribution_assets.spec import PipelineSpec

ALL = dg.AllPartitionMapping()
SAMPLE_QUERIES, SAMPLE_K = 3, 5  # sample explanations attached to `scores`: queries, documents each


def heat_maps_markdown(explanations, paths) -> str:
    """Each explanation's heat map as an inline picture (``plots.explanation_picture``): what
    the UI shows of the HTML page."""
    out = []
    for i, expl in enumerate(explanations):
        figure = plots.explanation_picture(expl, paths.figure(f"explanation_{i}"))
        out += [f"Query `{expl.query_id}`", "", plots.png_markdown(figure, f"heat map of {expl.query_id}"), ""]
    return "\n".join(out)


def score_assets(spec: PipelineSpec, compute: ComputeResource) -> list[dg.AssetsDefinition]:
    if spec.queries is None:
        return []
    streaming = spec.scoring.mode == "streaming"
    model_version = compute_version(compute) if streaming else ""  # streamed rows come from the model
    train_source = key(spec, "tokenized_shards") if streaming else key(spec, "train_gradients")
    precond_key = key(spec, "preconditioner")
    autocorr_key = key(spec, "autocorrelation")
    shard_autocorr_key = key(spec, "shard_autocorr")

    @dg.asset(key=shard_autocorr_key, group_name=spec.name, partitions_def=shards_partitions(spec),
              deps=[train_source],
              code_version=code_version("shard-autocorrelation-v1", spec, "model", "demo", "corpus", "gradients")
              + model_version,
              pool="gpu" if streaming else None, automation_condition=rebuild_condition(),
              description="One shard's per-module sums S = sum g g^T of its document rows and their count: "
                          "a new shard adds its block, the merge never recomputes the others.")
    def shard_autocorr(context: dg.AssetExecutionContext, storage: StorageResource,
                              compute: ComputeResource):
        from attribution_assets.engine.gradients.collect import training_rows  # torch
        from attribution_assets.engine.preconditioning.autocorrelation import (
            save_accumulator,
            shard_accumulator,
        )

        paths = storage.paths(spec)
        rows = training_rows(spec, paths, context.partition_keys,
                             collector=lambda: pipeline_collector(spec, storage, compute))
        shards = {}
        with progress_logs(context):
            for shard_rows in tracked(rows, "autocorrelation", len(context.partition_keys), "shards"):
                timer = Timer()
                accumulator = shard_accumulator(shard_rows)
                out = paths.shard_autocorr(shard_rows.shard)
                save_accumulator(out, accumulator)
                shards[shard_rows.shard] = {
                    "rows": accumulator.n, "modules": len(accumulator.layout), "path": path_metadata(out),
                    "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb, CONTENT_VERSION: files_digest(out)}
        yield from shard_results(context, shard_autocorr_key, shards)

    @dg.asset(key=autocorr_key, group_name=spec.name,
              deps=[dg.AssetDep(shard_autocorr_key, partition_mapping=ALL)],
              code_version=code_version("autocorrelation-v2", spec, "model", "demo", "corpus", "gradients")
              + model_version,
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Per-module autocorrelation (1/n) sum g g^T of the training gradients: the merge "
                          "of every shard's sums (cheap: no gradient rows are read).")
    def autocorrelation(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.preconditioning.autocorrelation import (
            merge_accumulators,
            save_autocorrelation,
        )

        timer = Timer()
        paths = storage.paths(spec)
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        missing = [s for s in shards if not paths.shard_autocorr(s).exists()]
        if missing:
            raise FileNotFoundError(f"No shard autocorrelation for {missing[:4]} of pipeline {spec.name!r}; "
                                    f"materialize {spec.name}/shard_autocorr for those shards first.")
        train = merge_accumulators([paths.shard_autocorr(s) for s in shards])
        save_autocorrelation(paths.autocorrelation, train)
        return dg.MaterializeResult(
            metadata={"shards": len(shards), "n_train": train.n, "modules": len(train.layout),
                      "path": path_metadata(paths.autocorrelation), "seconds": timer.seconds,
                      "peak_rss_mb": timer.peak_rss_mb},
            data_version=dg.DataVersion(files_digest(paths.autocorrelation)))

    @dg.asset(key=precond_key, group_name=spec.name, deps=[autocorr_key, key(spec, "query_gradients")],
              code_version=code_version("preconditioner-v2", spec, "gradients", "scoring"),
              automation_condition=rebuild_condition(),
              check_specs=[dg.AssetCheckSpec("positive_definite", asset=precond_key, blocking=True,
                                             description="symmetric, finite, positive definite after damping")],
              description="TrackStar preconditioner: lambda R_query + (1 - lambda) R_train per module, "
                          "damped, float64 eigendecomposition.")
    def preconditioner(storage: StorageResource, compute: ComputeResource):
        from attribution_assets.engine.preconditioning.autocorrelation import (
            load_autocorrelation,
            row_autocorrelation,
        )
        from attribution_assets.engine.preconditioning.preconditioners import (
            Preconditioner,
            check_preconditioner,
            trackstar_preconditioner,
        )

        timer = Timer()
        paths = storage.paths(spec)
        train = load_autocorrelation(paths.autocorrelation)
        queries = GradientStore(paths.query_gradients)
        query = row_autocorrelation(queries.document_rows(), queries.info["modules"])
        result = trackstar_preconditioner(train, query, spec.scoring, full_text=spec.full_text_queries)
        result.save(paths.preconditioner)
        del result  # the check reads the saved preconditioner one module at a time
        saved = Preconditioner.load(paths.preconditioner)
        report = check_preconditioner(saved)
        mixed = saved.lam is not None
        figure = plots.spectrum_plot(saved.eigvals, {m.name: saved.damping_shift(m.name) for m in saved.layout},
                                     paths.figure("preconditioner_spectrum"),
                                     train=train.spectrum() if mixed else None,
                                     query=query.spectrum() if mixed else None,
                                     lam=saved.lam, top_k=saved.auto_top_k)
        del query
        yield dg.MaterializeResult(
            metadata={"n_train": train.n, "n_query": saved.n_query,
                      "lambda": round(float(saved.lam), 4) if saved.lam is not None else "off",
                      "damping": spec.scoring.damping, "modules": len(saved.layout), "dims": saved.dims,
                      "path": path_metadata(paths.preconditioner), "seconds": timer.seconds,
                      "peak_rss_mb": timer.peak_rss_mb,
                      "spectrum": dg.MetadataValue.md(plots.png_markdown(figure, "eigenvalue spectrum"))},
            data_version=dg.DataVersion(files_digest(paths.preconditioner)))
        yield dg.AssetCheckResult(asset_key=precond_key, check_name="positive_definite", passed=report["ok"],
                                  metadata={"modules": dg.MetadataValue.json(report["modules"])})

    scores_key = key(spec, "scores")
    kronecker = spec.scoring.kronecker
    query_rows = key(spec, "kfac_query_gradients" if kronecker else "query_gradients")
    trackstar = spec.scoring.preconditioner == "trackstar"

    @dg.asset(key=scores_key, group_name=spec.name, partitions_def=shards_partitions(spec),
              deps=[train_source, query_rows] + ([precond_key] if trackstar else []),
              code_version=code_version("scores-v1", spec, "gradients", "scoring") + model_version,
              pool="gpu" if streaming else None, automation_condition=rebuild_condition(),
              description="Long-format Parquet `query_id, doc_id, shard, score` (higher = supports the query); "
                          "with scoring.breakdown, also each module's or head's contribution.")
    def scores(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource):
        import polars as pl

        from attribution_assets.engine.explain.render import explanation_html, explanation_markdown
        from attribution_assets.engine.explain.tokens import explain_samples
        from attribution_assets.engine.gradients.collect import training_rows
        from attribution_assets.engine.scoring.run import QueryScorer

        timer = Timer()
        paths = storage.paths(spec)
        scorer = QueryScorer.for_pipeline(spec, paths)
        loaded = []  # the model, loaded once for streamed rows and the sample explanations

        def model_and_tokenizer():
            if not loaded:
                loaded.append(compute.load_model(spec, paths))
            return loaded[0]

        rows = training_rows(spec, paths, context.partition_keys, reference=scorer.query_info,
                             collector=lambda: pipeline_collector(spec, storage, compute,
                                                                  model_and_tokenizer()[0]))
        shards = {}
        with progress_logs(context):
            results = tracked(scorer.score_shards(rows, paths, spec.scoring.top_k), "scores",
                              len(context.partition_keys), "shards")
            for result in results:
                breakdown = {"block_rows": result.block_rows} if spec.scoring.breakdown != "none" else {}
                histogram = plots.score_histogram(pl.read_parquet(result.path, columns=["score"])["score"].to_numpy(),
                                                  paths.score_histogram(result.shard),
                                                  f"{spec.name} {result.shard} (all shards: {spec.name}/overview)")
                shards[result.shard] = {
                    "rows": result.rows, "queries": result.queries, "documents": result.documents,
                    "path": path_metadata(result.path), "seconds": result.seconds, CONTENT_VERSION: result.version,
                    "score_histogram": dg.MetadataValue.md(plots.png_markdown(histogram, "score distribution")),
                    **breakdown}
            samples = []
            if spec.scoring.aggregate == "individual" and spec.scoring.train_rows == "post_hoc":
                model, tokenizer = model_and_tokenizer()
                samples = explain_samples(spec, paths, model, tokenizer, SAMPLE_QUERIES, SAMPLE_K)
        if samples:
            write_text_atomic(paths.explanations, explanation_html(samples))
            explained = {"explanations": dg.MetadataValue.md(explanation_markdown(samples, str(paths.explanations))),
                         "heat_maps": dg.MetadataValue.md(heat_maps_markdown(samples, paths)),
                         "explanations_path": path_metadata(paths.explanations)}
        else:
            explained = {"explanations": (
                f"none: scores rank the `{spec.scoring.aggregate}` aggregate of the queries, not single queries"
                if spec.scoring.aggregate != "individual" else
                "none: scores use train-time rows, which are not sums of the final model's token rows")}
        yield from shard_results(context, scores_key, shards, metadata={
            "step_seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb, **explained})

    db_key = key(spec, "attribution_db")

    @dg.asset(key=db_key, group_name=spec.name,
              deps=[dg.AssetDep(scores_key, partition_mapping=ALL),
                    dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL), key(spec, "query_set")],
              code_version="duckdb-views-v2-" + json_digest(  # only what changes the views themselves
                  {"token_rows": spec.gradients.token_rows, "breakdown": spec.scoring.breakdown}, length=12),
              automation_condition=rebuild_condition(on_deps_updated=False),
              check_specs=[dg.AssetCheckSpec("schema", asset=db_key, blocking=False,
                                             description="views answer with the documented columns")],
              description="DuckDB file of views (scores, documents, queries, top_influences; with a breakdown "
                          "module_scores, layer_scores, head_scores, top_heads) over the Parquet files.")
    def attribution_db(storage: StorageResource):
        from attribution_assets.engine.scoring.tables import SCORE_COLUMNS  # polars

        paths = storage.paths(spec)
        path = database.build_database(paths, with_token_scores=spec.gradients.token_rows,
                                       breakdown=spec.scoring.breakdown)
        columns = database.view_columns(path)
        wanted = database.BREAKDOWN_VIEWS[spec.scoring.breakdown]
        yield dg.MaterializeResult(
            metadata={"path": path_metadata(path), "views": dg.MetadataValue.json(columns),
                      "example": dg.MetadataValue.md(f"```sql\n{database.TOP_K_SQL.strip()}\n```")})
        yield dg.AssetCheckResult(asset_key=db_key, check_name="schema",
                                  passed=columns.get("scores") == SCORE_COLUMNS
                                  and all(view in columns for view in wanted))

    overview_key = key(spec, "overview")

    @dg.asset(key=overview_key, group_name=spec.name,
              deps=[db_key, dg.AssetDep(scores_key, partition_mapping=ALL), key(spec, "query_set")],
              code_version="overview-v1", automation_condition=rebuild_condition(on_deps_updated=False),
              description="The pipeline at a glance (SQL over the score tables, seconds): recall@k and MRR "
                          "where queries know their gold documents; every score on a log-count histogram with "
                          "percentiles (is a score of 0.09 high?); sample queries, failures included, with "
                          "their top documents and the rank of their first gold document.")
    def overview(storage: StorageResource) -> dg.MaterializeResult:
        timer = Timer()
        paths = storage.paths(spec)
        result = pipeline_overview(paths.database, per_query=spec.scoring.aggregate == "individual")
        figure = overview_histogram(result, paths.figure("overview_histogram"), f"{spec.name}: every score")
        figures = {name: round(value, 4) for name, value in result.fact_tracing.items()}
        return dg.MaterializeResult(metadata={
            "summary": dg.MetadataValue.md(summary_markdown(result)),
            "score_histogram": dg.MetadataValue.md(plots.png_markdown(figure, "every score of the pipeline")),
            "samples": dg.MetadataValue.md(samples_markdown(result)),
            "queries": result.queries, "scores": result.scores, "queries_with_gold": result.gold_queries,
            **{f"score_p{q:g}": round(v, 4) for q, v in result.percentiles.items()}, **figures,
            "seconds": timer.seconds})

    fan_in = [] if kronecker else [shard_autocorr, autocorrelation, preconditioner]
    return [*fan_in, scores, attribution_db, overview]
