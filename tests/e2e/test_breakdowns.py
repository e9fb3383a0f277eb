"""Score breakdowns end to end: a tiny demo with per-head gradient blocks and a head breakdown;
the block tables add up to the score tables, the README's SQL runs on the views, the CLI prints."""

import re
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl
import pytest

from attribution_assets import cli
from attribution_assets.engine.gradients.store import GradientStore
from attribution_assets.engine.scoring import database
from attribution_assets.report import demo_report
from attribution_assets.spec import GradientSpec
from tests.helpers import definitions_for, materialize_tiny_demo

pytestmark = pytest.mark.slow  # runs first (tests/conftest.py)

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.fixture(scope="module")
def head_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("head-demo")
    gradients = GradientSpec(projection_dim=8, normalizer="adafactor", split="head")
    spec, paths = materialize_tiny_demo(root, gradients=gradients, breakdown="head")
    return spec, paths


def _tables(paths):
    scores = pl.read_parquet(paths.scores_glob)
    blocks = pl.read_parquet(paths.block_scores_glob)
    return scores, blocks


def _gold_query(paths) -> str:
    queries = pl.read_parquet(paths.queries)
    return queries.filter(pl.col("gold_doc_ids").list.len() > 0)["doc_id"][0]


def test_stores_hold_head_blocks_and_contributions_add_up(head_demo):
    spec, paths = head_demo
    layout = GradientStore(paths.query_gradients).info["modules"]
    heads = spec.demo.heads
    qkv = [m for m in layout if m.get("module", "").endswith("query_key_value")]
    assert len(qkv) == 3 * heads * spec.demo.layers
    assert {m["kind"] for m in qkv} == {"q", "k", "v"}
    scores, blocks = _tables(paths)
    summed = blocks.group_by("query_id", "doc_id").agg(pl.col("contribution").sum())
    joined = scores.join(summed, on=["query_id", "doc_id"], how="left")
    assert joined["contribution"].null_count() == 0 and blocks.height == scores.height * len(layout)
    np.testing.assert_allclose(joined["contribution"], joined["score"], rtol=0, atol=1e-5)


def _readme_sql() -> list[str]:
    text = README.read_text()
    section = text[text.index("### Score breakdowns"):]
    section = section[:section.index("\n## ")]
    return re.findall(r"```sql\n(.*?)```", section, flags=re.S)


def test_views_answer_the_readme_sql(head_demo):
    spec, paths = head_demo
    db = paths.database
    columns = database.view_columns(db)
    assert columns["module_scores"] == ["query_id", "doc_id", "shard", "module", "layer", "contribution"]
    assert columns["layer_scores"] == ["query_id", "doc_id", "shard", "layer", "contribution"]
    assert columns["head_scores"] == ["query_id", "doc_id", "shard", "module", "layer", "head", "kind",
                                      "contribution"]
    assert columns["top_heads"] == ["query_id", "rank", "module", "layer", "head", "kind", "contribution",
                                    "share"]
    query_id = _gold_query(paths)
    statements = _readme_sql()
    assert len(statements) == 3
    scores, blocks = _tables(paths)
    top10 = scores.filter(pl.col("query_id") == query_id).sort(["score", "doc_id"], descending=[True, False])
    top10 = top10.head(10)
    mine = blocks.filter(pl.col("query_id") == query_id).join(top10.select("doc_id"), on="doc_id")
    with database.connect(db) as con:
        layers = con.execute(statements[0].replace("demo-q-...", query_id)).fetchall()
        expected = mine.group_by("layer").agg(pl.col("contribution").sum()).sort("layer")
        assert [r[0] for r in layers] == expected["layer"].to_list()
        np.testing.assert_allclose([r[1] for r in layers], expected["contribution"], atol=1e-4)
        assert abs(sum(r[1] for r in layers) - top10["score"].sum()) < 1e-3
        top = con.execute(statements[1].replace("demo-q-...", query_id)).fetchall()
        per_head = (mine.filter(pl.col("head").is_not_null())
                    .group_by("module", "head", "kind").agg(pl.col("contribution").mean())
                    .sort("contribution", descending=True))
        assert [r[0] for r in top] == list(range(1, len(top) + 1)) and len(top) == 5
        np.testing.assert_allclose([r[4] for r in top], per_head["contribution"].head(5), atol=1e-4)
        np.testing.assert_allclose([r[5] for r in top], per_head["contribution"].head(5) * 10
                                   / top10["score"].sum(), atol=6e-4)  # rounded to 3 decimals
        modules = con.execute(statements[2].replace("demo-q-...", query_id)).fetchall()
        assert len(modules) == len({m for m in blocks["module"]})
        np.testing.assert_allclose(sum(r[2] for r in modules), scores.filter(
            pl.col("query_id") == query_id)["score"].sum(), atol=1e-3)


def test_cli_prints_breakdowns_and_report_shows_gold_layers(head_demo, monkeypatch, capsys):
    spec, paths = head_demo
    monkeypatch.setenv("ATTRIBUTION_STORAGE", str(paths.root.parent))
    query_id = _gold_query(paths)
    assert cli.main(["scores", "--pipeline", "demo", "--query", query_id, "--by", "layer", "-k", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"query {query_id}:") and "layer 0" in out and "layer 1" in out
    doc_lines = [line for line in out.splitlines() if re.match(r"\s+\d+[* ]\s+[+-]", line)]
    assert len(doc_lines) == 3
    for line in doc_lines:  # the layer cells add up to the score
        numbers = [float(x) for x in re.findall(r"[+-]\d+\.\d+", line)]
        assert abs(sum(numbers[1:]) - numbers[0]) < 5e-4
    assert cli.main(["scores", "--pipeline", "demo", "--query", query_id, "--by", "head", "-k", "4"]) == 0
    out = capsys.readouterr().out
    assert "query_key_value" in out or "dense" in out
    assert len([line for line in out.splitlines() if re.match(r"\s+\d+\s+\d+\s+[qkvo]\d", line)]) == 4
    report = demo_report(spec, dg.DagsterInstance.ephemeral(), definitions_for([spec], paths.root.parent))
    assert "Which layers carry the gold documents' influence" in report


def test_breakdown_without_views_is_refused(tiny_demo, monkeypatch, capsys):
    spec, paths = tiny_demo
    monkeypatch.setenv("ATTRIBUTION_STORAGE", str(paths.root.parent))
    query_id = pl.read_parquet(paths.queries)["doc_id"][0]
    assert cli.main(["scores", "--pipeline", "demo", "--query", query_id, "--by", "layer"]) == 2
    assert "set `scoring.breakdown: module` or `head`" in capsys.readouterr().err
