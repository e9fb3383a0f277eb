"""Human-readable summaries of materialized pipelines (printed by ``attribution demo``)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from attribution_assets.defs.common import key
from attribution_assets.engine.evaluation import metrics as fact_tracing
from attribution_assets.engine.scoring import database
from attribution_assets.spec import PipelineSpec

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


def demo_report(spec: PipelineSpec, instance: dg.DagsterInstance, defs: dg.Definitions,
                n_queries: int = 3, k: int = 5) -> str:
    lines = [f"Pipeline {spec.name!r}: materialized assets"]
    for name, fields in SHOWN.items():
        meta = latest_metadata(instance, key(spec, name))
        if meta:
            shown = ", ".join(f"{f}={meta[f]}" for f in fields if f in meta)
            lines.append(f"  {name:<18} {shown}")
    shards = instance.get_dynamic_partitions(f"{spec.name}_shards")
    lines.append(f"  shards             {len(shards)} partitions: {', '.join(shards)}")
    db = defs.resources["storage"].paths(spec).database
    if db.exists():
        lines += ["", f"Which training documents made the model say this? (DuckDB: {db})"]
        with database.connect(db) as con:
            all_ids = [r[0] for r in con.execute("SELECT query_id FROM queries ORDER BY query_id").fetchall()]
        step = max(1, len(all_ids) // n_queries)
        for query_id in all_ids[::step][:n_queries]:
            lines += ["", format_top_k(db, query_id, k)]
        ranks = fact_tracing.gold_ranks(db)
        if ranks:
            m = fact_tracing.recall_and_mrr(ranks)
            lines += ["", f"Fact tracing over {m['queries']} queries: a gold document is ranked first for "
                          f"{m['recall@1']:.0%}, in the top 10 for {m['recall@10']:.0%}; MRR {m['mrr']:.3f}."]
        lines += ["", f"Your own SQL: cd {db.parent} && duckdb -readonly {db.name}",
                  "  SELECT * FROM top_influences WHERE query_id = '...' AND rank <= 10;"]
    return "\n".join(lines)


def format_top_k(db: Path, query_id: str, k: int = 5) -> str:
    """Query text, its top-k documents with scores, and the rank of the first gold document."""
    found = database.query_text(db, query_id)
    if found is None:
        raise LookupError(f"No query {query_id!r} in {db}; list ids with: SELECT query_id FROM queries.")
    text, gold = found
    lines = [f"query {query_id}: {text}"]
    for rank, _, source_id, score, doc_text in database.top_k(db, query_id, k):
        mark = "*" if source_id in gold else " "
        lines.append(f"  {rank:>3}{mark} {score:+.4f}  {doc_text[:100]}")
    if gold:
        first = database.first_gold_rank(db, query_id)
        lines.append(f"  first gold document at rank {first}  (* = gold)")
    return "\n".join(lines)
