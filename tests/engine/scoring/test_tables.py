"""Score tables: per-token score tables, top-k tables; the normalizer configuration error."""

import dataclasses

import numpy as np
import polars as pl
import pytest
from transformers import AutoModelForCausalLM

from attribution_assets.engine.gradients.batching import row_positions
from attribution_assets.engine.gradients.collect import (
    collect,
    make_collector,
    optimizer_state_source,
)
from attribution_assets.engine.gradients.store import document_rows
from attribution_assets.engine.io import data
from attribution_assets.engine.preconditioning.autocorrelation import accumulate
from attribution_assets.engine.preconditioning.preconditioners import Preconditioner
from attribution_assets.engine.scoring.run import QueryScorer
from attribution_assets.engine.scoring.tables import top_columns, write_scores, write_token_scores
from attribution_assets.spec import DataSpec, GradientSpec, ScoringSpec, demo_spec
from tests.helpers import SENTENCES


def _docs(tokenizer):
    rows, _ = data.tokenize_documents(data.build_documents([{"text": s} for s in SENTENCES], DataSpec()),
                                      tokenizer, DataSpec())
    return rows


@pytest.mark.parametrize("mode", ["loss", "positional"])
def test_per_token_inner_product_scores_sum_to_document_scores(tmp_path, tiny_model_dir, tiny_tokenizer, mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    spec = dataclasses.replace(demo_spec(), gradients=GradientSpec(projection_dim=4, per_token=mode))
    collector = make_collector(model, spec)
    docs = _docs(tiny_tokenizer)
    array, info, _ = collect(collector, docs)
    assert array.shape[0] == sum(len(row_positions(d.loss_mask, mode)) for d in docs)
    doc_rows = document_rows(array, info)
    scoring = ScoringSpec(metric="inner_product")
    precond = Preconditioner.from_autocorrelation(accumulate([doc_rows], info["modules"]), None, lam=None)
    scorer = QueryScorer(doc_rows[:2], ["a", "b"], precond, scoring)
    doc_scores = scorer.score(doc_rows)
    token_scores = scorer.score(array)
    ids = [d.doc_id for d in docs]
    write_token_scores(tmp_path / "t.parquet", token_scores, ["a", "b"], ids, info, "s0")
    table = pl.read_parquet(tmp_path / "t.parquet")
    assert table.columns == ["query_id", "doc_id", "shard", "token", "score"]
    summed = table.group_by("query_id", "doc_id").agg(pl.col("score").sum())
    for q, query_id in enumerate(["a", "b"]):
        got = dict(summed.filter(pl.col("query_id") == query_id).select("doc_id", "score").iter_rows())
        np.testing.assert_allclose([got[d] for d in ids], doc_scores[q], rtol=1e-4, atol=1e-4)


def test_write_scores_keeps_top_k_per_query(tmp_path):
    scores = np.array([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    n = write_scores(tmp_path / "s.parquet", scores, ["q0", "q1"], ["a", "b", "c", "d"], "s0", top_k=2)
    table = pl.read_parquet(tmp_path / "s.parquet")
    assert n == 4 and table.schema["score"] == pl.Float32
    assert table.filter(pl.col("query_id") == "q0")["doc_id"].to_list() == ["b", "d"]
    assert table.filter(pl.col("query_id") == "q1")["doc_id"].to_list() == ["a", "b"]


@pytest.mark.parametrize("seed", range(5))
def test_top_columns_equal_a_stable_full_sort_with_ties(seed):
    """The partition path keeps exactly the columns (and order) of ``argsort(-scores, stable)``,
    ties at the k-th score included; NaN rows take the full sort."""
    rng = np.random.default_rng(seed)
    for _ in range(40):
        q, n = int(rng.integers(1, 8)), int(rng.integers(2, 80))
        top_k = int(rng.integers(1, n))
        scores = rng.integers(-3, 4, size=(q, n)).astype(np.float32)  # few values: many ties
        if rng.random() < 0.2:
            scores[0, int(rng.integers(n))] = np.nan
        expected = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
        np.testing.assert_array_equal(top_columns(scores, top_k), expected)
    np.testing.assert_array_equal(top_columns(scores, 0), np.tile(np.arange(n), (q, 1)))


def test_normalizer_without_optimizer_state_is_refused():
    spec = dataclasses.replace(demo_spec(), gradients=GradientSpec(normalizer="adam"))
    with pytest.raises(ValueError, match="optimizer_state"):
        optimizer_state_source(spec, None)
