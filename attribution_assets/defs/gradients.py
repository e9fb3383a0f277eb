"""Per-shard training gradients and query gradients (the engine's collector, called thinly)."""

import json
import sys

import dagster as dg

from attribution_assets.defs.automation import rebuild_condition
from attribution_assets.defs.common import (
    CONTENT_VERSION,
    Timer,
    code_version,
    compute_version,
    dir_bytes,
    key,
    path_metadata,
    progress_logs,
    shard_results,
    shards_partitions,
    size_metadata,
)
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import FORCE_TAG
from attribution_assets.engine.gradients.store import GradientStore, write_store
from attribution_assets.engine.io import data
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import PipelineSpec, spec_to_json

CHECKS = ("finite", "row_count", "settings")


def model_fingerprint(spec: PipelineSpec, paths: PipelinePaths) -> str:
    if spec.finetune is not None:  # gradients come from the fine-tuned model
        if not paths.finetune_record.exists():
            raise FileNotFoundError(f"{paths.finetune_record} does not exist; materialize {spec.name}/finetune first.")
        return json.loads(paths.finetune_record.read_text())["fingerprint"]
    if not paths.model_record.exists():
        raise FileNotFoundError(f"{paths.model_record} does not exist; materialize {spec.name}/model first.")
    return json.loads(paths.model_record.read_text())["fingerprint"]


def pipeline_collector(spec: PipelineSpec, storage: StorageResource, compute: ComputeResource, model=None):
    """The pipeline's collector on the compute resource's device (loads the model unless given
    the one ``compute.load_model`` returned)."""
    from attribution_assets.engine.gradients.collect import make_collector  # torch, transformers

    storage.ensure_writable()
    paths = storage.paths(spec)
    if model is None:
        model, _ = compute.load_model(spec, paths)
    return make_collector(model, spec, paths, autocast=compute.autocast_dtype())


def torchrun_collect_shards(context: dg.AssetExecutionContext, spec: PipelineSpec, storage: StorageResource,
                            compute: ComputeResource, shards: list[str], fingerprint: str,
                            producer: str) -> dict[str, dict]:
    """Collect ``shards`` with ONE torchrun group of ``compute.ranks`` ranks launched through Dagster
    Pipes (``compute.torchrun_args``: standalone or a c10d rendezvous): each rank loads the model
    once and serves every shard, rank 0 writes each store and reports it (a log line and a custom
    message per shard) as it goes. Returns each shard's report. Raises
    (``DagsterPipesExecutionError``, with the ranks' output) if any rank fails; the shards reported
    before stay written, complete, and a rerun reuses them."""
    if not shards:
        return {}
    root = storage.ensure_writable()
    job = {"spec": spec_to_json(spec), "storage_root": str(root), "shards": list(shards),
           "fingerprint": fingerprint, "producer": producer, "device": compute.device,
           "precision": compute.precision, "autocast": compute.autocast, "threads": compute.threads,
           "fsdp": compute.fsdp}
    command = [sys.executable, "-m", "torch.distributed.run", *compute.torchrun_args(context.run_id),
               "-m", "attribution_assets.defs.torchrun_ranks"]
    invocation = dg.PipesSubprocessClient().run(
        command=command, context=context, extras={"job": job},
        env={"ATTRIBUTION_DEVICE": compute.device, "OMP_NUM_THREADS": str(max(compute.threads, 1))})
    reports = {m["shard"]: m for m in invocation.get_custom_messages()}
    missing = [s for s in shards if s not in reports]
    if missing:
        raise RuntimeError(f"torchrun exited without reporting the stores of {', '.join(missing)}.")
    return reports


def store_checks(store: GradientStore, expected_rows: int, spec: PipelineSpec,
                 asset_key: dg.AssetKey) -> list[dg.AssetCheckResult]:
    """Re-read what was written: finite values, expected rows, the pipeline's settings."""
    from attribution_assets.engine.gradients.store import rows_hash

    finite = store.all_finite()
    normalizer = store.info.get("normalizer")
    settings_ok = ((normalizer or {}).get("kind", "none") == spec.gradients.normalizer
                   and store.info.get("config_hash") == rows_hash(spec.gradients, normalizer))
    return [
        dg.AssetCheckResult(asset_key=asset_key, check_name="finite", passed=finite,
                            metadata={"path": str(store.path / "gradients.npy")}),
        dg.AssetCheckResult(asset_key=asset_key, check_name="row_count", passed=store.rows == expected_rows,
                            metadata={"rows": store.rows, "expected": expected_rows}),
        dg.AssetCheckResult(asset_key=asset_key, check_name="settings", passed=settings_ok,
                            metadata={"config_hash": store.info.get("config_hash", "")}),
    ]


def store_check_specs(asset_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    descriptions = {"finite": "every gradient value is finite",
                    "row_count": "one row per document (or per target token)",
                    "settings": "projection and normalizer match the pipeline spec"}
    return [dg.AssetCheckSpec(name, asset=asset_key, blocking=True, description=descriptions[name])
            for name in CHECKS]


def expected_rows(docs: list[data.TokenizedDoc], spec: PipelineSpec) -> int:
    from attribution_assets.engine.gradients.batching import row_positions

    if not spec.gradients.token_rows:
        return len(docs)
    return sum(len(row_positions(d.loss_mask, spec.gradients.per_token)) for d in docs)


def gradient_assets(spec: PipelineSpec, compute: ComputeResource) -> list[dg.AssetsDefinition]:
    version = code_version("gradients-v1", spec, "gradients") + compute_version(compute)
    train_time = spec.scoring.train_rows == "train_time"
    model_deps = [key(spec, "model")] + ([key(spec, "finetune")] if spec.finetune is not None else [])
    assets = []

    if spec.scoring.mode == "stored":
        train_key = key(spec, "train_gradients")

        @dg.asset(key=train_key, group_name=spec.name, partitions_def=shards_partitions(spec),
                  deps=[key(spec, "tokenized_shards"), *model_deps],
                  code_version=version + ("-train-time" if train_time else ""), pool="gpu",
                  check_specs=store_check_specs(train_key),
                  automation_condition=rebuild_condition(),
                  description="Per-document (or per-token) projected gradients of one shard: .npy + info.json. "
                              "A run over several shards loads the model once.")
        def train_gradients(context: dg.AssetExecutionContext, storage: StorageResource,
                            compute: ComputeResource):
            from attribution_assets.engine.gradients.collect import collect_shard, reusable_store
            from attribution_assets.engine.training.stored_rows import (
                train_time_document_rows,
                train_time_stores,
            )

            paths = storage.paths(spec)
            collector = None
            fingerprint = model_fingerprint(spec, paths)
            force = context.run.tags.get(FORCE_TAG) == "true"
            checks: dict[str, list] = {name: [] for name in CHECKS}
            shards = {}
            weighting = spec.corpus.advantage_weighting
            launched: dict[str, dict] = {}
            if compute.ranks > 1 and not train_time:  # one torchrun group for every shard to collect
                pending = [s for s in context.partition_keys if force or reusable_store(
                    paths.train_gradients(s), data.read_tokenized(paths.tokens(s)), fingerprint, spec.gradients,
                    version, weighting) is None]
                launched = torchrun_collect_shards(context, spec, storage, compute, pending, fingerprint, version)
            for shard in context.partition_keys:
                timer = Timer()
                docs = data.read_tokenized(paths.tokens(shard))
                out = paths.train_gradients(shard)
                store = None if force or train_time or shard in launched else reusable_store(
                    out, docs, fingerprint, spec.gradients, version, weighting)
                if train_time:  # the rows the training run recorded, summed per document
                    array, info = train_time_document_rows(train_time_stores(spec, paths),
                                                           [d.doc_id for d in docs])
                    store = write_store(out, array, info, doc_ids=[d.doc_id for d in docs],
                                        model_fingerprint=fingerprint, dtype=spec.gradients.dtype)
                    meta = {"rows": store.rows, "dims": store.dims, "train_time": True,
                            "untrained_documents": int((~array.any(axis=1)).sum())}
                elif shard in launched:
                    message = launched[shard]
                    store = GradientStore(out)
                    meta = {"rows": store.rows, "dims": store.dims, "ranks": message["ranks"],
                            "backend": message["backend"], "fsdp": message["fsdp"], "tokens": message["tokens"],
                            "seconds": message["seconds"], "launch": message["launch"],
                            **{k: dg.MetadataValue.json(message[k]) for k in (
                                "rank_seconds", "rank_padding_passes", "rank_peak_rss_mb")}}
                elif store is None:
                    collector = collector or pipeline_collector(spec, storage, compute)
                    with progress_logs(context):
                        store, stats = collect_shard(collector, docs, out, fingerprint, producer=version,
                                                     weighting=weighting)
                    meta = stats.as_metadata()
                else:  # complete and identical: left by a run that died before recording it
                    meta = {"reused": True, "rows": store.rows, "dims": store.dims}
                for result in store_checks(store, expected_rows(docs, spec), spec, train_key):
                    checks[result.check_name].append((shard, result))
                shards[shard] = {**meta, **size_metadata(dir_bytes(out)), "dtype": store.info["dtype"],
                                 "path": path_metadata(out), "total_seconds": timer.seconds,
                                 "peak_rss_mb": timer.peak_rss_mb, "config_hash": store.info["config_hash"],
                                 CONTENT_VERSION: store.digest()}
            single = len(shards) == 1
            yield from shard_results(context, train_key, shards)
            for name, results in checks.items():
                failed = [shard for shard, r in results if not r.passed]
                yield dg.AssetCheckResult(
                    asset_key=train_key, check_name=name, passed=not failed,
                    metadata={"shards": len(results), "failed_shards": ", ".join(failed) or "none",
                              **(dict(results[0][1].metadata) if single else {})})

        assets += [train_gradients, _files_intact_check(spec, train_key)]

    if spec.queries is not None:
        query_key = key(spec, "query_gradients")

        @dg.asset(key=query_key, group_name=spec.name, deps=[key(spec, "tokenized_queries"), *model_deps],
                  code_version=version, pool="gpu",
                  check_specs=store_check_specs(query_key), automation_condition=rebuild_condition(),
                  description="Gradients of the query loss (completion tokens where given), same projection.")
        def query_gradients(context: dg.AssetExecutionContext, storage: StorageResource,
                            compute: ComputeResource):
            from attribution_assets.engine.gradients.collect import collect_shard

            timer = Timer()
            paths = storage.paths(spec)
            docs = data.read_tokenized(paths.query_tokens)
            with progress_logs(context):
                store, stats = collect_shard(pipeline_collector(spec, storage, compute), docs,
                                             paths.query_gradients, model_fingerprint(spec, paths))
            version, checks = store.digest(), store_checks(store, expected_rows(docs, spec), spec, query_key)
            yield dg.MaterializeResult(
                metadata={**stats.as_metadata(), **size_metadata(dir_bytes(paths.query_gradients)),
                          "path": path_metadata(paths.query_gradients), "total_seconds": timer.seconds,
                          "peak_rss_mb": timer.peak_rss_mb},
                data_version=dg.DataVersion(version))
            yield from checks

        assets.append(query_gradients)
    return assets


def _files_intact_check(spec: PipelineSpec, train_key: dg.AssetKey) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=train_key, name="files_intact", blocking=True,
                    description="every materialized shard's gradients.npy opens and matches its info.json "
                                "(header and size only, cheap; values are checked when a shard is written)")
    def files_intact(context: dg.AssetCheckExecutionContext, storage: StorageResource) -> dg.AssetCheckResult:
        paths = storage.paths(spec)
        problems, checked = [], 0
        for shard in context.instance.get_dynamic_partitions(shards_partitions(spec).name):
            path = paths.train_gradients(shard)
            if not path.exists():
                continue
            checked += 1
            try:
                GradientStore(path)
            except (OSError, ValueError) as exc:
                problems.append(f"{shard}: {exc}")
        return dg.AssetCheckResult(
            passed=not problems, metadata={"checked_shards": checked,
                                           "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems))},
            description="; ".join(problems) if problems else f"{checked} shards intact")

    return files_intact
