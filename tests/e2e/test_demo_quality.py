"""The full embedded demo, as `make demo` runs it: model quality and fact-tracing quality.

Thresholds are measured, not tuned (docs/evaluation.md, "Results on the demo"): the demo
model (12 training phrasings per fact, 12 epochs, trained with one torch thread and fused
AdamW whatever the machine) reached 99.0% on training phrasings and 62.8% on the held-out
query phrasings; TrackStar (adafactor, p = 32) reached recall@10 0.82 and MRR 0.661 over the
400 queries. Other draws of the same recipe (two threads, another seed, 16 epochs) gave
held-out accuracy 0.40-0.68 and MRR 0.66-0.78: both swing with float rounding and the corpus
draw. BM25 (full query text) recall@10 0.938: it misses every one of the 25 alias queries,
whose gold documents do not name the person.
The asserts leave room for float differences between CPUs and BLAS builds, not for a real
regression.
"""

import dagster as dg
import numpy as np
import polars as pl
import pytest

from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.evaluation.fact_tracing import first_gold_ranks
from attribution_assets.engine.evaluation.methods import bm25_scores
from attribution_assets.engine.evaluation.metrics import gold_ranks, recall_and_mrr
from attribution_assets.engine.io.data import read_tokenized
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.scoring.run import (
    QueryScorer,
    load_preconditioner,
    prepared_training_blocks,
)
from attribution_assets.engine.search.build import build_index
from attribution_assets.engine.search.index import FaissIndex, recall_at_k
from attribution_assets.report import latest_metadata
from attribution_assets.spec import IndexSpec, demo_spec
from tests.helpers import definitions_for


def test_recall_and_mrr_hand_computed():
    metrics = recall_and_mrr({"a": 1, "b": 4, "c": 20, "d": 100})
    assert metrics["recall@1"] == 0.25 and metrics["recall@10"] == 0.5 and metrics["recall@50"] == 0.75
    assert metrics["mrr"] == pytest.approx((1 + 0.25 + 0.05 + 0.01) / 4)


@pytest.mark.slow
def test_full_demo_traces_facts(tmp_path):
    spec = demo_spec()
    defs = definitions_for([spec], tmp_path)
    instance = dg.DagsterInstance.ephemeral()
    materialize_pipeline(defs, spec, instance, log=lambda _: None, log_level="WARNING")
    model = latest_metadata(instance, dg.AssetKey(["demo", "model"]))
    assert model["train_phrasing_accuracy"] >= 0.95
    assert model["held_out_phrasing_accuracy"] >= 0.38, model
    metrics = recall_and_mrr(gold_ranks(tmp_path / "demo" / "attribution.duckdb"))
    assert metrics["queries"] == 400
    assert metrics["recall@10"] >= 0.78, metrics
    assert metrics["mrr"] >= 0.62, metrics
    paths = PipelinePaths.under(tmp_path, "demo")
    assert _bm25_recall_at_10(paths) <= 0.95  # word overlap misses the alias facts
    queries_recall, documents_recall = _ivf_recall_at_10(spec, paths)
    # Calibration picks nprobe 40-41 of 43 lists here; a fixed 32 gave 0.86 for the demo's
    # queries (0.96 for documents): their preconditioned gradients lie away from every
    # training cluster (docs/index-benchmark.md). Measured held-out: 0.97, documents 0.99.
    assert queries_recall >= 0.95 and documents_recall >= 0.95, (queries_recall, documents_recall)


def _bm25_recall_at_10(paths):
    """BM25 of the full query text (prompt and answer) against every training document."""
    docs = [d for s in paths.tokenized_shards() for d in read_tokenized(paths.tokens(s))]
    queries = read_tokenized(paths.query_tokens)
    table = pl.read_parquet(paths.queries)
    gold = dict(zip(table["doc_id"].to_list(), table["gold_doc_ids"].to_list(), strict=True))
    scores = bm25_scores([d.text for d in docs], [q.text for q in queries])
    ranks = first_gold_ranks(scores, [d.source_id for d in docs], [q.doc_id for q in queries], gold)
    return recall_and_mrr(ranks)["recall@10"]


def _ivf_recall_at_10(spec, paths):
    """Recall@10 against the pipeline's Flat index of an IVF index with the default
    (``auto``) nprobe calibrated on a random half of the demo's queries, for the other
    half and for 200 training documents used as queries. A random half, not every other
    row: the queries cycle through four relations, so even and odd rows differ."""
    shards = paths.gradient_shards()
    precond = load_preconditioner(spec, paths)
    prepared = QueryScorer.for_pipeline(spec, paths, preconditioner=precond).prepared
    calibrate = np.zeros(len(prepared), bool)
    calibrate[np.random.default_rng(0).permutation(len(prepared))[:len(prepared) // 2]] = True
    ivf = build_index(lambda: prepared_training_blocks(paths, shards, precond, spec.scoring.metric),
                      IndexSpec(factory="IVF{auto},Flat"), paths.root / "ivf_index",
                      calibration=prepared[calibrate])
    assert ivf.factory.startswith("IVF") and ivf.calibration["source"] == "queries"
    documents = next(prepared_training_blocks(paths, shards[:1], precond, spec.scoring.metric))[1][:200]
    recalls = []
    for rows in (prepared[~calibrate], documents):
        exact, _ = FaissIndex.load(paths.faiss_index).search(rows, 10)
        approx, _ = FaissIndex.load(paths.root / "ivf_index").search(rows, 10)
        recalls.append(recall_at_k(approx, exact, 10))
    return recalls
