"""The scale curve's downstream stages over synthetic gradient stores (``bench_curve.py downstream``).

Rows: one ``p x p`` module block per row (``p * p`` columns: 256 at p = 16, 1,024 at p = 32),
gradient-like: 1,000 cluster centres plus noise with a decaying spectrum, unit rows, written
through ``write_store`` in shards of ``SHARD_ROWS``. Per stage, as the pipeline's assets run
them: per-shard autocorrelation sums (``shard_autocorr``), their merge
(``autocorrelation``), ``trackstar_preconditioner`` (auto mixing with 1,000 query rows),
scores (``QueryScorer.write_shard``, ``top_k`` 100) into Parquet, the DuckDB views (one query's
``top_influences`` top-10; a GROUP BY over all scores), then each FAISS factory through
``build_index`` (``auto`` nprobe / efSearch calibrated on the queries to recall@10 0.95) with
its recall@10 against the exact top-10 of the score tables (the same cosine: one code path)
and its query latency (one query at a time, one thread; and the batch of 1,000).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_curve import du, load, record

SHARD_ROWS = 100_000
#: One query's top-10 with the filter and limit before the join (the view ranks every query first).
TOP10_DIRECT = ("SELECT row_number() OVER (ORDER BY s.score DESC, s.doc_id) AS rank, s.doc_id, s.score, d.text "
                "FROM (SELECT doc_id, shard, score FROM scores WHERE query_id = ? ORDER BY score DESC, doc_id "
                "LIMIT 10) s JOIN documents d USING (doc_id, shard) ORDER BY rank")
CENTRES = 1000


def layout(p: int) -> list[dict]:
    return [{"name": "block", "start": 0, "stop": p * p, "shape": [p, p], "has_bias": False}]


def synthetic_rows(rng: np.random.Generator, n: int, centres: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """``[n, d]`` unit rows: a random centre plus noise scaled by ``scales``."""
    x = rng.standard_normal((n, len(scales)), dtype=np.float32) * scales
    x += centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def write_stores(root: Path, rows: int, p: int, shard_rows: int = SHARD_ROWS,
                 seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Shards of ``shard_rows`` rows under ``root/train_gradients``; returns the shard names and
    ``[1000, d]`` query rows from the same distribution."""
    from attribution_assets.engine.gradients.store import write_store

    rng = np.random.default_rng(seed)
    d = p * p
    scales = (np.arange(1, d + 1, dtype=np.float32) ** -0.5) * 0.6
    centres = rng.standard_normal((CENTRES, d), dtype=np.float32) / np.sqrt(d)
    info = {"modules": layout(p), "dims": d, "projection": {"dim": p, "kind": "rademacher", "seed": 0},
            "normalizer": None}
    shards = []
    for i in range(-(-rows // shard_rows)):
        n = min(shard_rows, rows - i * shard_rows)
        shard = f"shard-{i:05d}"
        write_store(root / "train_gradients" / shard, synthetic_rows(rng, n, centres, scales), info,
                    doc_ids=[f"d{i * shard_rows + j}" for j in range(n)], model_fingerprint="synthetic")
        shards.append(shard)
    return shards, synthetic_rows(rng, 1000, centres, scales)


def write_text_tables(paths, shards: list[str], query_ids: list[str]) -> None:
    """The minimal ``tokenized_shards`` and ``query_set`` Parquet files the DuckDB views join."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from attribution_assets.engine.gradients.store import GradientStore

    for shard in shards:
        ids = GradientStore(paths.train_gradients(shard)).doc_ids
        paths.tokens(shard).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"doc_id": ids, "source_doc_id": pa.nulls(len(ids), pa.string()),
                                 "shard": [shard] * len(ids), "text": [f"text of {i}" for i in ids]}),
                       paths.tokens(shard))
    paths.queries.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"doc_id": query_ids, "text": query_ids, "gold_doc_ids": [[] for _ in query_ids]}),
                   paths.queries)


def timed(fn, *args, **kwargs):
    from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss

    reset_peak_rss()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, round(time.perf_counter() - start, 3), round(peak_rss_mb())


def preconditioner_parts(train, query) -> dict:
    """Seconds of the preconditioner's parts: the pooled train spectrum (``eigvalsh`` of each
    ``[d, d]`` matrix), the query spectrum (Gram), the mixed matrices' ``eigh``."""
    from attribution_assets.engine.preconditioning.preconditioners import _eigh, auto_mixing_lambda

    out = {}
    _, out["train_spectrum_s"], _ = timed(train.spectrum)
    _, out["query_spectrum_s"], _ = timed(query.spectrum)
    (lam, _), out["auto_lambda_s"], _ = timed(auto_mixing_lambda, train, query)
    mixed = lam * query.matrices["block"] + (1 - lam) * train.matrices["block"]
    _, out["eigh_s"], _ = timed(_eigh, mixed)
    return out


def exact_top10(con) -> dict[str, list[str]]:
    rows = con.execute("SELECT query_id, doc_id FROM scores QUALIFY row_number() OVER "
                       "(PARTITION BY query_id ORDER BY score DESC, doc_id) <= 10").fetchall()
    out: dict[str, list[str]] = {}
    for q, d in rows:
        out.setdefault(q, []).append(d)
    return out


def faiss_figures(factory: str, blocks, queries: np.ndarray, query_ids: list[str], truth: dict, out: Path) -> dict:
    """Build, load (mmap), recall@10 against ``truth`` and latencies of one factory."""
    import faiss

    from attribution_assets.engine.search.build import build_index
    from attribution_assets.engine.search.index import FaissIndex, recall_at_k
    from attribution_assets.spec import IndexSpec

    spec = IndexSpec(factory=factory, use_gpu=False)
    info, seconds, peak = timed(build_index, blocks, spec, out, calibration=queries[:256])
    index = FaissIndex.load(out, mmap=True)
    approx, _ = index.search(queries, 10)
    recall = recall_at_k(approx, [truth[q] for q in query_ids], 10)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    start = time.perf_counter()
    for row in queries[:100]:
        index.search(row[None], 10)
    single_ms = (time.perf_counter() - start) / 100 * 1000
    faiss.omp_set_num_threads(threads)
    start = time.perf_counter()
    index.search(queries, 10)
    batch_ms = (time.perf_counter() - start) / len(queries) * 1000
    return {"factory": info.factory, "build_s": seconds, "peak_rss_mb": peak, "index_mb": round(info.bytes / 2**20),
            "nprobe": info.nprobe, "ef_search": info.hnsw_ef_search, "recall_at_10": round(float(recall), 3),
            "query_ms_1thread": round(single_ms, 2), "query_ms_batch": round(batch_ms, 3)}


def downstream(rows: int, p: int, base: Path, factories: list[str], hnsw_max_rows: int, n_queries: int,
               shard_rows: int = SHARD_ROWS, top_k: int = 100) -> dict:
    """Every downstream stage at ``rows`` rows of ``p * p`` columns; figures as a dict."""
    from attribution_assets.engine.gradients.collect import ShardRows
    from attribution_assets.engine.gradients.store import GradientStore
    from attribution_assets.engine.io.paths import PipelinePaths
    from attribution_assets.engine.preconditioning.autocorrelation import (
        AutocorrelationAccumulator,
        merge_accumulators,
        row_autocorrelation,
        save_accumulator,
    )
    from attribution_assets.engine.preconditioning.preconditioners import trackstar_preconditioner
    from attribution_assets.engine.scoring.database import build_database, connect
    from attribution_assets.engine.scoring.run import QueryScorer
    from attribution_assets.engine.scoring.scorer import prepare_train
    from attribution_assets.spec import ScoringSpec

    paths = PipelinePaths.under(base, "synthetic")
    fig = {"rows": rows, "p": p, "dims": p * p, "queries": n_queries, "top_k": top_k, "load_before": load()}
    (shards, queries), fig["write_s"], _ = timed(write_stores, paths.root, rows, p, shard_rows)
    queries = queries[:n_queries]
    fig["store_bytes_per_row"] = round(du(paths.root / "train_gradients") / rows, 1)

    def shard_sums():
        for shard in shards:
            acc = AutocorrelationAccumulator(layout(p)).update(GradientStore(paths.train_gradients(shard)).array)
            save_accumulator(paths.shard_autocorr(shard), acc)

    _, fig["shard_sums_s"], fig["shard_sums_peak_mb"] = timed(shard_sums)
    sums = [paths.shard_autocorr(s) for s in shards]
    train, fig["merge_s"], fig["merge_peak_mb"] = timed(merge_accumulators, sums)
    query = row_autocorrelation(queries, layout(p))
    scoring = ScoringSpec()
    precond, fig["preconditioner_s"], fig["preconditioner_peak_mb"] = timed(trackstar_preconditioner, train, query,
                                                                            scoring)
    fig |= preconditioner_parts(train, query)
    query_ids = [f"q{i:04d}" for i in range(len(queries))]
    scorer = QueryScorer(queries, query_ids, precond, scoring)

    def score_all():
        return sum(scorer.write_shard(ShardRows(s, (g := GradientStore(paths.train_gradients(s))).array, g.info,
                                                g.doc_ids), paths, top_k=top_k).rows for s in shards)

    fig["score_rows"], fig["scores_s"], fig["scores_peak_mb"] = timed(score_all)
    fig["score_bytes_per_row"] = round(du(paths.root / "scores") / fig["score_rows"], 1)
    write_text_tables(paths, shards, query_ids)
    _, fig["database_build_s"], _ = timed(build_database, paths)
    with connect(paths.database) as con:
        top, fig["top10_s"], _ = timed(lambda: con.execute(
            "SELECT rank, doc_id, score, text FROM top_influences WHERE query_id = ? AND rank <= 10 ORDER BY rank",
            [query_ids[1]]).fetchall())
        direct, fig["top10_direct_s"], _ = timed(lambda: con.execute(TOP10_DIRECT, [query_ids[1]]).fetchall())
        (counted,), fig["group_by_s"], _ = timed(lambda: con.execute(
            "SELECT sum(n) FROM (SELECT query_id, count(*) AS n, avg(score) FROM scores GROUP BY query_id)").fetchone())
        truth, fig["exact_top10_s"], _ = timed(exact_top10, con)
    assert len(top) == 10 and counted == fig["score_rows"], (len(top), counted, fig["score_rows"])
    assert [r[1:3] for r in top] == [r[1:3] for r in direct], "the direct top-10 differs from the view's"
    prepared = scorer.prepared

    def blocks():
        for s in shards:
            g = GradientStore(paths.train_gradients(s))
            yield g.doc_ids, prepare_train(g.array, precond, scoring.metric)

    fig["faiss"] = []
    for factory in factories:
        if factory.startswith("HNSW") and rows > hnsw_max_rows:
            fig["faiss"].append({"factory": factory, "skipped": f"rows > --hnsw-max-rows {hnsw_max_rows:,}"})
            continue
        fig["faiss"].append(faiss_figures(factory.replace("{pq}", str(p * p // 4)), blocks, prepared, query_ids,
                                          truth, base / f"index-{len(fig['faiss'])}"))
        shutil.rmtree(base / f"index-{len(fig['faiss']) - 1}", ignore_errors=True)
    fig["load_after"] = load()
    return fig


def print_downstream(f: dict) -> None:
    print(f"\n{f['rows']:,} rows x {f['dims']} dims (p = {f['p']}); load {f['load_before']} -> {f['load_after']}\n")
    print("| stage | s | s per 1M rows | peak RSS MiB | notes |")
    print("|---|---|---|---|---|")
    per = 1e6 / f["rows"]
    print(f"| write stores | {f['write_s']} | {f['write_s'] * per:.1f} | | {f['store_bytes_per_row']} bytes/row |")
    print(f"| shard autocorrelation sums | {f['shard_sums_s']} | {f['shard_sums_s'] * per:.1f} | "
          f"{f['shard_sums_peak_mb']} | |")
    print(f"| autocorrelation merge | {f['merge_s']} | {f['merge_s'] * per:.2f} | {f['merge_peak_mb']} | |")
    print(f"| preconditioner | {f['preconditioner_s']} | | {f['preconditioner_peak_mb']} | train spectrum "
          f"{f['train_spectrum_s']} s, query spectrum {f['query_spectrum_s']} s, eigh {f['eigh_s']} s |")
    print(f"| scores ({f.get('queries', 1000):,} queries, top_k {f.get('top_k', 100)}) | {f['scores_s']} | "
          f"{f['scores_s'] * per:.1f} | {f['scores_peak_mb']} | "
          f"{f['score_rows']:,} rows, {f['score_bytes_per_row']} bytes/row |")
    print(f"| DuckDB: one query's top_influences top-10 | {f['top10_s']} | | | views built in {f['database_build_s']} s |")
    if "top10_direct_s" in f:
        print(f"| DuckDB: the same top-10, filter and limit before the join | {f['top10_direct_s']} | | | |")
    print(f"| DuckDB: GROUP BY query over all scores | {f['group_by_s']} | | | |")
    print(f"| DuckDB: exact top-10 of every query | {f['exact_top10_s']} | | | recall ground truth |")
    print("\n| FAISS | build s | peak RSS MiB | index MiB | nprobe / efSearch | recall@10 | ms/query (1 thread) "
          "| ms/query (batch of 1,000) |")
    print("|---|---|---|---|---|---|---|---|")
    for x in f["faiss"]:
        if "skipped" in x:
            print(f"| {x['factory']} | skipped: {x['skipped']} | | | | | | |")
            continue
        param = x["nprobe"] if x["nprobe"] is not None else x["ef_search"]
        print(f"| {x['factory']} | {x['build_s']} | {x['peak_rss_mb']} | {x['index_mb']} | {param} | "
              f"{x['recall_at_10']} | {x['query_ms_1thread']} | {x['query_ms_batch']} |")


def run_downstream(args) -> None:
    for p in args.dims:
        for rows in args.rows:
            with tempfile.TemporaryDirectory(prefix="bench-curve-down-", dir=args.tmp) as tmp:
                fig = downstream(rows, p, Path(tmp), args.factories, args.hnsw_max_rows, args.queries,
                                 top_k=args.top_k)
            record(args.out, "downstream", fig)
            print_downstream(fig)


def picture(results: Path, out: Path) -> None:
    """Seconds per 1k documents and peak RSS of each stage against the corpus size (``e2e``
    results) and the downstream stages' seconds against the rows, log-log, in one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for (profile, shard_size) in sorted({(r["profile"], r["shard_size"]) for r in rows if r["kind"] == "e2e"}):
        runs = sorted((r for r in rows if r["kind"] == "e2e" and r["profile"] == profile
                       and r["shard_size"] == shard_size), key=lambda r: r["docs"])
        for stage in ("shards", "fan_in", "scores"):
            xs = [r["docs"] for r in runs]
            by = [next(s for s in r["stages"] if s["stage"] == stage) for r in runs]
            label = f"{stage}, {profile}, shard {shard_size:,}"
            left.plot(xs, [s["s_per_1k"] for s in by], marker="o", label=label)
            middle.plot(xs, [s["peak_rss_mb"] for s in by], marker="o", label=label)
    left.set(xscale="log", yscale="log", xlabel="documents", ylabel="seconds per 1k documents",
             title="end to end (tiny model): time")
    middle.set(xscale="log", yscale="log", xlabel="documents", ylabel="peak RSS MiB", title="end to end: memory")
    left.legend(fontsize=6)
    down = sorted((r for r in rows if r["kind"] == "downstream"), key=lambda r: (r["p"], r["rows"]))
    for p in sorted({r["p"] for r in down}):
        runs = [r for r in down if r["p"] == p]
        for name in ("shard_sums_s", "merge_s", "top10_s", "group_by_s"):
            right.plot([r["rows"] for r in runs], [r[name] for r in runs], marker="o", label=f"{name[:-2]}, p={p}")
    right.set(xscale="log", yscale="log", xlabel="gradient rows", ylabel="seconds", title="downstream (synthetic)")
    right.legend(fontsize=6)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    print(f"wrote {out}")
