"""TrackStar end to end on a tiny demo: score table == streaming == brute force; DuckDB views."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from transformers import AutoModelForCausalLM

from attribution_assets import cli
from attribution_assets.engine.gradients.projection import projection_matrix
from attribution_assets.engine.io import data
from attribution_assets.engine.scoring import database
from tests.helpers import materialize_tiny_demo


@pytest.fixture(scope="module")
def stored(tiny_demo):
    return tiny_demo


@pytest.fixture(scope="module")
def streaming(tmp_path_factory):
    return materialize_tiny_demo(tmp_path_factory.mktemp("streaming"), mode="streaming")


def _scores(paths):
    return pl.read_parquet(paths.scores_glob).sort(["query_id", "doc_id"])


def _naive_rows(model, docs, optimizer_state, spec):
    """Adafactor-normalized, projected per-document gradients from plain autograd, module by module."""
    state = torch.load(optimizer_state, weights_only=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    moments = {names[int(i)]: s for i, s in state["state"].items()}
    beta2 = state["param_groups"][0]["betas"][1]
    modules = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n not in ("embed_out", "lm_head")]
    p = spec.gradients.projection_dim
    rows = []
    for doc in docs:
        model.zero_grad()
        ids = torch.tensor([doc.input_ids])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logp.gather(-1, ids[0, 1:, None])[:, 0]
        (nll * torch.tensor(doc.loss_mask[1:], dtype=torch.float32)).sum().backward()
        blocks = []
        for name in modules:
            weight = model.get_submodule(name).weight
            moment = moments[f"{name}.weight"]
            v = moment["exp_avg_sq"] / (1 - beta2 ** float(moment["step"]))
            row, col = v.mean(1) + 1e-30, v.mean(0) + 1e-30
            normalized = weight.grad * row.mean().sqrt() / row.sqrt()[:, None] / col.sqrt()[None, :]
            left = projection_matrix(spec.gradients.seed, name, "out", p, weight.shape[0])
            right = projection_matrix(spec.gradients.seed, name, "in", p, weight.shape[1])
            blocks.append((left @ normalized @ right.T).reshape(-1))
        rows.append(torch.cat(blocks).double().numpy())
    return np.stack(rows), modules


def _inverse_sqrt(matrix, damping):
    values, vectors = np.linalg.eigh(matrix)
    values = np.clip(values, 0, None)
    return (vectors / np.sqrt(values + damping * values.mean())) @ vectors.T


def test_score_table_equals_streaming(stored, streaming):
    a, b = _scores(stored[1]), _scores(streaming[1])
    assert a.select("query_id", "doc_id").equals(b.select("query_id", "doc_id"))
    np.testing.assert_allclose(a["score"].to_numpy(), b["score"].to_numpy(), atol=2e-5)
    assert not streaming[1].gradient_shards(), "streaming mode stores no training gradients"


def test_score_table_equals_brute_force(stored):
    spec, paths = stored
    model = AutoModelForCausalLM.from_pretrained(paths.model).float().eval()
    docs = [d for shard in paths.tokenized_shards() for d in data.read_tokenized(paths.tokens(shard))]
    queries = data.read_tokenized(paths.query_tokens)
    train, modules = _naive_rows(model, docs, paths.model / "optimizer.pt", spec)
    query, _ = _naive_rows(model, queries, paths.model / "optimizer.pt", spec)
    settings = json.loads((paths.preconditioner / "preconditioner.json").read_text())
    lam, width = settings["lam"], spec.gradients.projection_dim ** 2
    prepared_q, prepared_t = [], []
    for m in range(len(modules)):
        cols = slice(m * width, (m + 1) * width)
        r_train = train[:, cols].T @ train[:, cols] / len(train)
        r_query = query[:, cols].T @ query[:, cols] / len(query)
        operator = _inverse_sqrt(lam * r_query + (1 - lam) * r_train, spec.scoring.damping)
        prepared_q.append(query[:, cols] @ operator)
        prepared_t.append(train[:, cols] @ operator)
    q, t = np.hstack(prepared_q), np.hstack(prepared_t)
    expected = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (t / np.linalg.norm(t, axis=1, keepdims=True)).T
    table = _scores(paths)
    index = {d.doc_id: j for j, d in enumerate(docs)}
    for i, query_doc in enumerate(queries[:5]):
        got = table.filter(pl.col("query_id") == query_doc.doc_id)
        cols = [index[d] for d in got["doc_id"]]
        np.testing.assert_allclose(got["score"].to_numpy(), expected[i, cols], atol=2e-4)


def test_duckdb_views_return_ranked_rows_with_text(stored):
    spec, paths = stored
    db = paths.database
    assert database.view_columns(db)["top_influences"] == ["query_id", "rank", "doc_id", "source_doc_id",
                                                           "score", "text"]
    query_id = _scores(paths)["query_id"][0]
    top = database.top_k(db, query_id, 10)
    assert [r[0] for r in top] == list(range(1, 11))
    assert all(a[3] >= b[3] for a, b in zip(top, top[1:])) and all(r[4] for r in top)
    assert all(r[1] == r[2] for r in top), "unchunked documents are their own source"
    best = _scores(paths).filter(pl.col("query_id") == query_id).sort("score", descending=True)["doc_id"][0]
    assert top[0][1] == best
    with database.connect(db) as con:  # top_k filters before ranking: the view's own rows
        for qid in _scores(paths)["query_id"].unique().to_list():
            view = con.execute("SELECT rank, doc_id, source_doc_id, round(score, 4), text FROM top_influences "
                               "WHERE query_id = ? AND rank <= 7 ORDER BY rank", [qid]).fetchall()
            assert database.top_k(db, qid, 7) == view


def test_moving_the_storage_folder_keeps_the_views_working(stored, tmp_path):
    import shutil

    import duckdb

    spec, paths = stored
    moved = tmp_path / "elsewhere" / "demo"
    shutil.copytree(paths.root, moved, ignore=shutil.ignore_patterns("model", "train_gradients"))
    query_id = _scores(paths)["query_id"][0]
    assert database.top_k(moved / "attribution.duckdb", query_id, 3) == database.top_k(paths.database, query_id, 3)
    with duckdb.connect(str(moved / "attribution.duckdb"), read_only=True) as con:  # a plain DuckDB shell
        con.execute(f"SET file_search_path = '{moved}'")
        assert con.execute("SELECT count(*) FROM scores").fetchone()[0] == len(_scores(paths))


def test_views_see_new_partitions_without_rebuild(stored, tmp_path):
    spec, paths = stored
    db = paths.database
    with database.connect(db) as con:
        before = con.execute("SELECT count(*) FROM scores").fetchone()[0]
    extra = paths.scores("shard-99999").parent
    extra.mkdir()
    try:
        pl.read_parquet(paths.scores("shard-00000")).with_columns(
            shard=pl.lit("shard-99999")).write_parquet(extra / "scores.parquet")
        with database.connect(db) as con:
            assert con.execute("SELECT count(*) FROM scores").fetchone()[0] > before
    finally:
        (extra / "scores.parquet").unlink()
        extra.rmdir()


def test_cli_scores_prints_top_k(stored, monkeypatch, capsys):
    spec, paths = stored
    monkeypatch.setenv("ATTRIBUTION_STORAGE", str(paths.root.parent))
    query_id = _scores(paths)["query_id"][0]
    assert cli.main(["scores", "--pipeline", "demo", "--query", query_id, "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"query {query_id}:") and "first gold document at rank" in out
    assert len([line for line in out.splitlines() if line.strip()[:1].isdigit()]) == 3


def test_mean_aggregate_table_is_mean_of_individual_cosines(stored, tmp_path):
    from attribution_assets.engine.gradients.store import GradientStore
    from attribution_assets.engine.scoring.run import QueryScorer

    spec, paths = stored
    train = GradientStore(paths.train_gradients("shard-00000"))
    mean = QueryScorer.for_pipeline(spec, paths, aggregate="mean").score(np.asarray(train.array))
    individual = pl.read_parquet(paths.scores("shard-00000"))
    by_doc = individual.group_by("doc_id").agg(pl.col("score").mean())
    expected = dict(zip(by_doc["doc_id"], by_doc["score"]))
    np.testing.assert_allclose(mean[0], [expected[d] for d in train.doc_ids], atol=1e-5)


def test_attributor_on_a_streaming_pipeline_recomputes_rows_and_matches_its_table(streaming):
    from attribution_assets.engine.search.attributor import Attributor

    spec, paths = streaming
    queries = data.read_tokenized(paths.query_tokens)[:2]
    attributor = Attributor(spec, paths)
    assert attributor.index is None and attributor.brute_force_shards == paths.tokenized_shards()
    rows = attributor.collector.collect([(q.input_ids, q.loss_mask) for q in queries])[0]
    table = _scores(paths)
    for query, hits in zip(queries, attributor.top_k_rows(rows, k=3)):
        best = table.filter(pl.col("query_id") == query.doc_id).sort(["score", "doc_id"],
                                                                       descending=[True, False]).head(3)
        assert [h.doc_id for h in hits] == best["doc_id"].to_list()
        np.testing.assert_allclose([h.score for h in hits], best["score"].to_numpy(), atol=2e-5)
