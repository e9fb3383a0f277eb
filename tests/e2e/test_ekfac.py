"""EK-FAC end to end on a tiny demo (``kfac_space: projected``, the default): the asset graph
(per-shard covariance and correction partitions, merged factors, eigendecomposition,
preconditioned query rows) feeds the same score tables, module breakdowns, FAISS index,
Attributor and DuckDB views; the score table equals a brute-force influence from plain
autograd query gradients, also with biases (the demo's GPT-NeoX has them) and two label draws
per document."""

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from attribution_assets.engine.gradients.projection import projection_matrix
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.io import data
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector
from attribution_assets.engine.preconditioning.kfac import (
    CorrectionSums,
    KroneckerEigen,
)
from attribution_assets.engine.scoring import database
from attribution_assets.engine.scoring.run import load_kronecker
from attribution_assets.engine.search.attributor import Attributor
from attribution_assets.spec import CurvatureSpec, GradientSpec
from tests.helpers import definitions_for, materialize_tiny_demo, tiny_demo_spec

KFAC_ASSETS = ("kfac_covariance", "kfac_factors", "kfac_eigendecomposition", "ekfac_correction",
               "ekfac_eigenvalues", "kfac_query_gradients")


@pytest.fixture(scope="module")
def ekfac_demo(tmp_path_factory):
    results = []
    spec, paths = materialize_tiny_demo(tmp_path_factory.mktemp("ekfac"), gradients=GradientSpec(projection_dim=8),
                                        results=results, preconditioner="ekfac", metric="inner_product",
                                        breakdown="module")
    return spec, paths, results


def _docs(paths):
    shards = paths.gradient_shards()
    return shards, [d for s in shards for d in data.read_tokenized(paths.tokens(s))]


def test_asset_graph_partitions_checks_and_no_trackstar_assets(ekfac_demo):
    spec, paths, results = ekfac_demo
    materialized = {e.asset_key.path[-1] for r in results for e in r.get_asset_materialization_events()}
    assert set(KFAC_ASSETS) <= materialized and not {"autocorrelation", "preconditioner"} & materialized
    checks = [c for r in results for c in r.get_asset_check_evaluations()]
    assert checks and all(c.passed for c in checks), [(c.asset_key, c.check_name) for c in checks if not c.passed]
    assert {c.check_name for c in checks if c.asset_key.path[-1] in KFAC_ASSETS} >= {
        "finite", "positive_after_damping", "row_count"}
    shards, docs = _docs(paths)
    assert len(shards) > 1 and all(paths.kfac_covariance(s).is_dir() and paths.ekfac_correction(s).is_dir()
                                   for s in shards)
    # the merged partitions equal one pass over every document
    model = AutoModelForCausalLM.from_pretrained(paths.model).float().eval()
    collector = CurvatureCollector(model, spec.gradients, spec.scoring.kfac_labels, spec.scoring.kfac_seed)
    eigen = KroneckerEigen.load(paths.kfac_eigendecomposition)
    whole = collector.correction([(d.input_ids, d.loss_mask) for d in docs], eigen)
    merged = CorrectionSums.load(paths.ekfac_eigenvalues)
    assert merged.sequences == len(docs)
    for m in merged.modules:
        np.testing.assert_allclose(merged.curvature(m.name), whole.curvature(m.name), rtol=1e-6,
                                   atol=1e-9 * whole.curvature(m.name).max())


def test_score_table_equals_brute_force_influence(ekfac_demo):
    spec, paths, _ = ekfac_demo
    model = AutoModelForCausalLM.from_pretrained(paths.model).float().eval()
    ekfac, p = load_kronecker(spec, paths), spec.gradients.projection_dim
    queries = data.read_tokenized(paths.query_tokens)[:4]
    shards, docs = _docs(paths)
    train = np.concatenate([np.asarray(GradientStore(paths.train_gradients(s)).array) for s in shards])
    modules = GradientStore(paths.train_gradients(shards[0])).info["modules"]
    table = pl.read_parquet(paths.scores_glob)
    position = {d.doc_id: j for j, d in enumerate(docs)}
    for query in queries:
        model.zero_grad()
        ids = torch.tensor([query.input_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        (nll * torch.tensor(query.loss_mask[1:], dtype=torch.float32)).sum().backward()
        blocks = []
        assert ekfac.projected
        for m in modules:
            weight = model.get_submodule(m["name"]).weight
            left = projection_matrix(spec.gradients.seed, m["name"], "out", p, weight.shape[0]).double()
            right = projection_matrix(spec.gradients.seed, m["name"], "in", p, weight.shape[1]).double()
            blocks.append(ekfac.apply_full(m["name"], left @ weight.grad.double() @ right.T).reshape(-1).numpy())
        expected = train.astype(np.float64) @ np.concatenate(blocks)
        got = table.filter(pl.col("query_id") == query.doc_id)
        cols = [position[d] for d in got["doc_id"]]
        np.testing.assert_allclose(got["score"].to_numpy(), expected[cols], rtol=1e-3,
                                   atol=1e-3 * np.abs(expected).max())
    # the module breakdown (main's scoring.breakdown) sums to the EK-FAC score of each pair
    blocks = pl.read_parquet(paths.block_scores_glob).group_by(["query_id", "doc_id"]).agg(
        pl.col("contribution").sum(), pl.len().alias("modules"))
    joined = table.join(blocks, on=["query_id", "doc_id"])
    assert joined.height == table.height and (joined["modules"] == len(modules)).all()
    np.testing.assert_allclose(joined["contribution"].to_numpy(), joined["score"].to_numpy(), rtol=1e-4,
                               atol=1e-5 * np.abs(joined["score"].to_numpy()).max())


def test_attributor_index_and_duckdb_agree_with_the_table(ekfac_demo):
    spec, paths, _ = ekfac_demo
    flat = Attributor(spec, paths, use_index=True)
    brute = Attributor(spec, paths, model=flat.model, tokenizer=flat.tokenizer, use_index=False)
    query = data.read_tokenized(paths.query_tokens)[0]
    rows = GradientStore(paths.kfac_query_gradients).document_rows()[:1]
    table = pl.read_parquet(paths.scores_glob).filter(pl.col("query_id") == query.doc_id)
    table = table.sort(["score", "doc_id"], descending=[True, False]).head(5)
    with flat.collector.trace() as traced:  # the attributor's own (EK-FAC) query collector
        model = flat.model
        ids = torch.tensor([query.input_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        (nll * torch.tensor(query.loss_mask[1:], dtype=torch.float32)).sum().backward()
    np.testing.assert_allclose(traced[0], rows, rtol=1e-4, atol=1e-5 * np.abs(rows).max())
    for attributor in (flat, brute):
        hits = attributor.top_k_rows(rows, k=5)[0]
        assert [h.doc_id for h in hits] == table["doc_id"].to_list()
        np.testing.assert_allclose([h.score for h in hits], table["score"].to_numpy(), rtol=1e-5, atol=1e-6)
    top = database.top_k(paths.database, query.doc_id, 5)
    assert [r[1] for r in top] == table["doc_id"].to_list()


def _query_loss_backward(model, query):
    model.zero_grad()
    ids = torch.tensor([query.input_ids])
    logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
    nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
    (nll * torch.tensor(query.loss_mask[1:], dtype=torch.float32)).sum().backward()


def test_biases_and_label_draws_through_the_asset_graph(tmp_path):
    """``gradients.include_bias`` with EK-FAC and ``curvature.label_samples: 2``: every check passes,
    the factors carry each module's ones column and both draws, and the score table equals
    ``[L G Rᵀ | L b]`` of plain autograd query gradients preconditioned as one block, dotted with
    the stored training rows ``[vec(L G Rᵀ) | L b]``."""
    import dagster as dg

    from attribution_assets.defs.runner import materialize_pipeline

    base = tiny_demo_spec(GradientSpec(projection_dim=8, include_bias=True), preconditioner="ekfac",
                          metric="inner_product")
    spec = dataclasses.replace(base, curvature=CurvatureSpec(label_samples=2))
    results = materialize_pipeline(definitions_for([spec], tmp_path), spec, dg.DagsterInstance.ephemeral(),
                                   log=lambda _: None, log_level="WARNING")
    checks = [c for r in results for c in r.get_asset_check_evaluations()]
    assert checks and all(c.passed for c in checks), [(c.asset_key, c.check_name) for c in checks if not c.passed]
    paths = PipelinePaths.under(tmp_path, spec.name)
    ekfac, p = load_kronecker(spec, paths), spec.gradients.projection_dim
    assert ekfac.eigen.label_samples == 2 and all(m.bias for m in ekfac.eigen.modules)
    model = AutoModelForCausalLM.from_pretrained(paths.model).float().eval()
    shards, docs = _docs(paths)
    train = np.concatenate([np.asarray(GradientStore(paths.train_gradients(s)).array) for s in shards])
    modules = GradientStore(paths.train_gradients(shards[0])).info["modules"]
    assert all(m["has_bias"] for m in modules)
    table = pl.read_parquet(paths.scores_glob)
    position = {d.doc_id: j for j, d in enumerate(docs)}
    for query in data.read_tokenized(paths.query_tokens)[:3]:
        _query_loss_backward(model, query)
        blocks = []
        for m in modules:
            lin = model.get_submodule(m["name"])
            left = projection_matrix(spec.gradients.seed, m["name"], "out", p, lin.weight.shape[0]).double()
            right = projection_matrix(spec.gradients.seed, m["name"], "in", p, lin.weight.shape[1]).double()
            block = torch.cat([left @ lin.weight.grad.double() @ right.T, (left @ lin.bias.grad.double())[:, None]], 1)
            out = ekfac.apply_full(m["name"], block)
            blocks += [out[:, :-1].reshape(-1).numpy(), out[:, -1].numpy()]
        expected = train.astype(np.float64) @ np.concatenate(blocks)
        got = table.filter(pl.col("query_id") == query.doc_id)
        np.testing.assert_allclose(got["score"].to_numpy(), expected[[position[d] for d in got["doc_id"]]],
                                   rtol=1e-3, atol=1e-3 * np.abs(expected).max())
