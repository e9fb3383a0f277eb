"""The full embedded demo, as `make demo` runs it: model quality and fact-tracing quality.

Thresholds are measured, not tuned (docs/trackstar.md): on this machine the demo model
reached 99.75% on training phrasings, and TrackStar put a gold document in the top 10
for 84.75% of the 400 queries (MRR 0.71). The asserts leave room for run-to-run float
differences across thread counts, not for a real regression.
"""

import dagster as dg
import numpy as np
import pytest

from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.evaluation.metrics import gold_ranks, recall_and_mrr
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.scoring.run import (
    QueryScorer,
    load_preconditioner,
    prepared_training_blocks,
)
from attribution_assets.engine.search.index import FaissIndex, build_index, recall_at_k
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
    metrics = recall_and_mrr(gold_ranks(tmp_path / "demo" / "attribution.duckdb"))
    assert metrics["queries"] == 400
    assert metrics["recall@10"] >= 0.75, metrics
    assert metrics["mrr"] >= 0.6, metrics
    queries_recall, documents_recall = _ivf_recall_at_10(spec, PipelinePaths.under(tmp_path, "demo"))
    # Calibration picks nprobe 40-41 of 43 lists here; a fixed 32 gave 0.86 for the demo's
    # queries (0.96 for documents): their preconditioned gradients lie away from every
    # training cluster (docs/index-benchmark.md). Measured held-out: 0.97, documents 0.99.
    assert queries_recall >= 0.95 and documents_recall >= 0.95, (queries_recall, documents_recall)


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
