"""Fact-tracing metrics from a pipeline's DuckDB views (queries that know their gold documents)."""

from __future__ import annotations

from pathlib import Path

from attribution_assets.engine.scoring.database import connect

GOLD_RANKS_SQL = """
SELECT t.query_id, min(t.rank) AS first_gold_rank
FROM top_influences t JOIN queries q USING (query_id)
WHERE list_contains(q.gold_doc_ids, t.source_doc_id)
GROUP BY t.query_id
"""


def gold_ranks(db: Path) -> dict[str, int]:
    """Rank of the first gold document of every query that has gold documents."""
    with connect(db) as con:
        return dict(con.execute(GOLD_RANKS_SQL).fetchall())


def recall_and_mrr(ranks: dict[str, int], ks: tuple[int, ...] = (1, 10, 50)) -> dict[str, float]:
    """``recall@k``: fraction of queries whose first gold document ranks within k; MRR."""
    values = list(ranks.values())
    if not values:
        raise ValueError("no query has a gold document among the scored documents")
    out = {f"recall@{k}": sum(r <= k for r in values) / len(values) for k in ks}
    out["mrr"] = sum(1.0 / r for r in values) / len(values)
    out["queries"] = len(values)
    return out
