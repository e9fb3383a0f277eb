"""A pipeline's overview from its DuckDB views (``engine.scoring.database``): fact-tracing
figures where queries know their gold documents, the distribution of every score (log-count
histogram, percentiles) and a sample of queries, failures included, with their top documents
and the rank of their first gold document. Cheap: SQL over the score Parquet files.

Conventions: a query's rank 1 is its highest score (ties: smaller ``doc_id`` first,
``top_influences``); a gold document is one whose ``source_doc_id`` is in the query's
``gold_doc_ids``. Recall@k and MRR count every query with gold documents, those whose gold
documents have no kept score (``scoring.top_k``) as misses (reciprocal rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from attribution_assets.engine.explain import plots
from attribution_assets.engine.scoring.database import connect

RECALL_KS = (1, 10, 50)
PERCENTILES = plots.PERCENTILES
SAMPLE_SUCCESSES, SAMPLE_FAILURES, SAMPLE_DOCS = 3, 3, 5
FAILURE_RANK = 10  # a query "fails" when no gold document is in its top FAILURE_RANK
TEXT_CHARS = 90  # document text shown per row

_RANKS_SQL = """
WITH gold AS (SELECT query_id FROM queries WHERE len(gold_doc_ids) > 0),
first AS (SELECT t.query_id, min(t.rank) AS rank FROM top_influences t JOIN queries q USING (query_id)
          WHERE list_contains(q.gold_doc_ids, t.source_doc_id) GROUP BY t.query_id)
SELECT g.query_id, f.rank FROM gold g LEFT JOIN first f USING (query_id) ORDER BY g.query_id
"""

_TOP_SQL = """
SELECT t.rank, t.score, t.doc_id, coalesce(list_contains(q.gold_doc_ids, t.source_doc_id), false) AS gold, t.text
FROM top_influences t LEFT JOIN queries q USING (query_id) WHERE t.query_id = ? AND t.rank <= ? ORDER BY t.rank
"""

_GOLD_SQL = """
SELECT t.rank, t.score FROM top_influences t JOIN queries q USING (query_id)
WHERE t.query_id = ? AND list_contains(q.gold_doc_ids, t.source_doc_id) ORDER BY t.rank LIMIT 1
"""


@dataclass
class SampleQuery:
    """One sampled query: its text, top documents ``(rank, score, doc_id, gold, text)``, and its
    first gold document's ``(rank, score)`` (None: no gold kept, or no gold documents known)."""

    query_id: str
    text: str
    has_gold: bool
    first_gold: tuple[int, float] | None
    top: list[tuple[int, float, str, bool, str]] = field(default_factory=list)


@dataclass
class Overview:
    """Counts, fact tracing (empty without gold documents), the score histogram ``(edges
    [bins + 1], counts [bins])``, percentiles ``{50.0: score}`` and sampled queries."""

    queries: int
    scores: int
    gold_queries: int
    fact_tracing: dict[str, float]
    edges: np.ndarray
    counts: np.ndarray
    percentiles: dict[float, float]
    top1_median: float | None
    gold_median: float | None
    samples: list[SampleQuery]


def _histogram(con, bins: int) -> tuple[np.ndarray, np.ndarray, int]:
    lo, hi, n = con.execute("SELECT min(score), max(score), count(*) FROM scores "
                            "WHERE isfinite(score)").fetchone()
    if not n:
        return np.zeros(1), np.zeros(0), 0
    if hi <= lo:
        hi = lo + 1e-6
    width = (hi - lo) / bins
    rows = con.execute("SELECT least(CAST(floor((score - ?) / ?) AS BIGINT), ?) AS b, count(*) FROM scores "
                       "WHERE isfinite(score) GROUP BY b", [lo, width, bins - 1]).fetchall()
    counts = np.zeros(bins)
    for b, c in rows:
        counts[int(b)] = c
    return lo + width * np.arange(bins + 1), counts, int(n)


def _sample(ranks: dict[str, int | None], ids: list[str]) -> list[str]:
    """Successes (a gold document at rank 1) and failures (none in the top ``FAILURE_RANK``),
    each spread over the sorted query ids; without gold documents, queries spread over all."""
    def spread(items: list[str], n: int) -> list[str]:
        if len(items) <= n:
            return items
        return [items[round(i * (len(items) - 1) / (n - 1))] for i in range(n)] if n > 1 else items[:1]

    if not ranks:
        return spread(ids, SAMPLE_SUCCESSES + SAMPLE_FAILURES)
    hits = sorted(q for q, r in ranks.items() if r == 1)
    misses = sorted(q for q, r in ranks.items() if r is None or r > FAILURE_RANK)
    middle = sorted(q for q, r in ranks.items() if r is not None and 1 < r <= FAILURE_RANK)
    failures = spread(misses, SAMPLE_FAILURES)
    chosen = spread(hits, SAMPLE_SUCCESSES) + spread(middle, 1) + failures
    return sorted(set(chosen), key=chosen.index)


def pipeline_overview(db: Path, bins: int = 60, per_query: bool = True) -> Overview:
    """The overview of the pipeline whose DuckDB file (views over its Parquet files) is ``db``;
    ``per_query`` False: the scores rank an aggregate of the queries (``scoring.aggregate``), so
    no fact tracing."""
    with connect(db) as con:
        con.execute("SET enable_progress_bar = false")  # a step's log, not a terminal
        n_queries = con.execute("SELECT count(*) FROM queries").fetchone()[0]
        edges, counts, n_scores = _histogram(con, bins)
        if not n_scores:
            raise ValueError(f"{db}: the `scores` view holds no finite score; materialize `scores` first.")
        qs = con.execute("SELECT quantile_cont(score, ?) FROM scores WHERE isfinite(score)",
                         [[q / 100 for q in PERCENTILES]]).fetchone()[0]
        percentiles = {q: float(v) for q, v in zip(PERCENTILES, qs)}
        top1 = con.execute("SELECT median(score) FROM top_influences WHERE rank = 1").fetchone()[0]
        ranks = dict(con.execute(_RANKS_SQL).fetchall()) if per_query else {}
        ids = [r[0] for r in con.execute("SELECT DISTINCT query_id FROM scores ORDER BY query_id").fetchall()]
        figures: dict[str, float] = {}
        gold_median = None
        if ranks:
            found = [r for r in ranks.values() if r is not None]
            figures = {f"recall@{k}": sum(r <= k for r in found) / len(ranks) for k in RECALL_KS}
            figures["mrr"] = sum(1.0 / r for r in found) / len(ranks)
            gold_median = con.execute("SELECT median(t.score) FROM top_influences t JOIN queries q USING "
                                      "(query_id) WHERE list_contains(q.gold_doc_ids, t.source_doc_id)").fetchone()[0]
        samples = []
        for query_id in _sample(ranks, ids):
            text, gold_ids = con.execute("SELECT text, gold_doc_ids FROM queries WHERE query_id = ?",
                                         [query_id]).fetchone() or (query_id, None)  # an aggregate
            first = con.execute(_GOLD_SQL, [query_id]).fetchone() if gold_ids else None
            top = [(int(r), float(s), d, bool(g), t) for r, s, d, g, t in
                   con.execute(_TOP_SQL, [query_id, SAMPLE_DOCS]).fetchall()]
            samples.append(SampleQuery(query_id, text, bool(gold_ids),
                                       (int(first[0]), float(first[1])) if first else None, top))
    return Overview(n_queries, n_scores, len(ranks), figures, edges, counts, percentiles,
                    None if top1 is None else float(top1), None if gold_median is None else float(gold_median),
                    samples)


def _md(text: str) -> str:
    return "".join("\\" + ch if ch in "\\`*_[]<>#|~" else ch for ch in text).replace("\n", " ")


def summary_markdown(overview: Overview) -> str:
    """Fact tracing and what a score means (percentiles), as Markdown tables."""
    o = overview
    lines = [f"**{o.scores:,} scores** of {o.queries} queries"]
    if o.fact_tracing:
        lines += ["", f"Fact tracing over the {o.gold_queries} queries with gold documents (a query whose gold "
                      "documents have no kept score counts as a miss):", "",
                  "| " + " | ".join(o.fact_tracing) + " |", "|" + "---:|" * len(o.fact_tracing),
                  "| " + " | ".join(f"{v:.3f}" for v in o.fact_tracing.values()) + " |"]
    else:
        lines += ["", "No query knows its gold documents: no recall or MRR (give the queries a `gold_column`)."]
    lines += ["", "What a score means: the share of all scores below it.", "",
              "| percentile | score |", "|---|---:|"]
    lines += [f"| p{q:g} | {v:+.4f} |" for q, v in o.percentiles.items()]
    if o.top1_median is not None:
        lines.append(f"| median best score of a query | {o.top1_median:+.4f} |")
    if o.gold_median is not None:
        lines.append(f"| median score of a gold document | {o.gold_median:+.4f} |")
    return "\n".join(lines)


def samples_markdown(overview: Overview) -> str:
    """Per sampled query its top documents and the rank of its first gold document."""
    out = [f"**Sample queries**: successes (a gold document ranked first) and failures (no gold document in "
           f"the top {FAILURE_RANK}); ✓ marks a gold document."]
    for s in overview.samples:
        if not s.has_gold:
            where = "no gold documents known"
        elif s.first_gold is None:
            where = "**first gold document: not among the kept scores**"
        else:
            where = f"**first gold document at rank {s.first_gold[0]}** (score {s.first_gold[1]:+.4f})"
        out += ["", f"Query `{s.query_id}`: {_md(s.text)}; {where}", "",
                "| rank | score | gold | document |", "|---:|---:|:---:|---|"]
        for rank, score, _, gold, text in s.top:
            shown = text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS - 1] + "…"
            out.append(f"| {rank} | {score:+.4f} | {'✓' if gold else ''} | {_md(shown)} |")
    return "\n".join(out)


def overview_histogram(overview: Overview, path: Path, title: str) -> Path:
    """The pipeline's score distribution (log counts, percentiles) at ``path``."""
    return plots.histogram_plot(overview.edges, overview.counts, overview.percentiles, path, title)
