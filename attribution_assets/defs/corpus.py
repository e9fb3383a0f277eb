"""Corpus, query set, tokenizer, model and tokenized shards of one pipeline."""

import json

import dagster as dg

from attribution_assets.defs.automation import rebuild_condition
from attribution_assets.defs.common import (
    CONTENT_VERSION,
    Timer,
    code_version,
    key,
    path_metadata,
    shard_results,
    shards_partitions,
)
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.engine.io import data, records
from attribution_assets.engine.io.digests import parts_digest, weights_stamp
from attribution_assets.spec import (
    DataSpec,
    PipelineSpec,
    max_length_problem,
    position_limit,
    projection_problem,
)


def corpus_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    partitions = shards_partitions(spec)
    group = spec.name

    @dg.asset(key=key(spec, "corpus"), group_name=group,
              code_version=code_version("corpus-v1", spec, "corpus", "shard_size", "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Training documents with stable ids, assigned to shards; registers shard partitions.")
    def corpus(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.io import corpus as corpus_io  # polars

        timer = Timer()
        storage.ensure_writable()
        paths = storage.paths(spec)
        missing: list[str] = []
        docs = corpus_io.corpus_documents(spec, missing)
        locate = None if spec.is_demo else records.RowLocator(spec.corpus)
        nan_skipped = data.drop_nan_advantages(docs, spec.corpus, locate)
        if missing:
            context.log.warning(f"{len(missing)} rows have no text and were left out (`missing_text: skip`), "
                                f"e.g. {'; '.join(missing[:5])}.")
        shards = corpus_io.write_documents(paths.documents, docs, spec.shard_size)
        existing = set(context.instance.get_dynamic_partitions(partitions.name))
        new = [s for s in shards if s not in existing]
        if new:
            context.instance.add_dynamic_partitions(partitions.name, new)
        for stale in sorted(existing - set(shards)):
            context.instance.delete_dynamic_partition(partitions.name, stale)
        duplicates = sum("~" in d["doc_id"] for d in docs if not spec.corpus.id_column)
        if duplicates:
            context.log.warning(f"{duplicates} documents repeat the content of another document "
                                "(ids ending in ~N); deduplicate the corpus if that is not intended.")
        return dg.MaterializeResult(
            metadata={"documents": len(docs), "duplicate_documents": duplicates, "shards": len(shards),
                      "new_shards": len(new), "shard_size": spec.shard_size, "path": path_metadata(paths.documents),
                      **_missing_metadata(spec.corpus, missing),
                      **({"skipped_nan_rewards": nan_skipped} if spec.corpus.advantage_weighting != "none" else {}),
                      "seconds": timer.seconds,
                      "preview": dg.MetadataValue.md(_preview([d["text"] for d in docs]))},
            data_version=dg.DataVersion(parts_digest(d["doc_id"] + d["content"] + str(d.get("advantage", ""))
                                                     for d in docs)))

    @dg.asset(key=key(spec, "query_set"), group_name=group, deps=[key(spec, "corpus")],
              code_version=code_version("queries-v1", spec, "queries", "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Query texts (prompt/completion where given) with gold document ids where known; "
                          "gold ids that name no corpus document are reported.")
    def query_set(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.io import corpus as corpus_io

        timer = Timer()
        paths = storage.paths(spec)
        missing: list[str] = []
        queries = corpus_io.query_documents(spec, missing)
        if not queries:
            raise data.DataError(f"The query set of {spec.name!r} has no query left ({len(missing)} rows without "
                                 f"text, e.g. {'; '.join(missing[:3])}).")
        corpus_io.write_queries(paths.queries, queries)
        with_gold = sum(bool(q.get("gold_doc_ids")) for q in queries)
        known = {d["doc_id"] for d in corpus_io.read_documents(paths.documents)} if with_gold else set()
        unknown = sorted({g for q in queries for g in q.get("gold_doc_ids", []) if g not in known})
        if unknown:
            context.log.warning(f"{len(unknown)} gold ids name no corpus document (e.g. {unknown[:5]}); "
                                "check `gold_column` against the corpus ids (`id_column`).")
        return dg.MaterializeResult(
            metadata={"queries": len(queries), "with_gold": with_gold, "unknown_gold_ids": len(unknown),
                      "unknown_gold_examples": ", ".join(unknown[:5]) or "none",
                      **_missing_metadata(spec.queries, missing),
                      "path": path_metadata(paths.queries), "seconds": timer.seconds,
                      "preview": dg.MetadataValue.md(_preview([q["text"] for q in queries]))},
            data_version=dg.DataVersion(parts_digest(q["doc_id"] + q["content"] for q in queries)))

    assets = [corpus, query_set]
    assets += _demo_model_assets(spec) if spec.is_demo else [_user_model_asset(spec)]
    tokenizer_dep = key(spec, "tokenizer") if spec.is_demo else key(spec, "model")

    @dg.asset(key=key(spec, "tokenized_shards"), group_name=group, partitions_def=partitions,
              deps=[key(spec, "corpus"), tokenizer_dep],
              code_version=code_version("tokenize-v1", spec, "corpus", "model"),
              automation_condition=rebuild_condition(ignore=(key(spec, "corpus"),)),
              description="Token ids, loss masks and lengths of one shard (Parquet).")
    def tokenized_shards(context: dg.AssetExecutionContext, storage: StorageResource):
        from attribution_assets.engine.io import corpus as corpus_io

        storage.ensure_writable()
        paths = storage.paths(spec)
        tokenizer = pipeline_tokenizer(spec, storage)
        shards = {}
        for shard in context.partition_keys:
            timer = Timer()
            docs = corpus_io.read_documents(paths.documents, shard)
            if not docs:
                raise ValueError(f"Shard {shard} has no documents in the corpus; rematerialize `corpus` "
                                 "so that stale shard partitions are removed.")
            rows, stats = data.tokenize_documents(docs, tokenizer, spec.corpus,
                                                  add_eos=corpus_io.add_eos(spec.corpus, True))
            if not rows:
                raise data.DataError(f"Every document of {shard} was empty or shorter than 2 tokens "
                                     f"({stats.skipped_empty} empty, {stats.skipped_short} short).")
            data.write_tokenized(paths.tokens(shard), rows, extra={"shard": [shard] * len(rows)})
            version = parts_digest(f"{r.doc_id}:{r.input_ids}:{r.loss_mask}"
                                   + ("" if r.advantage is None else f":{r.advantage!r}") for r in rows)
            shards[shard] = {**stats.as_metadata(), "path": path_metadata(paths.tokens(shard)),
                             "seconds": timer.seconds, CONTENT_VERSION: version}
        yield from shard_results(context, context.asset_key, shards)

    @dg.asset(key=key(spec, "tokenized_queries"), group_name=group,
              deps=[key(spec, "query_set"), tokenizer_dep],
              code_version=code_version("tokenize-queries-v1", spec, "queries", "model"),
              automation_condition=rebuild_condition(),
              description="Token ids and loss masks of the queries (loss on the completion where given).")
    def tokenized_queries(storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.io import corpus as corpus_io

        timer = Timer()
        paths = storage.paths(spec)
        queries = corpus_io.read_queries(paths.queries)
        query_spec = spec.queries or spec.corpus
        rows, stats = data.tokenize_documents(queries, pipeline_tokenizer(spec, storage), query_spec,
                                              add_eos=corpus_io.add_eos(query_spec, False))
        if not rows:
            raise data.DataError("Every query was empty or shorter than 2 tokens; check the query set.")
        data.write_tokenized(paths.query_tokens, rows)
        return dg.MaterializeResult(
            metadata={**stats.as_metadata(), "path": path_metadata(paths.query_tokens),
                      "seconds": timer.seconds},
            data_version=dg.DataVersion(parts_digest(f"{r.doc_id}:{r.input_ids}:{r.loss_mask}" for r in rows)))

    return [*assets, tokenized_shards, tokenized_queries]


def _demo_model_assets(spec: PipelineSpec) -> list[dg.AssetsDefinition]:
    @dg.asset(key=key(spec, "tokenizer"), group_name=spec.name, deps=[key(spec, "corpus")],
              code_version=code_version("demo-tokenizer-v1", spec, "demo"),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Byte-level BPE tokenizer trained on the demo corpus with `tokenizers`.")
    def tokenizer(storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.demo.build import build_demo_tokenizer  # imports slowly

        timer = Timer()
        paths = storage.paths(spec)
        tok = build_demo_tokenizer(spec, paths)
        return dg.MaterializeResult(
            metadata={"vocab_size": len(tok), "path": path_metadata(paths.tokenizer), "seconds": timer.seconds},
            data_version=dg.DataVersion(parts_digest([json.dumps(tok.get_vocab(), sort_keys=True)])))

    @dg.asset(key=key(spec, "model"), group_name=spec.name,
              deps=[key(spec, "corpus"), key(spec, "tokenizer"), key(spec, "query_set")],
              code_version=code_version("demo-model-v1", spec, "demo")
              + (f"-rows-{spec.section_hash('gradients')}" if spec.demo.record_epochs else ""),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="Small GPT-NeoX trained on the demo corpus (with its AdamW state for normalization).")
    def model(context: dg.AssetExecutionContext, storage: StorageResource) -> dg.MaterializeResult:
        from attribution_assets.engine.demo.build import build_demo_model  # imports slowly

        timer = Timer()
        paths = storage.paths(spec)
        metrics = build_demo_model(spec, paths, log=context.log.info)
        return dg.MaterializeResult(
            metadata={**metrics, "path": path_metadata(paths.model), "seconds": timer.seconds},
            data_version=dg.DataVersion(metrics["fingerprint"]))

    return [tokenizer, model]


def _weights_suffix(spec: PipelineSpec) -> str:
    """The local weights' stamp (sizes, mtimes), so weights replaced in place make the model unsynced."""
    stamp = weights_stamp(spec.model.name_or_path or "")
    return f"-w{stamp}" if stamp else ""


def _user_model_asset(spec: PipelineSpec) -> dg.AssetsDefinition:
    @dg.asset(key=key(spec, "model"), group_name=spec.name,
              code_version=code_version("model-v1", spec, "model") + _weights_suffix(spec),
              automation_condition=rebuild_condition(on_deps_updated=False),
              description="The pipeline's causal LM, loaded and fingerprinted (weights stay where they are).")
    def model(storage: StorageResource, compute: ComputeResource) -> dg.MaterializeResult:
        from attribution_assets.engine.gradients.hooks import select_modules  # transformers
        from attribution_assets.engine.io import corpus as corpus_io

        timer = Timer()
        paths = storage.paths(spec)
        loaded, _ = compute.load_model(spec, paths, base=True)
        try:
            largest = max(max(m.out_features, m.in_features)
                          for m in select_modules(loaded, spec.gradients.include, spec.gradients.exclude))
        except ValueError:  # no module matches: the collector says so, with the modules it found
            largest = None
        problem = (max_length_problem(spec, position_limit(loaded.config.to_dict()))
                   or projection_problem(spec, largest))
        if problem:
            raise ValueError(problem)
        record = corpus_io.write_model_record(paths.model_record, spec, loaded)
        return dg.MaterializeResult(
            metadata={**record, "seconds": timer.seconds},
            data_version=dg.DataVersion(record["fingerprint"]))

    return model


def _missing_metadata(spec: DataSpec | None, missing: list[str]) -> dict:
    """Rows left out for a missing text (``missing_text: skip``): how many and where (the CLI
    warns with these)."""
    if spec is None or spec.missing_text != "skip":
        return {}
    return {"skipped_missing_text": len(missing), "skipped_missing_examples": "; ".join(missing[:5]) or "none"}


def _preview(texts: list[str], n: int = 5) -> str:
    return "\n".join(f"- {t[:160]}" for t in texts[:n])


def pipeline_tokenizer(spec: PipelineSpec, storage: StorageResource):
    """The pipeline's tokenizer: the demo's trained one, else the model's."""
    from attribution_assets.engine.io.models import load_tokenizer, model_source  # torch

    paths = storage.paths(spec)
    return load_tokenizer(spec.model, str(paths.tokenizer) if spec.is_demo else model_source(spec, paths, base=True))
