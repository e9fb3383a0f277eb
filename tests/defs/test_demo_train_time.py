"""The demo with its own training recording train-time rows (``demo.record_epochs``, on by
default): fact tracing from them next to the post-hoc rows, and scores from them."""

import dagster as dg
import numpy as np
import pytest

from attribution_assets.defs.common import key
from attribution_assets.engine.evaluation.metrics import gold_ranks, recall_and_mrr
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.training.stored_rows import training_tags
from attribution_assets.report import latest_metadata, train_time_lines
from attribution_assets.spec import ScoringSpec, SpecValueError, demo_spec
from tests.helpers import materialize_tiny_demo

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # slow: runs first (tests/conftest.py)


def test_demo_reports_fact_tracing_from_train_time_rows(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    spec, paths = materialize_tiny_demo(tmp_path / "storage", instance=instance)
    assert spec.demo.record_epochs == 1 and spec.scoring.train_rows == "post_hoc"
    (store,) = [GradientStore(p) for p in paths.demo_train_time_stores()]  # one shard: the last epoch
    steps, epochs = training_tags(store)
    assert sorted(store.doc_ids) == sorted(d for s in paths.gradient_shards()
                                           for d in GradientStore(paths.train_gradients(s)).doc_ids)
    assert min(epochs) > spec.demo.epochs - 1 and max(epochs) == pytest.approx(spec.demo.epochs)
    meta = latest_metadata(instance, key(spec, "train_time_fact_tracing"))
    want = recall_and_mrr(gold_ranks(paths.database))  # the post-hoc scores the report prints
    for m in ("recall@1", "recall@10", "mrr"):
        assert meta[f"post_hoc_{m}"] == pytest.approx(want[m], abs=1e-12)
        assert 0.0 <= meta[f"train_time_{m}"] <= 1.0
    assert meta["queries"] == want["queries"]
    lines = train_time_lines(spec, meta)
    assert len(lines) == 3 and "train time" in lines[1] and "post hoc" in lines[2]


def test_demo_scores_from_train_time_rows(tmp_path):
    spec, paths = materialize_tiny_demo(tmp_path / "storage", train_rows="train_time")
    recorded: dict[str, np.ndarray] = {}
    for st in (GradientStore(p) for p in paths.demo_train_time_stores()):
        for doc, row in zip(st.doc_ids, np.asarray(st.array)):
            recorded[doc] = recorded.get(doc, 0) + row.astype(np.float64)
    documents = 0
    for shard in paths.gradient_shards():
        store = GradientStore(paths.train_gradients(shard))
        assert store.info["rows"] == len(store.doc_ids)
        for doc, row in zip(store.doc_ids, np.asarray(store.array)):
            np.testing.assert_allclose(row, recorded[doc], rtol=1e-5, atol=1e-7)
            documents += 1
        assert paths.scores(shard).is_file()
    assert documents == len(recorded)
    ranks = gold_ranks(paths.database)
    assert ranks and recall_and_mrr(ranks)["queries"] == len(ranks)
    assert not paths.evaluation.joinpath("train_time_fact_tracing.parquet").exists()


def test_train_time_rows_on_the_demo_need_recording():
    with pytest.raises(SpecValueError, match="record_epochs"):
        demo_spec(record_epochs=0, scoring=ScoringSpec(train_rows="train_time"))
    with pytest.raises(SpecValueError, match="stored"):
        demo_spec(scoring=ScoringSpec(train_rows="train_time", mode="streaming"))
    assert demo_spec(record_epochs=0).records_train_time is False
