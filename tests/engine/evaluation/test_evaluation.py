"""Fact-tracing evaluation: ranks, metrics, BM25, query-loss masks, and a tiny table end to end."""

import dataclasses

import numpy as np
import pytest

from attribution_assets.engine.evaluation import fact_tracing as evaluation
from attribution_assets.engine.evaluation.methods import (
    BM25,
    COSINE,
    DOT,
    RANDOM,
    GradientCache,
    available_methods,
    bm25_scores,
    configured_name,
    default_methods,
    gradient_scores,
    trackstar,
    with_query_loss,
)
from attribution_assets.engine.evaluation.metrics import recall_and_mrr
from attribution_assets.engine.evaluation.tail_patch import (
    TailPatcher,
    sample_rows,
    tail_patch_increases,
)
from attribution_assets.engine.io.data import TokenizedDoc
from attribution_assets.engine.io.models import load_model
from attribution_assets.spec import (
    DataSpec,
    EvaluationSpec,
    GradientSpec,
    ModelSpec,
    PipelineSpec,
    ScoringSpec,
)
from tests.helpers import SENTENCES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_first_gold_ranks_hand_computed():
    scores = np.array([[0.9, 0.5, 0.7, 0.1],   # best gold (doc c, 0.7) behind a -> rank 2
                       [0.2, 0.2, 0.1, 0.0],   # gold b ties non-gold a -> pessimistic rank 2
                       [0.0, 0.3, 0.0, 0.8]])  # gold d first
    gold = {"q1": ["c", "d"], "q2": ["b"], "q3": ["d", "missing"], "q4": ["missing"]}
    ranks = evaluation.first_gold_ranks(scores, ["a", "b", "c", "d"], ["q1", "q2", "q3"], gold)
    assert ranks == {"q1": 2, "q2": 2, "q3": 1}
    metrics = recall_and_mrr(ranks, (1, 10))
    assert metrics["recall@1"] == pytest.approx(1 / 3) and metrics["mrr"] == pytest.approx(2 / 3)


def test_a_chunk_counts_for_its_source_document():
    scores = np.array([[0.1, 0.9, 0.5, 0.2]])  # rows: a, huge#0, huge#1, b
    ranks = evaluation.first_gold_ranks(scores, ["a", "huge", "huge", "b"], ["q"], {"q": ["huge"]})
    assert ranks == {"q": 1}


def test_bm25_ranks_rare_word_document_first():
    docs = ["The cat sat on the mat.", "Zorblax studied at Norwood.", "The cat ate the fish.",
            "Norwood is a town."]
    scores = bm25_scores(docs, ["Where did Zorblax study?", "the of and"])
    assert scores.shape == (2, 4) and scores.dtype == np.float32
    assert int(np.argmax(scores[0])) == 1
    assert (scores[1] == 0).all()  # stopwords only


def test_query_loss_masks():
    q = TokenizedDoc("q", [5, 6, 7, 8], [0, 0, 1, 1], "text")
    assert with_query_loss([q], "completion")[0].loss_mask == [0, 0, 1, 1]
    assert with_query_loss([q], "full")[0].loss_mask == [0, 1, 1, 1]
    with pytest.raises(ValueError):
        with_query_loss([q], "answer")


def test_default_methods_and_configured():
    spec = PipelineSpec(name="t", model=ModelSpec(), corpus=DataSpec(),
                        gradients=GradientSpec(normalizer="adafactor"))
    names = [m.name for m in default_methods(spec)]
    assert names == ["random", "bm25", "dot", "cosine", "trackstar (none)", "trackstar (adafactor)",
                     "trackstar (adam)", "preconditioned dot (adafactor)", "ekfac", "ekfac (cosine)",
                     "kfac", "kfac (cosine)", "ekfac (full space)"]
    assert configured_name(spec, default_methods(spec)) == "trackstar (adafactor)"
    other = PipelineSpec(name="t", model=ModelSpec(), corpus=DataSpec(),
                         gradients=GradientSpec(normalizer="adam"),
                         scoring=ScoringSpec(metric="inner_product"))
    assert default_methods(other)[-1].name == "configured"


def test_kronecker_methods_the_gradient_settings_refuse_are_skipped_with_the_reason():
    spec = PipelineSpec(name="t", model=ModelSpec(), corpus=DataSpec(), gradients=GradientSpec(split="head"))
    usable, skipped = available_methods(spec, None)
    names = [m.name for m in usable]
    assert "ekfac (full space)" in names and "cosine" in names
    for name in ("ekfac", "ekfac (cosine)", "kfac", "kfac (cosine)"):
        assert name not in names and "scoring.kfac_space: full" in skipped[name]
    biased = dataclasses.replace(spec, gradients=GradientSpec(include_bias=True))
    usable, skipped = available_methods(biased, None)
    assert {"ekfac", "ekfac (full space)"} <= {m.name for m in usable} and not skipped.keys() & {"ekfac", "kfac"}


def test_markdown_table():
    import polars as pl

    text = evaluation.markdown_table(pl.DataFrame({"m": ["a"], "x": [0.12345], "n": [3]}))
    assert text == "| m | x | n |\n|---|---|---|\n| a | 0.123 | 3 |\n"


def test_fact_tracing_table_end_to_end(tiny_model_dir, tiny_tokenizer, tmp_path):
    model = load_model(ModelSpec(name_or_path=str(tiny_model_dir)))
    docs = []
    for i, text in enumerate(SENTENCES):
        ids = tiny_tokenizer(text)["input_ids"]
        docs.append(TokenizedDoc(f"d{i}", ids, [0] + [1] * (len(ids) - 1), text))
    # queries are training sentences split into prompt and answer; gold = that sentence
    queries = [TokenizedDoc(f"q{i}", d.input_ids, [0] * (len(d.input_ids) - 2) + [1, 1], d.text)
               for i, d in enumerate(docs[:4])]
    gold = {f"q{i}": [f"d{i}"] for i in range(4)}
    spec = PipelineSpec(name="t", model=ModelSpec(), corpus=DataSpec(),
                        gradients=GradientSpec(projection_dim=8),
                        evaluation=EvaluationSpec(tail_patch_k=2, tail_patch_queries=3))
    methods = [RANDOM, BM25, DOT, COSINE, trackstar("none")]
    result = evaluation.fact_tracing_table(model, spec, None, docs, queries, gold, methods, ks=(1, 3))
    frame = result.frame
    assert frame.height == 8  # random and bm25 once, three gradient methods per query loss
    assert frame.columns == ["method", "query_loss", "configured", "recall@1", "recall@3", "mrr",
                             "queries", "tail_patch"]
    # tail patch = mean increase over the sampled queries after a step on each one's top 2
    rows = sample_rows(4, 3, spec.evaluation.lds_seed)
    expected = tail_patch_increases(TailPatcher(model, spec.evaluation.tail_patch_lr), docs, queries,
                                    result.scores["full"]["cosine"], 2, rows).mean()
    cosine_full = frame.filter((frame["method"] == "cosine") & (frame["query_loss"] == "full"))
    assert cosine_full["tail_patch"][0] == pytest.approx(expected)
    assert frame.filter(frame["method"] == "trackstar (none)")["configured"].to_list() == [True, True]
    assert (frame["queries"] == 4).all() and "| bm25 | full text |" in result.markdown
    assert "on each query's top 2 documents, over 3 of the 4 tokenized queries" in result.markdown
    # with the whole-text loss, each query's gradient IS its gold document's: cosine = 1
    full = frame.filter((frame["method"] == "cosine") & (frame["query_loss"] == "full"))
    assert full["recall@1"][0] == 1.0
    assert result.scores["completion"]["dot"].shape == (4, len(docs))
    parquet, md = evaluation.write_tables(frame, result.markdown, tmp_path, "ft")
    assert parquet.exists() and md.read_text() == result.markdown


def test_preconditioned_methods_share_one_preconditioner_and_match_brute_force(tiny_model_dir,
                                                                                tiny_tokenizer):
    model = load_model(ModelSpec(name_or_path=str(tiny_model_dir)))
    docs = [TokenizedDoc(f"d{i}", ids, [0] + [1] * (len(ids) - 1), text)
            for i, text in enumerate(SENTENCES) for ids in [tiny_tokenizer(text)["input_ids"]]]
    queries = [dataclasses.replace(d, doc_id=f"q{i}", loss_mask=[0] * (len(d.input_ids) - 2) + [1, 1])
               for i, d in enumerate(docs[:4])]
    spec = PipelineSpec(name="t", model=ModelSpec(), corpus=DataSpec(),
                        gradients=GradientSpec(projection_dim=8))
    cache = GradientCache(model, spec, None, docs, queries)
    ip_method = trackstar("none", name="ip", metric="inner_product")
    ip = gradient_scores(ip_method, cache, "completion")
    cos = gradient_scores(trackstar("none"), cache, "completion")
    precond = cache.preconditioner("none", "completion", ip_method.scoring())
    assert precond is cache.preconditioner("none", "completion", trackstar("none").scoring())
    (train, _), (query, _) = cache.train("none"), cache.query("none", "completion")
    # ground truth: per module, (R + shift I)^-1 by explicit inversion
    inverse, root = np.zeros((train.shape[1],) * 2), np.zeros((train.shape[1],) * 2)
    for m in precond.layout:
        block = precond.matrices[m.name] + precond.damping_shift(m.name) * np.eye(m.size)
        inverse[m.start:m.stop, m.start:m.stop] = np.linalg.inv(block)
        vals, vecs = np.linalg.eigh(block)
        root[m.start:m.stop, m.start:m.stop] = (vecs / np.sqrt(vals)) @ vecs.T
    np.testing.assert_allclose(ip, query @ inverse @ train.T, rtol=2e-3, atol=1e-4 * np.abs(ip).max())
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(cos, unit(query @ root) @ unit(train @ root).T, atol=2e-4)
