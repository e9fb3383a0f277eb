"""EK-FAC / K-FAC (``engine.preconditioning.curvature`` and ``.kfac``) for pipelines with ``scoring.preconditioner:
ekfac | kfac``: per-shard covariance sums, the merged factors, their eigendecomposition, the
per-shard eigenvalue correction (EK-FAC) and its merge, and the preconditioned query rows that
the score tables take. A new shard adds one covariance (and one correction) partition."""

from typing import TYPE_CHECKING

import dagster as dg

from attribution_assets.defs.automation import rebuild_condition
from attribution_assets.defs.common import (
    CONTENT_VERSION,
    Timer,
    compute_version,
    dir_bytes,
    key,
    path_metadata,
    shard_results,
    shards_partitions,
    size_metadata,
)
from attribution_assets.defs.gradients import (
    expected_rows,
    model_fingerprint,
    store_check_specs,
    store_checks,
)
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.engine.io import data
from attribution_assets.engine.io.digests import files_digest, json_digest
from attribution_assets.spec import PipelineSpec

if TYPE_CHECKING:
    from attribution_assets.engine.preconditioning.curvature import CurvatureCollector

ALL = dg.AllPartitionMapping()


def curvature_version(base: str, spec: PipelineSpec, in_space: bool = True) -> str:
    """Code version from what the curvature reads: model, data, module selection (biases), label
    settings and (``in_space``: past the covariance sums) the space and its projection; never the
    damping or the metric. Biases and label draws count only when not at their old values (no
    bias, one draw), so the versions of earlier pipelines stay as they were."""
    from attribution_assets.engine.preconditioning.kfac_files import projection_for

    g, s, n = spec.gradients, spec.scoring, spec.curvature.label_samples
    space = projection_for(g, s.kfac_space) if in_space else "covariance"
    return f"{base}-" + json_digest({"data": spec.section_hash("model", "demo", "corpus"),
                                     "include": list(g.include), "exclude": list(g.exclude),
                                     "labels": s.kfac_labels, "seed": s.kfac_seed, "space": space,
                                     **({"bias": True} if g.include_bias else {}),
                                     **({"label_samples": n} if n != 1 else {})}, length=12)


def curvature_collector(spec: PipelineSpec, storage: StorageResource,
                        compute: ComputeResource) -> "CurvatureCollector":
    from attribution_assets.engine.preconditioning.curvature import CurvatureCollector

    storage.ensure_writable()
    model, _ = compute.load_model(spec, storage.paths(spec))
    return CurvatureCollector.from_spec(model, spec)


def _pairs(docs: list[data.TokenizedDoc]) -> list[tuple[list[int], list[int]]]:
    return [(d.input_ids, d.loss_mask) for d in docs]


def _finite_check(asset_key: dg.AssetKey, what: str) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec("finite", asset=asset_key, blocking=True, description=f"every {what} is finite")


def _positive_check(asset_key: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec("positive_after_damping", asset=asset_key, blocking=True,
                             description="finite, and every curvature eigenvalue plus the damping is > 0")


def kfac_assets(spec: PipelineSpec, compute: ComputeResource) -> list[dg.AssetsDefinition]:
    """The EK-FAC / K-FAC assets (none unless ``scoring.preconditioner`` is ``ekfac`` / ``kfac``);
    those that run the model carry ``compute``'s precision in their code version."""
    if spec.queries is None or not spec.scoring.kronecker:
        return []
    ekfac = spec.scoring.preconditioner == "ekfac"
    cov_key, factors_key = key(spec, "kfac_covariance"), key(spec, "kfac_factors")
    eigen_key, corr_key = key(spec, "kfac_eigendecomposition"), key(spec, "ekfac_correction")
    values_key, query_key = key(spec, "ekfac_eigenvalues"), key(spec, "kfac_query_gradients")
    partitions = shards_partitions(spec)
    precision = compute_version(compute)
    model_deps = [key(spec, "model")] + ([key(spec, "finetune")] if spec.finetune is not None else [])

    @dg.asset(key=cov_key, group_name=spec.name, partitions_def=partitions,
              deps=[key(spec, "tokenized_shards"), *model_deps],
              code_version=curvature_version("kfac-covariance-v1", spec, in_space=False) + precision, pool="gpu",
              automation_condition=rebuild_condition(),
              check_specs=[_finite_check(cov_key, "covariance sum")],
              description="One shard's float64 sums of a a^T [I, I] and g g^T [O, O] per module over its "
                          "tokens (g: pseudo-gradients of sampled labels); shards add up.")
    def kfac_covariance(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource):
        paths = storage.paths(spec)
        collector = curvature_collector(spec, storage, compute)
        bad, shards = [], {}
        for shard in context.partition_keys:
            timer = Timer()
            sums = collector.covariance(_pairs(data.read_tokenized(paths.tokens(shard))))
            out = sums.save(paths.kfac_covariance(shard))
            bad += [f"{shard}: {name}" for name, ok in sums.finite().items() if not ok]
            shards[shard] = {"documents": sums.sequences, "tokens": max(sums.tokens.values()),
                             **size_metadata(dir_bytes(out)), "seconds": timer.seconds,
                             "peak_rss_mb": timer.peak_rss_mb, "path": path_metadata(out),
                             CONTENT_VERSION: files_digest(out)}
        yield from shard_results(context, cov_key, shards)
        yield dg.AssetCheckResult(asset_key=cov_key, check_name="finite", passed=not bad,
                                  metadata={"non_finite": ", ".join(bad) or "none"})

    @dg.asset(key=factors_key, group_name=spec.name, deps=[dg.AssetDep(cov_key, partition_mapping=ALL)],
              code_version=curvature_version("kfac-factors-v1", spec, in_space=False),
              automation_condition=rebuild_condition(on_deps_updated=False),
              check_specs=[_finite_check(factors_key, "factor")],
              description="Every shard's covariance sums added: A = E[a a^T], S = E[g g^T] over tokens; "
                          "rebuilt on schedule or on demand, not once per new shard.")
    def kfac_factors(context: dg.AssetExecutionContext, storage: StorageResource):
        from attribution_assets.engine.preconditioning.kfac import CovarianceSums, merge_all

        timer = Timer()
        paths = storage.paths(spec)
        shards = context.instance.get_dynamic_partitions(partitions.name)
        total = merge_all((CovarianceSums.load(paths.kfac_covariance(s)) for s in shards), "covariance shards")
        total.save(paths.kfac_factors)
        bad = [name for name, ok in total.finite().items() if not ok]
        yield dg.MaterializeResult(
            metadata={"shards": len(shards), "documents": total.sequences, "tokens": max(total.tokens.values()),
                      "modules": len(total.modules), **size_metadata(total.nbytes), "seconds": timer.seconds,
                      "path": path_metadata(paths.kfac_factors)},
            data_version=dg.DataVersion(files_digest(paths.kfac_factors)))
        yield dg.AssetCheckResult(asset_key=factors_key, check_name="finite", passed=not bad,
                                  metadata={"non_finite": ", ".join(bad) or "none"})

    @dg.asset(key=eigen_key, group_name=spec.name, deps=[factors_key],
              code_version=curvature_version("kfac-eigendecomposition-v1", spec),
              automation_condition=rebuild_condition(), check_specs=[_positive_check(eigen_key)],
              description="float64 eigendecomposition of A and S per module (the Kronecker eigenbasis), "
                          "or of R A R^T and L S L^T in the projected space; the check damps K-FAC's "
                          "eigenvalues T outer(e_S, e_A).")
    def kfac_eigendecomposition(storage: StorageResource):
        from attribution_assets.engine.preconditioning.kfac import (
            CovarianceSums,
            KroneckerEigen,
            KroneckerPreconditioner,
        )
        from attribution_assets.engine.preconditioning.kfac_files import projection_for

        timer = Timer()
        paths = storage.paths(spec)
        projection = projection_for(spec.gradients, spec.scoring.kfac_space)
        eigen = KroneckerEigen.from_covariance(CovarianceSums.load(paths.kfac_factors), projection)
        eigen.save(paths.kfac_eigendecomposition)
        report, check = eigen.report(), KroneckerPreconditioner(eigen, None, spec.scoring.damping).report()
        conditions = [v[k] for v in report.values() for k in ("condition_A", "condition_S") if v[k] is not None]
        yield dg.MaterializeResult(
            metadata={"modules": len(eigen.modules), "space": spec.scoring.kfac_space,
                      "projection": dg.MetadataValue.json(projection or {}), **size_metadata(eigen.nbytes),
                      "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb,
                      "max_condition_number": max(conditions) if conditions else None,
                      "per_module": dg.MetadataValue.json(report), "path": path_metadata(paths.kfac_eigendecomposition)},
            data_version=dg.DataVersion(files_digest(paths.kfac_eigendecomposition)))
        yield dg.AssetCheckResult(asset_key=eigen_key, check_name="positive_after_damping", passed=check["ok"],
                                  metadata={"modules": dg.MetadataValue.json(check["modules"])})

    assets = [kfac_covariance, kfac_factors, kfac_eigendecomposition]
    if ekfac:
        @dg.asset(key=corr_key, group_name=spec.name, partitions_def=partitions,
                  deps=[key(spec, "tokenized_shards"), *model_deps, eigen_key],
                  code_version=curvature_version("ekfac-correction-v1", spec) + precision, pool="gpu",
                  automation_condition=rebuild_condition(),
                  check_specs=[_finite_check(corr_key, "eigenvalue-correction sum")],
                  description="One shard's EK-FAC sums of (Q_S^T G Q_A)^2 per module, G the weight gradient "
                              "of one document's pseudo-loss (projected, L G R^T, in the projected space); "
                              "recomputed for every shard when the eigenbasis changes.")
        def ekfac_correction(context: dg.AssetExecutionContext, storage: StorageResource,
                             compute: ComputeResource):
            from attribution_assets.engine.preconditioning.kfac import KroneckerEigen

            paths = storage.paths(spec)
            collector = curvature_collector(spec, storage, compute)
            eigen = KroneckerEigen.load(paths.kfac_eigendecomposition)
            bad, shards = [], {}
            for shard in context.partition_keys:
                timer = Timer()
                sums = collector.correction(_pairs(data.read_tokenized(paths.tokens(shard))), eigen)
                out = sums.save(paths.ekfac_correction(shard))
                bad += [f"{shard}: {name}" for name, ok in sums.finite().items() if not ok]
                shards[shard] = {"documents": sums.sequences, **size_metadata(dir_bytes(out)),
                                 "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb,
                                 "path": path_metadata(out), CONTENT_VERSION: files_digest(out)}
            yield from shard_results(context, corr_key, shards)
            yield dg.AssetCheckResult(asset_key=corr_key, check_name="finite", passed=not bad,
                                      metadata={"non_finite": ", ".join(bad) or "none"})

        @dg.asset(key=values_key, group_name=spec.name,
                  deps=[dg.AssetDep(corr_key, partition_mapping=ALL), eigen_key],
                  code_version=curvature_version("ekfac-eigenvalues-v1", spec),
                  automation_condition=rebuild_condition(ignore=(eigen_key,)),
                  check_specs=[_positive_check(values_key)],
                  description="EK-FAC's eigenvalues: every shard's correction sums added, divided by the "
                              "documents (all shards must share the current eigenbasis).")
        def ekfac_eigenvalues(context: dg.AssetExecutionContext, storage: StorageResource):
            from attribution_assets.engine.preconditioning.kfac import (
                CorrectionSums,
                KroneckerEigen,
                KroneckerPreconditioner,
                merge_all,
            )

            timer = Timer()
            paths = storage.paths(spec)
            shards = context.instance.get_dynamic_partitions(partitions.name)
            total = merge_all((CorrectionSums.load(paths.ekfac_correction(s)) for s in shards),
                              "eigenvalue-correction shards")
            eigen = KroneckerEigen.load(paths.kfac_eigendecomposition)
            check = KroneckerPreconditioner(eigen, total, spec.scoring.damping).report()  # raises if stale
            total.save(paths.ekfac_eigenvalues)
            conditions = [v["damped_condition"] for v in check["modules"].values() if v["damped_condition"]]
            yield dg.MaterializeResult(
                metadata={"shards": len(shards), "documents": total.sequences, **size_metadata(total.nbytes),
                          "max_damped_condition_number": max(conditions) if conditions else None,
                          "seconds": timer.seconds, "path": path_metadata(paths.ekfac_eigenvalues)},
                data_version=dg.DataVersion(files_digest(paths.ekfac_eigenvalues)))
            yield dg.AssetCheckResult(asset_key=values_key, check_name="positive_after_damping",
                                      passed=check["ok"], metadata={"modules": dg.MetadataValue.json(check["modules"])})

        assets += [ekfac_correction, ekfac_eigenvalues]

    @dg.asset(key=query_key, group_name=spec.name,
              deps=[key(spec, "tokenized_queries"), *model_deps, values_key if ekfac else eigen_key],
              code_version=curvature_version("kfac-query-gradients-v1", spec) + "-"
              + spec.section_hash("gradients", "scoring") + precision, pool="gpu",
              check_specs=[*store_check_specs(query_key), _positive_check(query_key)],
              automation_condition=rebuild_condition(),
              description=f"Query rows preconditioned with {spec.scoring.preconditioner.upper()} (damped "
                          "inverse in the Kronecker eigenbasis, in the projected space or on each full "
                          "gradient before projecting): what the score tables score against.")
    def kfac_query_gradients(storage: StorageResource, compute: ComputeResource):
        from attribution_assets.engine.gradients.collect import collect_shard
        from attribution_assets.engine.scoring.run import query_collector

        timer = Timer()
        paths = storage.paths(spec)
        storage.ensure_writable()
        model, _ = compute.load_model(spec, paths)
        collector = query_collector(model, spec, paths, autocast=compute.autocast_dtype())
        docs = data.read_tokenized(paths.query_tokens)
        store, stats = collect_shard(collector, docs, paths.kfac_query_gradients, model_fingerprint(spec, paths))
        check = collector.transform.report()
        yield dg.MaterializeResult(
            metadata={**stats.as_metadata(), "preconditioner": spec.scoring.preconditioner,
                      "damping": spec.scoring.damping, "preconditioner_bytes": collector.transform.nbytes,
                      **size_metadata(dir_bytes(paths.kfac_query_gradients)),
                      "path": path_metadata(paths.kfac_query_gradients), "total_seconds": timer.seconds,
                      "peak_rss_mb": timer.peak_rss_mb},
            data_version=dg.DataVersion(store.digest()))
        yield from store_checks(store, expected_rows(docs, spec), spec, query_key)
        yield dg.AssetCheckResult(asset_key=query_key, check_name="positive_after_damping", passed=check["ok"],
                                  metadata={"modules": dg.MetadataValue.json(check["modules"])})

    return [*assets, kfac_query_gradients]
