"""FAISS index asset and the interactive Attributor agree with the score table."""

import io

import numpy as np
import polars as pl
import pytest
import torch

from attribution_assets import cli
from attribution_assets.engine.io import data
from attribution_assets.engine.search.attributor import Attributor
from attribution_assets.engine.search.index import FaissIndex


def _queries(paths, n=4):
    return data.read_tokenized(paths.query_tokens)[:n]


def _table_top(paths, query_id, k):
    table = pl.read_parquet(paths.scores_glob).filter(pl.col("query_id") == query_id)
    table = table.sort(["score", "doc_id"], descending=[True, False]).head(k)
    return table["doc_id"].to_list(), table["score"].to_numpy()


def _pairs(paths, queries):
    import json

    content = {r["doc_id"]: json.loads(r["content"])
               for r in pl.read_parquet(paths.queries).iter_rows(named=True)}
    return [(content[q.doc_id]["prompt"], content[q.doc_id]["completion"]) for q in queries]


@pytest.fixture(scope="module")
def attributors(tiny_demo):
    spec, paths = tiny_demo
    flat = Attributor(spec, paths, use_index=True)
    brute = Attributor(spec, paths, model=flat.model, tokenizer=flat.tokenizer, use_index=False)
    return flat, brute


def test_flat_index_brute_force_and_score_table_agree(tiny_demo, attributors):
    spec, paths = tiny_demo
    assert FaissIndex.load(paths.faiss_index).ntotal == sum(
        len(pl.read_parquet(paths.tokens(s))) for s in paths.tokenized_shards())
    flat, brute = attributors
    queries = _queries(paths)
    by_index = flat.search(_pairs(paths, queries), k=10)
    by_brute = brute.search(_pairs(paths, queries), k=10)
    for query, hits_index, hits_brute in zip(queries, by_index, by_brute):
        ids, scores = _table_top(paths, query.doc_id, 10)
        assert [h.doc_id for h in hits_brute] == ids
        np.testing.assert_allclose([h.score for h in hits_brute], scores, atol=1e-5)
        assert [h.doc_id for h in hits_index] == ids
        np.testing.assert_allclose([h.score for h in hits_index], scores, atol=1e-5)
        assert all(h.text for h in hits_index)


def test_trace_of_a_user_backward_matches_search(tiny_demo, attributors):
    spec, paths = tiny_demo
    flat, _ = attributors
    (query,) = _queries(paths, 1)
    ids = torch.tensor([query.input_ids])
    labels = torch.where(torch.tensor([query.loss_mask]).bool(), ids, -100)
    with flat.trace(k=5) as result:
        flat.model(input_ids=ids, labels=labels).loss.backward()  # HF mean loss over the answer
    expected, scores = _table_top(paths, query.doc_id, 5)
    assert [h.doc_id for h in result[0]] == expected
    np.testing.assert_allclose([h.score for h in result[0]], scores, atol=1e-5)
    assert all(p.grad is None for p in flat.model.parameters()), "trace leaves no parameter gradients"


def test_cli_query_from_argument_and_stdin(tiny_demo, monkeypatch, capsys):
    spec, paths = tiny_demo
    monkeypatch.setenv("ATTRIBUTION_STORAGE", str(paths.root.parent))
    (prompt, completion), = _pairs(paths, _queries(paths, 1))
    assert cli.main(["query", "--pipeline", "demo", prompt, "--completion", completion, "-k", "3"]) == 0
    first = capsys.readouterr().out
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{prompt}\t{completion}\n\n"))
    assert cli.main(["query", "--pipeline", "demo", "-k", "3"]) == 0
    assert capsys.readouterr().out == first
    assert len([line for line in first.splitlines() if line.strip()[:1].isdigit()]) == 3


def test_shards_newer_than_the_index_are_searched_by_brute_force(tiny_demo, attributors, tmp_path):
    import shutil

    from attribution_assets.engine.io.paths import PipelinePaths
    from attribution_assets.engine.scoring.run import load_preconditioner, prepared_training_blocks
    from attribution_assets.engine.search.build import build_index

    spec, paths = tiny_demo
    _, brute = attributors
    copy = PipelinePaths(tmp_path / "demo")
    shutil.copytree(paths.root, copy.root, ignore=shutil.ignore_patterns("faiss_index"))
    shards = copy.gradient_shards()
    assert len(shards) >= 2
    precond = load_preconditioner(spec, copy)
    build_index(lambda: prepared_training_blocks(copy, shards[:1], precond, spec.scoring.metric), spec.index,
                copy.faiss_index)  # an index built before the other shards existed
    with pytest.warns(UserWarning, match="newer than its FAISS index"):
        stale = Attributor(spec, copy, model=brute.model, tokenizer=brute.tokenizer)
    assert stale.brute_force_shards == shards[1:]
    pairs = _pairs(paths, _queries(paths, 2))
    got, want = stale.search(pairs, k=5), brute.search(pairs, k=5)
    assert [[h.doc_id for h in row] for row in got] == [[h.doc_id for h in row] for row in want]


def test_a_query_longer_than_the_pipeline_allows_is_refused_by_name(tiny_demo, attributors):
    spec, _ = tiny_demo
    _, brute = attributors
    limit = spec.queries.max_length
    with pytest.raises(ValueError, match=rf"Query 0 is \d+ tokens, longer than `queries.max_length` \({limit}\)"):
        brute.search(["word " * (2 * limit)], k=1)
    with pytest.raises(ValueError, match="has no target token"):
        brute.search(["a"], k=1)
