"""Which layers and heads carry fact-tracing influence on the demo? Prints the tables of
``docs/breakdowns.md`` (the SQL that produced each one, then its result).

Materializes a demo pipeline with per-head gradient blocks and a head breakdown under
``--storage`` (its own directory; the default demo is not touched), then queries its DuckDB views.

    .venv/bin/python benchmarks/breakdowns_demo.py --people 30      # ~5 min of CPU
    .venv/bin/python benchmarks/breakdowns_demo.py --reuse          # queries only
    .venv/bin/python benchmarks/breakdowns_demo.py --split module --storage .storage-modules
        # the same pipeline with one block per module (fact tracing and layers only)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

FACT_TRACING = """
WITH gold AS (SELECT query_id, unnest(gold_doc_ids) AS doc_id FROM queries),
parts AS (
  SELECT query_id, doc_id, 'all' AS part, score AS s FROM scores
  UNION ALL SELECT query_id, doc_id, 'layer ' || layer, contribution FROM layer_scores),
ranked AS (SELECT *, row_number() OVER (PARTITION BY query_id, part ORDER BY s DESC, doc_id) AS rank
           FROM parts),
best AS (SELECT query_id, part, min(rank) AS rank FROM ranked JOIN gold USING (query_id, doc_id)
         GROUP BY ALL)
SELECT part, count(*) AS queries, round(avg((rank = 1)::INT), 3) AS recall_at_1,
       round(avg((rank <= 10)::INT), 3) AS recall_at_10, round(avg(1.0 / rank), 3) AS mrr
FROM best GROUP BY part ORDER BY part"""

MODULE_QUERIES = {"Fact tracing by the whole score and by one layer's part of it": FACT_TRACING}

QUERIES = {
    "Share of the summed score carried by each layer and block (gold documents vs the top-10 "
    "documents that are not gold)": """
WITH gold AS (SELECT query_id, unnest(gold_doc_ids) AS doc_id FROM queries),
pairs AS (
  SELECT query_id, doc_id, 'gold' AS docs FROM gold
  UNION ALL
  SELECT t.query_id, t.doc_id, 'other' FROM top_influences t
  WHERE t.rank <= 10 AND NOT EXISTS (SELECT 1 FROM gold g WHERE g.query_id = t.query_id AND g.doc_id = t.doc_id)),
per AS (
  SELECT p.docs, h.layer, coalesce(h.kind, regexp_extract(h.module, '[^.]+$')) AS block,
         sum(h.contribution) AS c
  FROM head_scores h JOIN pairs p USING (query_id, doc_id) GROUP BY ALL)
SELECT layer, block,
       round(sum(c) FILTER (docs = 'gold') / (SELECT sum(c) FROM per WHERE docs = 'gold'), 3) AS gold_share,
       round(sum(c) FILTER (docs = 'other') / (SELECT sum(c) FROM per WHERE docs = 'other'), 3)
         AS top10_other_share
FROM per GROUP BY ALL ORDER BY layer, block""",
    "Fact tracing when documents are ranked by one part of the score alone (first gold rank per "
    "query)": """
WITH gold AS (SELECT query_id, unnest(gold_doc_ids) AS doc_id FROM queries),
parts AS (
  SELECT query_id, doc_id, 'all' AS part, score AS s FROM scores
  UNION ALL SELECT query_id, doc_id, 'layer ' || layer, contribution FROM layer_scores
  UNION ALL SELECT query_id, doc_id, CASE WHEN kind IS NULL THEN 'mlp' ELSE 'attention' END,
                   sum(contribution) FROM head_scores GROUP BY ALL
  UNION ALL SELECT query_id, doc_id, 'attention ' || kind, sum(contribution) FROM head_scores
            WHERE kind IS NOT NULL GROUP BY ALL),
ranked AS (SELECT *, row_number() OVER (PARTITION BY query_id, part ORDER BY s DESC, doc_id) AS rank
           FROM parts),
best AS (SELECT query_id, part, min(rank) AS rank FROM ranked JOIN gold USING (query_id, doc_id)
         GROUP BY ALL)
SELECT part, count(*) AS queries, round(avg((rank = 1)::INT), 3) AS recall_at_1,
       round(avg((rank <= 10)::INT), 3) AS recall_at_10, round(avg(1.0 / rank), 3) AS mrr
FROM best GROUP BY part ORDER BY part""",
    "Head blocks that carry most of the gold documents' score (mean contribution per gold "
    "document, and per top-10 other document)": """
WITH gold AS (SELECT query_id, unnest(gold_doc_ids) AS doc_id FROM queries),
other AS (SELECT t.query_id, t.doc_id FROM top_influences t WHERE t.rank <= 10
          AND NOT EXISTS (SELECT 1 FROM gold g WHERE g.query_id = t.query_id AND g.doc_id = t.doc_id)),
g AS (SELECT layer, kind, head, avg(contribution) AS gold_mean
      FROM head_scores JOIN gold USING (query_id, doc_id) WHERE head IS NOT NULL GROUP BY ALL),
o AS (SELECT layer, kind, head, avg(contribution) AS other_mean
      FROM head_scores JOIN other USING (query_id, doc_id) WHERE head IS NOT NULL GROUP BY ALL)
SELECT layer, kind, head, round(gold_mean, 4) AS gold_mean, round(other_mean, 4) AS top10_other_mean
FROM g JOIN o USING (layer, kind, head) ORDER BY gold_mean DESC LIMIT 8""",
    "The top_heads view: how often each head block is a query's rank-1 head": """
SELECT layer, kind, head, count(*) AS queries
FROM top_heads WHERE rank = 1 GROUP BY ALL ORDER BY queries DESC, layer, kind, head LIMIT 6""",
}


def materialize(storage: Path, people: int, split: str) -> Path:
    import dagster as dg

    from attribution_assets.defs.factory import build_definitions
    from attribution_assets.defs.profiles import DeploymentProfile
    from attribution_assets.defs.resources import ComputeResource, StorageResource
    from attribution_assets.defs.runner import materialize_pipeline
    from attribution_assets.spec import GradientSpec, ScoringSpec, demo_spec

    spec = demo_spec(people=people, scoring=ScoringSpec(top_k=0, breakdown=split),
                     gradients=GradientSpec(projection_dim=32, normalizer="adafactor", split=split))
    profile = DeploymentProfile("local", None, StorageResource(root=str(storage)), ComputeResource())
    defs = build_definitions([spec], profile)
    materialize_pipeline(defs, spec, dg.DagsterInstance.ephemeral(), log=lambda _: None,
                         log_level="WARNING")
    return defs.resources["storage"].paths(spec).database


def markdown(columns: list[str], rows: list[tuple]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", type=Path, default=Path(".storage-breakdowns"))
    parser.add_argument("--people", type=int, default=30)
    parser.add_argument("--split", choices=["head", "module"], default="head",
                        help="gradients.split and scoring.breakdown of the pipeline")
    parser.add_argument("--reuse", action="store_true", help="query an already materialized pipeline")
    args = parser.parse_args()
    from attribution_assets.engine.io.paths import PipelinePaths
    from attribution_assets.engine.scoring import database

    started = time.perf_counter()
    db = PipelinePaths.under(args.storage, "demo").database if args.reuse else \
        materialize(args.storage, args.people, args.split)
    print(f"pipeline: {db} ({time.perf_counter() - started:.0f} s)\n")
    with database.connect(db) as con:
        counts = con.execute("SELECT (SELECT count(*) FROM queries), (SELECT count(*) FROM documents), "
                             "(SELECT count(*) FROM (SELECT DISTINCT module FROM module_scores))").fetchone()
        print(f"{counts[0]} queries, {counts[1]} documents, {counts[2]} modules\n")
        for title, sql in (QUERIES if args.split == "head" else MODULE_QUERIES).items():
            result = con.execute(sql)
            columns = [c[0] for c in result.description]
            print(f"### {title}\n\n```sql\n{sql.strip()};\n```\n\n{markdown(columns, result.fetchall())}\n")


if __name__ == "__main__":
    main()
