"""Per-shard training gradients and query gradients (the engine's collector, called thinly)."""

import json

import dagster as dg
import numpy as np

from ..engine import data, workflow
from ..engine.store import GradientStore
from ..spec import PipelineSpec
from .automation import rebuild_condition
from .common import (
    COMPUTE,
    STORAGE,
    Timer,
    code_version,
    dir_bytes,
    key,
    model_resource_key,
    shards_partitions,
)
from .corpus import load_model

CHECKS = ("finite", "row_count", "settings")


def model_dir(spec: PipelineSpec, storage):
    """The demo's trained model directory (holds optimizer.pt); None for user models."""
    return storage.path(spec.name, "model") if spec.is_demo else None


def model_fingerprint(spec: PipelineSpec, storage) -> str:
    record = storage.path(spec.name, "model") / "model.json"
    if not record.exists():
        raise FileNotFoundError(f"{record} does not exist; materialize {spec.name}/model first.")
    return json.loads(record.read_text())["fingerprint"]


def store_checks(store: GradientStore, expected_rows: int, spec: PipelineSpec,
                 asset_key: dg.AssetKey) -> list[dg.AssetCheckResult]:
    """Re-read what was written: finite values, expected rows, the pipeline's settings."""
    finite = bool(np.isfinite(store.array).all())
    config = workflow.collector_config(spec.gradients)
    normalizer = store.info.get("normalizer")
    settings_ok = ((normalizer or {}).get("kind") == config.normalizer
                   and store.info.get("config_hash") == config.config_hash(normalizer))
    return [
        dg.AssetCheckResult(asset_key=asset_key, check_name="finite", passed=finite,
                            metadata={"path": str(store.path / "gradients.npy")}),
        dg.AssetCheckResult(asset_key=asset_key, check_name="row_count", passed=store.rows == expected_rows,
                            metadata={"rows": store.rows, "expected": expected_rows}),
        dg.AssetCheckResult(asset_key=asset_key, check_name="settings", passed=settings_ok,
                            metadata={"config_hash": store.info.get("config_hash", "")}),
    ]


def _check_specs(asset_key: dg.AssetKey) -> list[dg.AssetCheckSpec]:
    descriptions = {"finite": "every gradient value is finite",
                    "row_count": "one row per document (or per target token)",
                    "settings": "projection and normalizer match the pipeline spec"}
    return [dg.AssetCheckSpec(name, asset=asset_key, blocking=True, description=descriptions[name])
            for name in CHECKS]


def _expected_rows(docs: list[data.TokenizedDoc], spec: PipelineSpec) -> int:
    return sum(d.targets for d in docs) if spec.gradients.per_token else len(docs)


def gradient_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    model_key = model_resource_key(spec)
    resources = {STORAGE, COMPUTE, model_key}
    version = code_version("gradients-v1", spec, "gradients")
    assets = []

    def _collector(context):
        storage = context.resources.storage
        storage.ensure_writable()
        model, _ = load_model(spec, context)
        return workflow.make_collector(model, spec, model_dir(spec, storage))

    if spec.scoring.mode == "stored":
        train_key = key(spec, "train_gradients")

        @dg.asset(key=train_key, group_name=spec.name, partitions_def=shards_partitions(spec),
                  deps=[key(spec, "tokenized_shards"), key(spec, "model")], required_resource_keys=resources,
                  code_version=version, pool="gpu", check_specs=_check_specs(train_key),
                  automation_condition=rebuild_condition(), backfill_policy=dg.BackfillPolicy.single_run(),
                  description="Per-document (or per-token) projected gradients of one shard: .npy + info.json. "
                              "A run over several shards loads the model once.")
        def train_gradients(context: dg.AssetExecutionContext):
            storage = context.resources.storage
            collector = _collector(context)
            fingerprint = model_fingerprint(spec, storage)
            checks: dict[str, list] = {name: [] for name in CHECKS}
            versions = {}
            for shard in context.partition_keys:
                timer = Timer()
                docs = data.read_tokenized(storage.path(spec.name, "tokenized_shards", shard) / "tokens.parquet")
                out = storage.path(spec.name, "train_gradients", shard)
                store, stats = workflow.collect_shard(collector, docs, out, fingerprint)
                versions[shard] = workflow.store_digest(store)
                context.add_asset_metadata(
                    {**stats.as_metadata(), "bytes": dir_bytes(out), "dtype": store.info["dtype"],
                     "path": dg.MetadataValue.path(str(out)), "total_seconds": timer.seconds,
                     "config_hash": store.info["config_hash"]}, partition_key=shard)
                for result in store_checks(store, _expected_rows(docs, spec), spec, train_key):
                    checks[result.check_name].append((shard, result))
            single = len(versions) == 1
            yield dg.MaterializeResult(
                data_version=dg.DataVersion(next(iter(versions.values()))) if single else None)
            for name, results in checks.items():
                failed = [shard for shard, r in results if not r.passed]
                yield dg.AssetCheckResult(
                    asset_key=train_key, check_name=name, passed=not failed,
                    metadata={"shards": len(results), "failed_shards": ", ".join(failed) or "none",
                              **(dict(results[0][1].metadata) if single else {})})

        assets += [train_gradients, _files_intact_check(spec, train_key)]

    if spec.queries is not None:
        query_key = key(spec, "query_gradients")

        @dg.asset(key=query_key, group_name=spec.name, deps=[key(spec, "tokenized_queries"), key(spec, "model")],
                  required_resource_keys=resources, code_version=version, pool="gpu",
                  check_specs=_check_specs(query_key), automation_condition=rebuild_condition(),
                  description="Gradients of the query loss (completion tokens where given), same projection.")
        def query_gradients(context: dg.AssetExecutionContext):
            timer = Timer()
            storage = context.resources.storage
            docs = data.read_tokenized(storage.path(spec.name, "tokenized_queries") / "tokens.parquet")
            out = storage.path(spec.name, "query_gradients")
            store, stats = workflow.collect_shard(_collector(context), docs, out, model_fingerprint(spec, storage))
            yield dg.MaterializeResult(
                metadata={**stats.as_metadata(), "bytes": dir_bytes(out), "path": dg.MetadataValue.path(str(out)),
                          "total_seconds": timer.seconds},
                data_version=dg.DataVersion(workflow.store_digest(store)))
            yield from store_checks(store, _expected_rows(docs, spec), spec, query_key)

        assets.append(query_gradients)
    return assets


def _files_intact_check(spec: PipelineSpec, train_key: dg.AssetKey) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=train_key, name="files_intact", required_resource_keys={STORAGE}, blocking=True,
                    description="every materialized shard's gradients.npy opens and matches its info.json "
                                "(header and size only, cheap; values are checked when a shard is written)")
    def files_intact(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        storage = context.resources.storage
        problems, checked = [], 0
        for shard in context.instance.get_dynamic_partitions(shards_partitions(spec).name):
            path = storage.path(spec.name, "train_gradients", shard)
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
