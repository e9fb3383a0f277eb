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


def latest_partition_metadata(instance: dg.DagsterInstance, asset_key: dg.AssetKey,
                              partitions: list[str]) -> dict[str, dict]:
    """``{partition: metadata}`` of the latest materialization of each of ``partitions`` (read
    newest first, a page at a time, until every partition was seen)."""
    wanted, found, cursor = set(partitions), {}, None
    while wanted - set(found):
        page = instance.fetch_materializations(asset_key, limit=max(100, 2 * len(wanted)), cursor=cursor)
        for record in page.records:
            event = record.asset_materialization
            if event is not None and event.partition in wanted and event.partition not in found:
                found[event.partition] = {k: v.value for k, v in event.metadata.items()}
        if not page.has_more:
            break
        cursor = page.cursor
    return found


def data_warnings(spec: PipelineSpec, instance: dg.DagsterInstance) -> list[str]:
    """Every data problem the last materializations counted, with examples: rows left out for a
    missing text, gold ids that name no document, empty or too short documents and queries,
    truncated ones (the CLI prints these after ``materialize`` and ``run``)."""
    out = []
    corpus, queries = latest_metadata(instance, key(spec, "corpus")), latest_metadata(instance, key(spec, "query_set"))
    for what, meta in (("corpus", corpus), ("query", queries)):
        if meta.get("skipped_missing_text"):
            out.append(f"{meta['skipped_missing_text']} {what} rows have no text and were left out "
                       f"(`missing_text: skip`), e.g. {meta['skipped_missing_examples']}")
    if queries.get("unknown_gold_ids"):
        out.append(f"{queries['unknown_gold_ids']} gold ids name no corpus document, e.g. "
                   f"{queries['unknown_gold_examples']}; check `gold_column` against the corpus ids (`id_column`)")
    shards = instance.get_dynamic_partitions(f"{spec.name}_shards")
    tokenized = list(latest_partition_metadata(instance, key(spec, "tokenized_shards"), shards).values())
    for what, metas, section in (("documents", tokenized, "corpus"),
                                 ("queries", [latest_metadata(instance, key(spec, "tokenized_queries"))], "queries")):
        empty, short = (sum(m.get(k, 0) for m in metas) for k in ("skipped_empty", "skipped_short"))
        examples = [e for m in metas for e in str(m.get("skipped_examples", "none")).split(", ") if e != "none"]
        if empty or short:
            out.append(f"{empty + short} {what} were skipped ({empty} empty, {short} shorter than 2 tokens or "
                       f"without a target token), e.g. {', '.join(examples[:5])}")
        truncated = sum(m.get("truncated", 0) for m in metas)
        if truncated:
            out.append(f"{truncated} {what} were longer than `{section}.max_length` and were truncated "
                       "(`overflow: chunk` keeps the rest as pieces)")
    return out


def _number(value) -> str:
    """Floats to 4 significant digits below 1000 (0.9896), to one decimal above (1234.5)."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.1f}"


def demo_report(spec: PipelineSpec, instance: dg.DagsterInstance, defs: dg.Definitions,
                n_queries: int = 3, k: int = 5) -> str:
    lines = [f"Pipeline {spec.name!r}: its assets as last materialized"]
    for name, fields in SHOWN.items():
        meta = latest_metadata(instance, key(spec, name))
        if meta:
            shown = ", ".join(f"{f}={_number(meta[f])}" for f in fields if f in meta)
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
        if database.breakdown_level(db) != "none":
            shown = all_ids[::step][:n_queries]
            with_gold = [q for q in shown if (database.query_text(db, q) or ("", []))[1]]
            if with_gold:
                lines += ["", format_gold_layers(db, with_gold[0])]
        ranks = fact_tracing.gold_ranks(db)
        if ranks:
            m = fact_tracing.recall_and_mrr(ranks)
            lines += ["", f"Fact tracing over {m['queries']} queries: a gold document is ranked first for "
                          f"{m['recall@1']:.0%}, in the top 10 for {m['recall@10']:.0%}; MRR {m['mrr']:.3f}."]
            lines += train_time_lines(spec, latest_metadata(instance, key(spec, "train_time_fact_tracing")))
        lines += ["", f"Your own SQL: cd {db.parent} && duckdb -readonly {db.name}  (the DuckDB CLI, or "
                      "`import duckdb` in Python)",
                  "  SELECT * FROM top_influences WHERE query_id = '...' AND rank <= 10;"]
    return "\n".join(lines)


def train_time_lines(spec: PipelineSpec, meta: dict) -> list[str]:
    """The fact-tracing figures from the training run's own rows next to the post-hoc rows
    (the ``train_time_fact_tracing`` asset's metadata; none without it)."""
    if spec.scoring.train_rows == "train_time":
        return ["  (scores from train-time rows: gradients recorded during training, summed per document)"]
    if not meta:
        return []
    when = (f"the last {spec.demo.record_epochs} epoch(s) of the model's training" if spec.is_demo
            else "the fine-tuning run")
    return [f"Same queries, rows recorded during {when} (train time) vs the final model (post hoc):"] + [
        f"  {name:<10} recall@1 {meta[f'{rows}_recall@1']:.0%}, recall@10 {meta[f'{rows}_recall@10']:.0%}, "
        f"MRR {meta[f'{rows}_mrr']:.3f}" for rows, name in (("train_time", "train time"), ("post_hoc", "post hoc"))]


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


def _layer_name(layer: int | None) -> str:
    return "other" if layer is None else f"layer {layer}"


def format_gold_layers(db: Path, query_id: str) -> str:
    """Which layers carry the gold documents' influence for ``query_id`` (needs a breakdown)."""
    rows = database.gold_layer_breakdown(db, query_id)
    if not rows:
        return f"query {query_id}: no gold document in its score table, so no layer breakdown."
    total = sum(r[1] for r in rows)
    lines = [f"Which layers carry the gold documents' influence? query {query_id}, its {rows[0][2]} gold "
             f"document(s), summed score {total:+.4f}:"]
    for layer, value, _ in rows:
        share = f"{value / total:>5.0%}" if total > 0 else ""
        lines.append(f"  {_layer_name(layer):<8} {value:+.4f}  {share}")
    return "\n".join(lines)


def format_breakdown(db: Path, query_id: str, by: str = "layer", k: int = 5) -> str:
    """``by="layer"``: the query's top-k documents with each layer's contribution to their score;
    ``by="head"``: its ``k`` top head blocks (``top_heads``). Needs ``scoring.breakdown``."""
    level = database.breakdown_level(db)
    if level == "none" or (by == "head" and level != "head"):
        need = "head` (with `gradients.split: head" if by == "head" else "module` or `head"
        raise LookupError(f"{db} has no {by} breakdown: set `scoring.breakdown: {need}`) and materialize "
                         "the pipeline's scores and attribution_db again.")
    found = database.query_text(db, query_id)
    if found is None:
        raise LookupError(f"No query {query_id!r} in {db}; list ids with: SELECT query_id FROM queries.")
    text, gold = found
    lines = [f"query {query_id}: {text}"]
    if by == "head":
        lines.append(f"  head blocks by mean contribution to the top {database.TOP_HEADS_DOCS} documents' scores")
        lines.append(f"  {'rank':>4}  {'layer':>5}  {'block':<6} {'mean':>8}  {'share':>6}  module")
        for rank, layer, kind, head, value, share, module in database.top_heads(db, query_id, k):
            block = f"{kind}{head}"
            lines.append(f"  {rank:>4}  {layer if layer is not None else '-':>5}  {block:<6} {value:+.4f}  "
                         f"{share:>6.1%}  {module}")
        return "\n".join(lines)
    rows = database.layer_breakdown(db, query_id, k)
    layers = sorted({r[3] for r in rows}, key=lambda x: (x is None, x if x is not None else 0))
    lines.append(f"  {'rank':>5}  {'score':>8}  " + "  ".join(f"{_layer_name(x):>8}" for x in layers)
                 + "  document")
    by_doc: dict[tuple, dict] = {}
    for rank, doc_id, score, layer, value in rows:
        by_doc.setdefault((rank, doc_id, score), {})[layer] = value
    texts = {doc_id: doc_text for _, doc_id, _, _, doc_text in database.top_k(db, query_id, k)}
    for (rank, doc_id, score), values in by_doc.items():
        mark = "*" if doc_id in gold else " "
        cells = "  ".join(f"{values.get(x, 0.0):>+8.4f}" for x in layers)
        lines.append(f"  {rank:>4}{mark}  {score:>+8.4f}  {cells}  {texts.get(doc_id, '')[:60]}")
    if gold:
        lines.append("  (* = gold)")
    return "\n".join(lines)
