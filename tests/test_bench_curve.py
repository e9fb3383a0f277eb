"""Smoke run of benchmarks/bench_curve.py at tiny sizes (the benchmark itself is not part of make test)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_curve  # noqa: E402
import curve_downstream  # noqa: E402
import curve_platform  # noqa: E402


def test_documents_are_distinct_windows_of_the_text():
    words = [f"w{i}" for i in range(5000)]
    docs = bench_curve.documents(words, 300)
    assert len(set(docs)) == 300
    lengths = {len(d.split()) for d in docs}
    assert min(lengths) >= bench_curve.WORDS_PER_DOC[0] and max(lengths) < bench_curve.WORDS_PER_DOC[1]
    first = docs[1].split()  # a window: consecutive words of the text
    start = int(first[0][1:])
    assert first == words[start:start + len(first)]


@pytest.fixture(scope="module")
def downstream_figures(tmp_path_factory):
    base = tmp_path_factory.mktemp("curve")
    return curve_downstream.downstream(4000, 4, base, ["Flat", "HNSW32"], hnsw_max_rows=10**6, n_queries=40,
                                       shard_rows=1000)


def test_downstream_counts_rows_and_exact_index_recall(downstream_figures, capsys):
    f = downstream_figures
    # 4 shards x 40 queries x top_k 100 rows each, all counted back by the GROUP BY (asserted inside too)
    assert f["score_rows"] == 4 * 40 * 100
    # float32 rows of p*p = 16 columns, plus each row's doc id in info.json ("d1234", quoted)
    assert 64 + 8 <= f["store_bytes_per_row"] < 64 + 16
    flat, hnsw = f["faiss"]
    assert flat["factory"] == "Flat" and flat["recall_at_10"] == 1.0
    assert hnsw["ef_search"] is not None and 0.5 <= hnsw["recall_at_10"] <= 1.0
    curve_downstream.print_downstream(f)
    assert "| Flat |" in capsys.readouterr().out


def test_downstream_skips_hnsw_above_the_limit(tmp_path):
    f = curve_downstream.downstream(1500, 4, tmp_path, ["HNSW32"], hnsw_max_rows=1000, n_queries=10, shard_rows=1000)
    assert f["faiss"] == [{"factory": "HNSW32", "skipped": "rows > --hnsw-max-rows 1,000"}]
    assert f["score_rows"] == 10 * (100 + 100)


def test_retag_points_copied_events_at_their_own_inputs():
    tags = {"dagster/code_version": "3", "dagster/input_event_pointer/p/tokens": "17",
            "dagster/input_data_version/p/tokens": "abc"}
    out = curve_platform.retag(tags, {"p/tokens": 99})
    assert out == {**tags, "dagster/input_event_pointer/p/tokens": "99"}


def test_picture_from_results(tmp_path, downstream_figures):
    pytest.importorskip("matplotlib")
    stages = [{"stage": s, "s_per_1k": 1.0, "peak_rss_mb": 900} for s in ("shards", "fan_in", "scores")]
    lines = [{"kind": "e2e", "profile": "local", "shard_size": 1000, "docs": n, "stages": stages} for n in (10, 100)]
    lines.append({"kind": "downstream", **downstream_figures})
    results = tmp_path / "curve.jsonl"
    results.write_text("".join(json.dumps(x) + "\n" for x in lines))
    curve_downstream.picture(results, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000
