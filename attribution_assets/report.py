"""Human-readable summaries of materialized pipelines (printed by ``attribution demo``)."""

from __future__ import annotations

import dagster as dg

from .defs.common import key
from .spec import PipelineSpec

SHOWN = {
    "corpus": ("documents", "shards"),
    "query_set": ("queries", "with_gold"),
    "tokenizer": ("vocab_size",),
    "model": ("train_phrasing_accuracy", "held_out_phrasing_accuracy", "train_seconds", "parameters"),
    "tokenized_queries": ("rows", "tokens"),
}


def latest_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey) -> dict:
    event = instance.get_latest_materialization_event(asset_key)
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def demo_report(spec: PipelineSpec, instance: dg.DagsterInstance, defs: dg.Definitions) -> str:
    lines = [f"Pipeline {spec.name!r}: materialized assets"]
    for name, fields in SHOWN.items():
        meta = latest_metadata(instance, key(spec, name))
        if meta:
            shown = ", ".join(f"{f}={meta[f]}" for f in fields if f in meta)
            lines.append(f"  {name:<18} {shown}")
    shards = instance.get_dynamic_partitions(f"{spec.name}_shards")
    lines.append(f"  tokenized_shards   {len(shards)} partitions: {', '.join(shards)}")
    return "\n".join(lines)
