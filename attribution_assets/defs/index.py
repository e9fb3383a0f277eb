"""The FAISS index asset (fan-in over every shard's training gradients)."""

from typing import TYPE_CHECKING

import dagster as dg
import numpy as np

from attribution_assets.defs.automation import rebuild_condition
from attribution_assets.defs.common import (
    Timer,
    code_version,
    key,
    path_metadata,
    shards_partitions,
    size_metadata,
)
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.engine.explain import plots
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io.digests import files_digest
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import PipelineSpec

if TYPE_CHECKING:
    from attribution_assets.engine.search.build import IndexInfo

MIN_SELF_RECALL = 0.9
CALIBRATION_QUERIES = 256


def index_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    if not spec.index.enabled or spec.queries is None or spec.scoring.mode != "stored":
        return []
    index_key = key(spec, "faiss_index")
    calibrated = _calibrated(spec)
    deps = [dg.AssetDep(key(spec, "train_gradients"), partition_mapping=dg.AllPartitionMapping())]
    if calibrated:  # an `auto` nprobe / efSearch is measured on the pipeline's queries
        deps.append(key(spec, "kfac_query_gradients" if spec.scoring.kronecker else "query_gradients"))
    if spec.scoring.preconditioner == "trackstar":
        deps.append(key(spec, "preconditioner"))

    @dg.asset(key=index_key, group_name=spec.name, deps=deps,
              code_version=code_version("faiss-index-v2", spec, "index", "gradients", "scoring"), pool="gpu",
              automation_condition=rebuild_condition(ignore=(key(spec, "train_gradients"),)),
              check_specs=[dg.AssetCheckSpec("self_recall", asset=index_key, blocking=False,
                                             description="sampled indexed rows find themselves in their top 10")],
              description="FAISS index of the training gradients as scores see them "
                          "(preconditioned and unit-normalized for cosine scores); an `auto` "
                          "nprobe / efSearch is calibrated on the pipeline's queries.")
    def faiss_index(context: dg.AssetExecutionContext, storage: StorageResource, compute: ComputeResource):
        from attribution_assets.engine.scoring.run import (
            load_preconditioner,
            prepared_training_blocks,
        )
        from attribution_assets.engine.search.build import build_index  # FAISS

        timer = Timer()
        paths = storage.paths(spec)
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        precond = load_preconditioner(spec, paths)
        queries = calibration_queries(spec, paths, precond) if calibrated else None
        info = build_index(lambda: prepared_training_blocks(paths, shards, precond, spec.scoring.metric),
                           spec.index, paths.faiss_index, calibration=queries,
                           calibration_queries=CALIBRATION_QUERIES)
        yield dg.MaterializeResult(
            metadata={"vectors": info.vectors, "dims": info.dims, "factory": info.factory, "parts": info.parts,
                      **size_metadata(info.bytes), "build_seconds": round(info.build_seconds, 3), "gpu": info.gpu,
                      **_search_metadata(info), **_recall_figure(info, paths), "path": path_metadata(paths.faiss_index),
                      "seconds": timer.seconds, "peak_rss_mb": timer.peak_rss_mb},
            data_version=dg.DataVersion(f"{info.factory}-{info.vectors}-{files_digest(paths.faiss_index)}"))
        yield _self_recall_check(spec, index_key, paths, shards[0], precond)

    return [faiss_index]


def _calibrated(spec: PipelineSpec) -> bool:
    """Whether the index's search parameter is ``auto``: an IVF nprobe or an HNSW efSearch."""
    idx = spec.index
    return ("IVF" in idx.factory and idx.nprobe == "auto") or ("HNSW" in idx.factory and idx.ef_search == "auto")


def calibration_queries(spec: PipelineSpec, paths: PipelinePaths, precond) -> np.ndarray:
    """Up to ``CALIBRATION_QUERIES`` query rows (seeded sample) prepared as the Attributor
    searches them (one row per query), for calibrating an ``auto`` nprobe / efSearch."""
    from attribution_assets.engine.scoring.run import QueryScorer, query_rows_path

    path = query_rows_path(spec, paths)
    rows = GradientStore(path).document_rows()
    if not len(rows):
        raise ValueError(f"{path} holds no query rows, but index.nprobe / index.ef_search "
                         "`auto` is calibrated on the pipeline's queries: add queries and re-materialize "
                         "query_gradients, or set the parameter to an integer")
    size = min(CALIBRATION_QUERIES, len(rows))
    pick = np.sort(np.random.default_rng(0).choice(len(rows), size, replace=False))
    return QueryScorer(rows[pick], None, precond, spec.scoring, aggregate="individual").prepared


def _search_metadata(info: "IndexInfo") -> dict:
    """The saved search defaults and, when they were calibrated, how."""
    meta = {name: value for name, value in (("nprobe", info.nprobe), ("ef_search", info.hnsw_ef_search))
            if value is not None}
    if info.calibration:
        c = info.calibration
        meta |= {f"calibration_recall@{c['k']}": round(c["recall@k"], 4),
                 "calibration_lower_bound": round(c["lower_bound"], 4),
                 "calibration_target": c["target_recall"], "calibration_reachable": c["reachable"],
                 "calibration_queries": f"{c['queries']} {c['source']}", "calibration_seconds": round(c["seconds"], 3)}
    return meta


def _recall_figure(info: "IndexInfo", paths: PipelinePaths) -> dict:
    """Recall against nprobe / efSearch from the calibration, as a picture (calibrated only)."""
    if not info.calibration or not info.calibration.get("curve"):
        return {}
    c, ivf = info.calibration, info.nprobe is not None and "IVF" in info.factory
    path = plots.recall_plot(c["curve"], paths.figure("index_recall"), parameter="nprobe" if ivf else "ef_search",
                             k=c["k"], target=c["target_recall"], chosen=info.nprobe if ivf else info.hnsw_ef_search)
    return {"calibration_recall_curve": dg.MetadataValue.md(plots.png_markdown(path, "recall against the "
                                                                                  "search parameter"))}


def _self_recall_check(spec: PipelineSpec, index_key: dg.AssetKey, paths: PipelinePaths, first_shard: str,
                       precond) -> dg.AssetCheckResult:
    """Rows of the first shard searched against the index (cosine scores only: with inner
    products a row need not be its own nearest neighbour)."""
    from attribution_assets.engine.scoring.run import prepared_training_blocks
    from attribution_assets.engine.search.index import FaissIndex, self_recall

    if spec.scoring.metric != "cosine":
        return dg.AssetCheckResult(asset_key=index_key, check_name="self_recall", passed=True,
                                   metadata={"skipped": "inner-product scores"})
    ids, rows = next(prepared_training_blocks(paths, [first_shard], precond, spec.scoring.metric))
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ids), size=min(spec.index.self_recall_sample, len(ids)), replace=False))
    recall = self_recall(FaissIndex.load(paths.faiss_index), rows[pick], [ids[i] for i in pick], k=10)
    return dg.AssetCheckResult(asset_key=index_key, check_name="self_recall", passed=recall >= MIN_SELF_RECALL,
                               metadata={"self_recall@10": recall, "sampled": len(pick),
                                         "threshold": MIN_SELF_RECALL})
