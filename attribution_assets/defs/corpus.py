"""Corpus, query set, tokenizer, model and tokenized shards of one pipeline."""


import json

import dagster as dg

from ..engine import data, pipeline_io
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


def corpus_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    partitions = shards_partitions(spec)
    model_key = model_resource_key(spec)
    group = spec.name

    @dg.asset(key=key(spec, "corpus"), group_name=group, required_resource_keys={STORAGE},
              code_version=code_version("corpus-v1", spec, "corpus", "shard_size", "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Training documents with stable ids, assigned to shards; registers shard partitions.")
    def corpus(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        storage.ensure_writable()
        docs = pipeline_io.corpus_documents(spec)
        out = storage.path(spec.name, "corpus") / "documents.parquet"
        shards = pipeline_io.write_documents(out, docs, spec.shard_size)
        existing = set(context.instance.get_dynamic_partitions(partitions.name))
        new = [s for s in shards if s not in existing]
        if new:
            context.instance.add_dynamic_partitions(partitions.name, new)
        for stale in sorted(existing - set(shards)):
            context.instance.delete_dynamic_partition(partitions.name, stale)
        version = digest(d["doc_id"] + d["content"] for d in docs)
        return dg.MaterializeResult(
            metadata={"documents": len(docs), "shards": len(shards), "new_shards": len(new),
                      "shard_size": spec.shard_size, "path": dg.MetadataValue.path(str(out)),
                      "seconds": timer.seconds,
                      "preview": dg.MetadataValue.md(_preview([d["text"] for d in docs]))},
            data_version=dg.DataVersion(version))

    @dg.asset(key=key(spec, "query_set"), group_name=group, required_resource_keys={STORAGE},
              code_version=code_version("queries-v1", spec, "queries", "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Query texts (prompt/completion where given) with gold document ids where known.")
    def query_set(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        queries = pipeline_io.query_documents(spec)
        out = storage.path(spec.name, "query_set") / "queries.parquet"
        pipeline_io.write_queries(out, queries)
        with_gold = sum(bool(q.get("gold_doc_ids")) for q in queries)
        return dg.MaterializeResult(
            metadata={"queries": len(queries), "with_gold": with_gold,
                      "path": dg.MetadataValue.path(str(out)), "seconds": timer.seconds,
                      "preview": dg.MetadataValue.md(_preview([q["text"] for q in queries]))},
            data_version=dg.DataVersion(digest(q["doc_id"] + q["content"] for q in queries)))

    assets = [corpus, query_set]
    if spec.is_demo:
        assets += _demo_model_assets(spec)
    else:
        assets.append(_user_model_asset(spec, model_key))

    tokenizer_dep = key(spec, "tokenizer") if spec.is_demo else key(spec, "model")
    resource_keys = {STORAGE, model_key}

    @dg.asset(key=key(spec, "tokenized_shards"), group_name=group, partitions_def=partitions,
              deps=[key(spec, "corpus"), tokenizer_dep], required_resource_keys=resource_keys,
              code_version=code_version("tokenize-v1", spec, "corpus", "model"),
              automation_condition=rebuild_condition(ignore=(key(spec, "corpus"),)),
              backfill_policy=dg.BackfillPolicy.single_run(),
              description="Token ids, loss masks and lengths of one shard (Parquet).")
    def tokenized_shards(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        storage = context.resources.storage
        storage.ensure_writable()
        tokenizer = load_tokenizer(spec, context)
        versions = {}
        for shard in context.partition_keys:
            timer = Timer()
            docs = pipeline_io.read_documents(storage.path(spec.name, "corpus") / "documents.parquet", shard)
            if not docs:
                raise ValueError(f"Shard {shard} has no documents in the corpus; rematerialize `corpus` "
                                 "so that stale shard partitions are removed.")
            rows, stats = data.tokenize_documents(docs, tokenizer, spec.corpus,
                                                  add_eos=pipeline_io.add_eos(spec.corpus, True))
            if not rows:
                raise data.DataError(f"Every document of {shard} was empty or shorter than 2 tokens "
                                     f"({stats.skipped_empty} empty, {stats.skipped_short} short).")
            out = storage.path(spec.name, "tokenized_shards", shard) / "tokens.parquet"
            data.write_tokenized(out, rows, extra={"shard": [shard] * len(rows)})
            versions[shard] = digest(f"{r.doc_id}:{r.input_ids}:{r.loss_mask}" for r in rows)
            context.add_asset_metadata({**stats.as_metadata(), "path": dg.MetadataValue.path(str(out)),
                                        "seconds": timer.seconds}, partition_key=shard)
        single = next(iter(versions.values())) if len(versions) == 1 else None
        return dg.MaterializeResult(data_version=dg.DataVersion(single) if single else None)

    @dg.asset(key=key(spec, "tokenized_queries"), group_name=group,
              deps=[key(spec, "query_set"), tokenizer_dep], required_resource_keys=resource_keys,
              code_version=code_version("tokenize-queries-v1", spec, "queries", "model"),
              automation_condition=rebuild_condition(),
              description="Token ids and loss masks of the queries (loss on the completion where given).")
    def tokenized_queries(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        queries = pipeline_io.read_queries(storage.path(spec.name, "query_set") / "queries.parquet")
        tokenizer = load_tokenizer(spec, context)
        query_spec = spec.queries or spec.corpus
        rows, stats = data.tokenize_documents(queries, tokenizer, query_spec,
                                              add_eos=pipeline_io.add_eos(query_spec, False))
        if not rows:
            raise data.DataError("Every query was empty or shorter than 2 tokens; check the query set.")
        out = storage.path(spec.name, "tokenized_queries") / "tokens.parquet"
        data.write_tokenized(out, rows)
        return dg.MaterializeResult(
            metadata={**stats.as_metadata(), "path": dg.MetadataValue.path(str(out)),
                      "seconds": timer.seconds},
            data_version=dg.DataVersion(digest(f"{r.doc_id}:{r.input_ids}:{r.loss_mask}" for r in rows)))

    return [*assets, tokenized_shards, tokenized_queries]


def _demo_model_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    @dg.asset(key=key(spec, "tokenizer"), group_name=spec.name, deps=[key(spec, "corpus")],
              required_resource_keys={STORAGE}, code_version=code_version("demo-tokenizer-v1", spec, "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Byte-level BPE tokenizer trained on the demo corpus with `tokenizers`.")
    def tokenizer(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        docs = pipeline_io.read_documents(storage.path(spec.name, "corpus") / "documents.parquet")
        out = storage.path(spec.name, "tokenizer")
        tok = pipeline_io.train_demo_tokenizer(spec, [d["text"] for d in docs], out)
        return dg.MaterializeResult(
            metadata={"vocab_size": len(tok), "path": dg.MetadataValue.path(str(out)),
                      "seconds": timer.seconds},
            data_version=dg.DataVersion(digest(json.dumps(tok.get_vocab(), sort_keys=True))))

    @dg.asset(key=key(spec, "model"), group_name=spec.name,
              deps=[key(spec, "corpus"), key(spec, "tokenizer"), key(spec, "query_set")],
              required_resource_keys={STORAGE, COMPUTE}, code_version=code_version("demo-model-v1", spec, "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Small GPT-NeoX trained on the demo corpus (with its AdamW state for normalization).")
    def model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        out = storage.path(spec.name, "model")
        metrics = pipeline_io.train_demo_model(
            spec, documents=storage.path(spec.name, "corpus") / "documents.parquet",
            queries=storage.path(spec.name, "query_set") / "queries.parquet",
            tokenizer_dir=storage.path(spec.name, "tokenizer"), out=out, log=context.log.info)
        return dg.MaterializeResult(
            metadata={**metrics, "path": dg.MetadataValue.path(str(out)), "seconds": timer.seconds},
            data_version=dg.DataVersion(metrics["fingerprint"]))

    return [tokenizer, model]


def _user_model_asset(spec: PipelineSpec, model_key: str) -> dg.AssetsDefinition:
    @dg.asset(key=key(spec, "model"), group_name=spec.name,
              required_resource_keys={STORAGE, COMPUTE, model_key},
              code_version=code_version("model-v1", spec, "model"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="The pipeline's causal LM, loaded and fingerprinted (weights stay where they are).")
    def model(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        timer = Timer()
        storage = context.resources.storage
        model, _ = load_model(spec, context)
        out = storage.path(spec.name, "model") / "model.json"
        record = pipeline_io.write_model_record(out, spec, model)
        return dg.MaterializeResult(
            metadata={**record, "seconds": timer.seconds},
            data_version=dg.DataVersion(record["fingerprint"]))

    return model


def _preview(texts: list[str], n: int = 5) -> str:
    return "\n".join(f"- {t[:160]}" for t in texts[:n])


def load_tokenizer(spec: PipelineSpec, context: dg.AssetExecutionContext):
    """The pipeline's tokenizer: the demo's trained one, else the model resource's."""
    storage = context.resources.storage
    default = storage.path(spec.name, "tokenizer") if spec.is_demo else None
    return getattr(context.resources, model_resource_key(spec)).load_tokenizer(default)


def load_model(spec: PipelineSpec, context: dg.AssetExecutionContext):
    """``(model, tokenizer)`` on the compute resource's device."""
    storage = context.resources.storage
    default = storage.path(spec.name, "model") if spec.is_demo else None
    compute = context.resources.compute
    model, tokenizer = getattr(context.resources, model_resource_key(spec)).load(compute.torch_device(), default)
    return compute.cast(model), tokenizer
