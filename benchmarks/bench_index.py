"""Benchmark the FAISS index engine on synthetic gradient-like vectors; prints a table.

Data: clustered unit vectors (topic centre + low-rank variation + isotropic noise,
normalized), which mimic preconditioned, unit-normalized training gradients: a random
pair has cosine ~0, a query's top-1 neighbour ~0.3. Queries are held-out rows of the
same distribution; a second, disjoint set of as many rows calibrates the ``auto``
nprobe / efSearch (as the pipeline's queries do). Recall@k is against the first factory
(``Flat``, exact), computed in the same process. Every index is built with
``build_index`` from shard-sized blocks, loaded with ``FaissIndex.load(mmap=True)`` and
searched with ``FaissIndex.search``.

    .venv/bin/python benchmarks/bench_index.py --n 100000 --d 2048
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from attribution_assets.engine.search.build import build_index
from attribution_assets.engine.search.index import FaissIndex, recall_at_k
from attribution_assets.spec import IndexSpec

FACTORIES = ["Flat", "SQfp16", "IVF{auto},Flat", "IVF{auto},PQ64", "HNSW32"]


def gradient_like(n: int, d: int, seed: int = 0, rank: int = 64, noise: float = 2.0):
    """``[n, d]`` float32 unit rows: sqrt(n)/2 topic centres, rank-64 variation, noise."""
    rng = np.random.default_rng(seed)
    clusters = max(8, int(np.sqrt(n) / 2))
    centers = rng.standard_normal((clusters, d), dtype=np.float32) / np.sqrt(d)
    basis = rng.standard_normal((rank, d), dtype=np.float32) / np.sqrt(d)
    scale = 1 / np.sqrt(np.arange(1, rank + 1, dtype=np.float32))
    scale /= np.linalg.norm(scale)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, 8192):
        m = min(8192, n - s)
        x = centers[rng.integers(0, clusters, m)]
        x += (rng.standard_normal((m, rank), dtype=np.float32) * scale) @ basis
        x += noise / np.sqrt(d) * rng.standard_normal((m, d), dtype=np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakRss:
    """Samples the resident set every 5 ms; ``delta`` is peak minus start (MiB)."""

    def __enter__(self):
        self.start = self.peak = rss_mib()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while not self.done.wait(0.005):
            self.peak = max(self.peak, rss_mib())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, rss_mib())
        self.delta = self.peak - self.start


def latency_ms(index: FaissIndex, queries: np.ndarray, k: int, batch: int, reps: int) -> float:
    """Mean milliseconds per query when searching ``batch`` queries per call."""
    index.search(queries[:batch], k)  # warm-up: page in mapped data
    start, done = time.perf_counter(), 0
    for r in range(reps):
        s = (r * batch) % max(1, len(queries) - batch + 1)
        index.search(queries[s:s + batch], k)
        done += batch
    return (time.perf_counter() - start) * 1000 / done


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="indexed vectors")
    ap.add_argument("--d", type=int, default=2048, help="dimensionality")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--shard", type=int, default=10_000, help="rows per input block")
    ap.add_argument("--train-sample", type=int, default=20_000)
    ap.add_argument("--threads", type=int, default=2, help="FAISS OpenMP threads")
    ap.add_argument("--factories", nargs="+", default=FACTORIES,
                    help="the first one is the exact reference for recall")
    ap.add_argument("--workdir", default=None, help="where indexes are written (temp dir)")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)

    t = time.perf_counter()
    data = gradient_like(args.n + 2 * args.queries, args.d)
    x, queries, calibration = np.split(data, [args.n, args.n + args.queries])
    ids = [f"doc-{i:07d}" for i in range(args.n)]
    print(f"data: {args.n} x {args.d} float32 ({x.nbytes / 2**20:.0f} MiB), "
          f"{args.queries} queries, {time.perf_counter() - t:.1f} s; "
          f"faiss {faiss.__version__}, {args.threads} threads")

    def blocks():
        return ((ids[s:s + args.shard], x[s:s + args.shard]) for s in range(0, args.n, args.shard))

    root = Path(tempfile.mkdtemp(prefix="bench-index-", dir=args.workdir))
    rows, exact = [], None
    try:
        for factory in args.factories:
            config = IndexSpec(factory=factory, train_sample=args.train_sample)
            with PeakRss() as mem:
                info = build_index(blocks, config, root / "ix", calibration=calibration)
            index = FaissIndex.load(root / "ix", mmap=True)
            found, _ = index.search(queries, args.k)
            exact = exact or found
            rows.append([
                info.factory, f"{info.build_seconds:.1f}", f"{info.bytes / 2**20:.0f}",
                f"{mem.delta:.0f}",
                f"{latency_ms(index, queries, args.k, 1, min(50, args.queries)):.2f}",
                f"{latency_ms(index, queries, args.k, 64, 4):.2f}",
                f"{recall_at_k(found, exact, args.k):.3f}",
                str(info.nprobe or info.hnsw_ef_search or "-"),
                f"{info.calibration['seconds']:.1f}" if info.calibration else "-",
            ])
            print(f"  {factory}: done", flush=True)
            del index
            shutil.rmtree(root / "ix")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    head = ["index", "build s", "MiB on disk", "build peak RSS Δ MiB", "ms/query b=1",
            "ms/query b=64", f"recall@{args.k}", "nprobe/efSearch", "calibration s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---" for _ in head) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
