"""The opt-in ``finetune`` asset: a Trainer run with train-time attribution (engine.training)."""

import dagster as dg

from attribution_assets.defs.automation import rebuild_condition
from attribution_assets.defs.common import Timer, code_version, compute_version, key, path_metadata
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.engine.io import data
from attribution_assets.spec import PipelineSpec

ALL = dg.AllPartitionMapping()


def finetune_assets(spec: PipelineSpec, compute: ComputeResource) -> list[dg.AssetsDefinition]:
    if spec.finetune is None:
        return []

    @dg.asset(key=key(spec, "finetune"), group_name=spec.name, pool="gpu",
              deps=[dg.AssetDep(key(spec, "tokenized_shards"), partition_mapping=ALL), key(spec, "model")],
              code_version=code_version("finetune-v1", spec, "finetune", "gradients", "corpus", "model")
              + compute_version(compute),
              automation_condition=rebuild_condition(),
              description="Fine-tunes the model on the corpus (transformers.Trainer) recording train-time "
                          "gradient shards (step ranges) normalized by the live optimizer state; later "
                          "assets use the fine-tuned model.")
    def finetune(context: dg.AssetExecutionContext, storage: StorageResource,
                 compute: ComputeResource) -> dg.MaterializeResult:
        # imported here: the Trainer brings peft and bitsandbytes, which every other asset does without
        from attribution_assets.engine.training.finetune import finetune as run_finetune

        timer = Timer()
        storage.ensure_writable()
        paths = storage.paths(spec)
        docs = [d for shard in paths.tokenized_shards() for d in data.read_tokenized(paths.tokens(shard))]
        if not docs:
            raise FileNotFoundError(f"{spec.name} has no tokenized shards; materialize `tokenized_shards` first.")
        model, tokenizer = compute.load_model(spec, paths, base=True)
        record = run_finetune(spec, paths, model.float(), tokenizer, docs, log=context.log.info)
        return dg.MaterializeResult(
            metadata={**{k: v for k, v in record.items() if k != "shards"}, "shards": len(record["shards"]),
                      "path": path_metadata(paths.finetuned_model), "seconds": timer.seconds,
                      "peak_rss_mb": timer.peak_rss_mb},
            data_version=dg.DataVersion(record["fingerprint"]))

    return [finetune]
