"""Score breakdowns: per-block contributions add up to the score and equal a float64 brute force."""

import numpy as np
import polars as pl
import pytest
import scipy.linalg

from attribution_assets.engine.gradients.collect import ShardRows
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.autocorrelation import AutocorrelationAccumulator
from attribution_assets.engine.preconditioning.preconditioners import Preconditioner
from attribution_assets.engine.scoring.breakdown import breakdown_groups
from attribution_assets.engine.scoring.run import QueryScorer
from attribution_assets.engine.scoring.tables import BLOCK_COLUMNS
from attribution_assets.spec import ScoringSpec
from tests.engine.scoring.test_scoring import unit

# Two layers: an attention module split into head blocks, then an MLP module left whole.
LAYOUT = [
    {"name": "layers.0.attn.qkv[q:0]", "start": 0, "stop": 3, "module": "layers.0.attn.qkv", "layer": 0,
     "head": 0, "kind": "q"},
    {"name": "layers.0.attn.qkv[q:1]", "start": 3, "stop": 5, "module": "layers.0.attn.qkv", "layer": 0,
     "head": 1, "kind": "q"},
    {"name": "layers.0.attn.dense[o:0]", "start": 5, "stop": 8, "module": "layers.0.attn.dense", "layer": 0,
     "head": 0, "kind": "o"},
    {"name": "layers.0.mlp", "start": 8, "stop": 12},
    {"name": "layers.1.mlp", "start": 12, "stop": 16},
]
DIMS = 16


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(3)
    train = rng.normal(size=(23, DIMS)).astype(np.float32)
    query = rng.normal(size=(4, DIMS)).astype(np.float32)
    r_train = AutocorrelationAccumulator(LAYOUT).update(train).finalize()
    r_query = AutocorrelationAccumulator(LAYOUT).update(query).finalize()
    return train, query, Preconditioner.from_autocorrelation(r_train, r_query, lam=0.3, damping=0.2)


def brute_force_contributions(query, train, p, metric, aggregate, groups):
    """``[q', n, G]`` float64: contributions from explicit block-diagonal operators."""
    half, inv = explicit_ops_for(p)
    q, t = query.astype(np.float64), train.astype(np.float64)
    if metric == "cosine":
        qv, tv = unit(q @ half), unit(t @ half)
    else:
        qv, tv = q @ inv, t
        if aggregate in ("mean", "sum"):
            qv = unit(qv)
    if aggregate == "mean":
        qv = qv.mean(axis=0, keepdims=True)
    elif aggregate == "sum":
        qv = qv.sum(axis=0, keepdims=True)
    out = np.stack([qv[:, g.start:g.stop] @ tv[:, g.start:g.stop].T for g in groups], axis=-1)
    if aggregate == "nearest":
        best = (qv @ tv.T).argmax(axis=0)
        out = out[best, np.arange(t.shape[0])][None]
    return out


def explicit_ops_for(p):
    """Full ``[d, d]`` ``P^{-1/2}`` and ``P^{-1}`` (scipy block_diag, sqrtm, inv; no eigh)."""
    halves, invs = [], []
    for m in p.layout:
        r = p.matrices[m.name]
        damped = r + p.damping * np.trace(r) / len(r) * np.eye(len(r))
        halves.append(np.linalg.inv(scipy.linalg.sqrtm(damped).real))
        invs.append(np.linalg.inv(damped))
    return scipy.linalg.block_diag(*halves), scipy.linalg.block_diag(*invs)


@pytest.mark.parametrize("metric", ["cosine", "inner_product"])
@pytest.mark.parametrize("aggregate", ["individual", "mean", "sum", "nearest"])
@pytest.mark.parametrize("level", ["module", "head"])
def test_contributions_sum_to_the_score_and_match_brute_force(data, metric, aggregate, level):
    train, query, p = data
    scorer = QueryScorer(query, [f"q{i}" for i in range(len(query))], p, ScoringSpec(metric=metric),
                         aggregate=aggregate)
    scores = scorer.score(train)
    values, pair_queries, pair_docs, groups = scorer.breakdown(train, LAYOUT, scores, top_k=0, level=level)
    assert len(groups) == (5 if level == "head" else 4)
    rows = np.array([scorer.query_ids.index(q) for q in pair_queries])
    np.testing.assert_allclose(values.sum(axis=1), scores[rows, pair_docs], rtol=0, atol=1e-5)
    expected = brute_force_contributions(query, train, p, metric, aggregate, groups)
    np.testing.assert_allclose(values, expected[rows, pair_docs], rtol=0, atol=2e-5)


def test_module_groups_merge_head_blocks_and_head_level_needs_head_blocks():
    module = breakdown_groups(LAYOUT, "module")
    assert [(g.module, g.layer, g.start, g.stop) for g in module] == [
        ("layers.0.attn.qkv", 0, 0, 5), ("layers.0.attn.dense", 0, 5, 8), ("layers.0.mlp", 0, 8, 12),
        ("layers.1.mlp", 1, 12, 16)]
    heads = breakdown_groups(LAYOUT, "head")
    assert [(g.head, g.kind) for g in heads] == [(0, "q"), (1, "q"), (0, "o"), (None, None), (None, None)]
    whole = [{"name": "a.0.x", "start": 0, "stop": 4}, {"name": "a.1.x", "start": 4, "stop": 9}]
    with pytest.raises(ValueError, match="gradients.split: head"):
        breakdown_groups(whole, "head")


@pytest.mark.parametrize("top_k", [0, 3])
def test_block_table_keeps_the_score_tables_pairs_and_adds_up(data, tmp_path, top_k):
    train, query, p = data
    paths = PipelinePaths(tmp_path)
    ids = [f"d{j}" for j in range(len(train))]
    scorer = QueryScorer(query, ["a", "b", "c", "d"], p, ScoringSpec(breakdown="head"))
    shard = ShardRows("shard-00000", train, {"modules": LAYOUT, "per_token": False}, ids)
    result = scorer.write_shard(shard, paths, top_k)
    scores = pl.read_parquet(paths.scores("shard-00000"))
    blocks = pl.read_parquet(paths.block_scores("shard-00000"))
    assert blocks.columns == BLOCK_COLUMNS and result.block_rows == blocks.height == 5 * scores.height
    assert blocks.schema["layer"] == pl.Int32 and blocks.schema["contribution"] == pl.Float32
    summed = blocks.group_by("query_id", "doc_id").agg(pl.col("contribution").sum())
    joined = scores.join(summed, on=["query_id", "doc_id"], how="full", coalesce=True)
    assert joined.null_count().sum_horizontal()[0] == 0  # the same pairs on both sides
    np.testing.assert_allclose(joined["contribution"], joined["score"], rtol=0, atol=1e-5)
    mlp = blocks.filter(pl.col("module") == "layers.1.mlp")
    assert mlp["head"].null_count() == mlp.height and set(mlp["layer"]) == {1}
    no_breakdown = QueryScorer(query, ["a", "b", "c", "d"], p, ScoringSpec())
    no_breakdown.write_shard(shard, paths, top_k)
    assert not paths.block_scores("shard-00000").exists()
