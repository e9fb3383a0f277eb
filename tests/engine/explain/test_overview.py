"""The pipeline overview against a ground truth computed here from the score Parquet files and
the query table of the tiny demo: counts, histogram, percentiles, recall@k / MRR, sampled
queries and their first gold ranks."""

import numpy as np
import polars as pl
import pytest

from attribution_assets.engine.evaluation.metrics import gold_ranks, recall_and_mrr
from attribution_assets.engine.explain.overview import (
    FAILURE_RANK,
    overview_histogram,
    pipeline_overview,
    samples_markdown,
    summary_markdown,
)


def _truth(paths):
    """Every score, and each gold query's first gold rank (None: no gold scored), by numpy."""
    scores = pl.read_parquet(str(paths.scores_glob))
    tokens = pl.read_parquet(str(paths.tokens_glob), columns=["doc_id", "source_doc_id"])
    source = dict(zip(tokens["doc_id"], tokens["source_doc_id"].fill_null(tokens["doc_id"])))
    queries = pl.read_parquet(paths.queries)
    ranks = {}
    for query_id, gold in zip(queries["doc_id"], queries["gold_doc_ids"]):
        if not len(gold):
            continue
        rows = scores.filter(pl.col("query_id") == query_id).sort(["score", "doc_id"], descending=[True, False])
        hit = [i for i, d in enumerate(rows["doc_id"], 1) if source[d] in set(gold)]
        ranks[query_id] = hit[0] if hit else None
    return scores["score"].to_numpy(), ranks


def test_overview_matches_the_score_tables(tiny_demo, tmp_path):
    spec, paths = tiny_demo
    overview = pipeline_overview(paths.database)
    values, ranks = _truth(paths)
    assert overview.scores == len(values) and overview.counts.sum() == len(values)
    assert overview.edges[0] == values.min() and np.isclose(overview.edges[-1], values.max())
    bins, lo = len(overview.counts), float(values.min())
    width = (float(values.max()) - lo) / bins
    which = np.minimum(np.floor((values.astype(np.float64) - lo) / width).astype(int), bins - 1)
    np.testing.assert_array_equal(overview.counts, np.bincount(which, minlength=bins))
    for q, v in overview.percentiles.items():
        assert abs(v - np.percentile(values, q)) < 1e-6
    found = [r for r in ranks.values() if r is not None]
    assert overview.gold_queries == len(ranks)
    assert overview.fact_tracing["recall@1"] == sum(r == 1 for r in found) / len(ranks)
    assert overview.fact_tracing["recall@10"] == sum(r <= 10 for r in found) / len(ranks)
    assert abs(overview.fact_tracing["mrr"] - sum(1 / r for r in found) / len(ranks)) < 1e-12
    if len(found) == len(ranks):  # every gold document scored (top_k 0): the demo report's figures
        assert overview.fact_tracing == pytest.approx(
            {k: v for k, v in recall_and_mrr(gold_ranks(paths.database)).items() if k != "queries"}, abs=1e-12)
    # the sample holds successes and every kind of failure the pipeline has, each with its true rank
    sampled = {s.query_id: s for s in overview.samples}
    assert any(s.first_gold and s.first_gold[0] == 1 for s in sampled.values())
    if any(r is None or r > FAILURE_RANK for r in ranks.values()):
        assert any(s.first_gold is None or s.first_gold[0] > FAILURE_RANK for s in sampled.values())
    for query_id, s in sampled.items():
        assert (s.first_gold[0] if s.first_gold else None) == ranks[query_id]
        assert [row[0] for row in s.top] == list(range(1, len(s.top) + 1))
    summary, samples = summary_markdown(overview), samples_markdown(overview)
    assert "| recall@1 | recall@10 | recall@50 | mrr |" in summary and "| p99 |" in summary
    assert samples.count("Query `") == len(sampled) and "first gold document at rank 1**" in samples
    png = overview_histogram(overview, tmp_path / "h.png", "demo").read_bytes()
    assert png.startswith(b"\x89PNG") and int.from_bytes(png[16:20], "big") == 800
