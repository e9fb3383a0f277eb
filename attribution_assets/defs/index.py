"""The FAISS index asset (fan-in over every shard's training gradients)."""

import dataclasses

import dagster as dg
import numpy as np

from ..engine import workflow
from ..engine.index import FaissIndex, IndexConfig, IndexInfo, build_index, self_recall
from ..engine.preconditioners import Preconditioner
from ..engine.store import GradientStore
from ..spec import PipelineSpec
from .automation import rebuild_condition
from .common import COMPUTE, STORAGE, Timer, code_version, key, shards_partitions

MIN_SELF_RECALL = 0.9


def index_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    if not spec.index.enabled or spec.queries is None or spec.scoring.mode != "stored":
        return []
    index_key = key(spec, "faiss_index")
    calibrated = _calibrated(spec)
    deps = [dg.AssetDep(key(spec, "train_gradients"), partition_mapping=dg.AllPartitionMapping())]
    if calibrated:  # an `auto` nprobe / efSearch is measured on the pipeline's queries
        deps.append(key(spec, "query_gradients"))
    if spec.scoring.precondition:
        deps.append(key(spec, "preconditioner"))

    @dg.asset(key=index_key, group_name=spec.name, deps=deps, required_resource_keys={STORAGE, COMPUTE},
              code_version=code_version("faiss-index-v2", spec, "index", "gradients", "scoring"), pool="gpu",
              automation_condition=rebuild_condition(ignore=(key(spec, "train_gradients"),)),
              check_specs=[dg.AssetCheckSpec("self_recall", asset=index_key, blocking=False,
                                             description="sampled indexed rows find themselves in their top 10")],
              description="FAISS index of the training gradients as scores see them "
                          "(preconditioned and unit-normalized for cosine scores); an `auto` "
                          "nprobe / efSearch is calibrated on the pipeline's queries.")
    def faiss_index(context: dg.AssetExecutionContext):
        timer = Timer()
        storage = context.resources.storage
        shards = context.instance.get_dynamic_partitions(shards_partitions(spec).name)
        paths = [storage.path(spec.name, "train_gradients", s) for s in shards]
        precond = (Preconditioner.load(storage.path(spec.name, "preconditioner"))
                   if spec.scoring.precondition else None)
        idx = spec.index
        config = IndexConfig(factory=idx.factory, train_sample=idx.train_sample, nprobe=idx.nprobe,
                             hnsw_ef_search=idx.ef_search, target_recall=idx.target_recall,
                             max_vectors_per_index=idx.max_vectors_per_index,
                             use_gpu={"auto": "auto", "true": True, "false": False}[idx.use_gpu])
        out = storage.path(spec.name, "faiss_index")
        queries = (_calibration_queries(spec, storage.path(spec.name, "query_gradients"), precond, config)
                   if calibrated else None)
        info = build_index(lambda: workflow.index_blocks(paths, precond, spec.scoring), config, out,
                           calibration=queries)
        yield dg.MaterializeResult(
            metadata={"vectors": info.vectors, "dims": info.dims, "factory": info.factory, "parts": info.parts,
                      "bytes": info.bytes, "build_seconds": round(info.build_seconds, 3), "gpu": info.gpu,
                      **_search_metadata(info), "path": dg.MetadataValue.path(str(out)),
                      "seconds": timer.seconds},
            data_version=dg.DataVersion(f"{info.factory}-{info.vectors}-{workflow.digest_files(out)}"))
        yield _self_recall_check(spec, index_key, out, paths[0], precond)

    return [faiss_index]


def _calibrated(spec: PipelineSpec) -> bool:
    """Whether the index's search parameter is ``auto``: an IVF nprobe or an HNSW efSearch."""
    idx = spec.index
    return ("IVF" in idx.factory and idx.nprobe == "auto") or ("HNSW" in idx.factory and idx.ef_search == "auto")


def _calibration_queries(spec, path, precond, config: IndexConfig) -> np.ndarray:
    """Up to ``config.calibration_queries`` query rows (seeded sample) prepared as the Attributor
    searches them (one row per query), for calibrating an ``auto`` nprobe / efSearch."""
    store = GradientStore(path)
    rows = workflow.document_rows(store.array, store.info)
    if not len(rows):
        raise ValueError(f"{path} holds no query rows, but index.nprobe / index.ef_search `auto` is "
                         "calibrated on the pipeline's queries: add queries and re-materialize "
                         "query_gradients, or set the parameter to an integer")
    size = min(config.calibration_queries, len(rows))
    pick = np.sort(np.random.default_rng(config.seed).choice(len(rows), size, replace=False))
    return workflow.prepare(rows[pick], {"per_token": False}, precond,
                            dataclasses.replace(spec.scoring, aggregate="individual"))


def _search_metadata(info: IndexInfo) -> dict:
    """The saved search defaults and, when they were calibrated, how."""
    meta = {name: value for name, value in (("nprobe", info.nprobe), ("ef_search", info.hnsw_ef_search))
            if value is not None}
    if info.calibration:
        c = info.calibration
        meta |= {f"calibration_recall@{c['k']}": c["recall@k"], "calibration_lower_bound": c["lower_bound"],
                 "calibration_target": c["target_recall"], "calibration_reachable": c["reachable"],
                 "calibration_queries": f"{c['queries']} {c['source']}", "calibration_seconds": c["seconds"]}
    return meta


def _self_recall_check(spec, index_key, out, first_shard, precond) -> dg.AssetCheckResult:
    """Rows of the first shard searched against the index (cosine scores only: with inner
    products a row need not be its own nearest neighbour)."""
    if spec.scoring.metric != "cosine":
        return dg.AssetCheckResult(asset_key=index_key, check_name="self_recall", passed=True,
                                   metadata={"skipped": "inner-product scores"})
    ids, rows = next(iter(workflow.index_blocks([first_shard], precond, spec.scoring)))
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(ids), size=min(spec.index.self_recall_sample, len(ids)), replace=False))
    recall = self_recall(FaissIndex.load(out), rows[pick], [ids[i] for i in pick], k=10)
    return dg.AssetCheckResult(asset_key=index_key, check_name="self_recall", passed=recall >= MIN_SELF_RECALL,
                               metadata={"self_recall@10": recall, "sampled": len(pick),
                                         "threshold": MIN_SELF_RECALL})
