"""EK-FAC / K-FAC fact tracing on the materialized demo, per projection dimension and space:
why the space matters. Prints one MRR table (completion-loss queries, no optimizer normalizer).

    .venv/bin/python benchmarks/ekfac_projection.py --dims 32 0          # p = 0: no projection
    .venv/bin/python benchmarks/ekfac_projection.py --dims 32 0 --damping 0.01 0.1 1
    .venv/bin/python benchmarks/ekfac_projection.py --dims 0 --save-scores .storage/demo-evaluation/scores

Rows: dot and cosine at that ``p``; EK-FAC and K-FAC in the ``projected`` space (the curvature
of the projected rows) and the ``full`` space (each full query gradient preconditioned, then
projected and scored against the projected training rows). At ``p = 0`` the two spaces are the
same exact influence. ``--save-scores`` adds the ``p = 0`` score matrices (``<method> (p=0).npy``)
to an ``eval_demo.py`` scores folder, so ``eval_demo.py --reuse-scores`` reports their LDS.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from attribution_assets.engine.evaluation.fact_tracing import first_gold_ranks, markdown_table
from attribution_assets.engine.evaluation.metrics import recall_and_mrr
from attribution_assets.engine.gradients.collector import GradientCollector
from attribution_assets.engine.io.atomic import atomic_file
from attribution_assets.engine.io.data import read_tokenized
from attribution_assets.engine.io.models import load_pipeline_model
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.engine.preconditioning.curvature import CurvatureCollector
from attribution_assets.engine.preconditioning.kfac import (
    KroneckerEigen,
    KroneckerPreconditioner,
)
from attribution_assets.engine.preconditioning.kfac_files import projection_for
from attribution_assets.spec import demo_spec


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.finfo(np.float32).tiny)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("ATTRIBUTION_STORAGE", ".storage"))
    parser.add_argument("--dims", type=int, nargs="+", default=[32, 0])
    parser.add_argument("--damping", type=float, nargs="+", default=[0.1])
    parser.add_argument("--labels", default="sampled", choices=("sampled", "true"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-scores", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec, paths = demo_spec(), PipelinePaths.under(args.storage, "demo")
    model, _ = load_pipeline_model(spec, paths)
    docs = [d for s in paths.gradient_shards() for d in read_tokenized(paths.tokens(s))]
    queries = read_tokenized(paths.query_tokens)
    table = pl.read_parquet(paths.queries)
    gold = dict(zip(table["doc_id"].to_list(), table["gold_doc_ids"].to_list(), strict=True))
    doc_ids, query_ids = [d.doc_id for d in docs], [q.doc_id for q in queries]
    pairs, query_pairs = [(d.input_ids, d.loss_mask) for d in docs], [(q.input_ids, q.loss_mask) for q in queries]
    rows = []

    def report(method: str, p: int, damping: float | None, scores: np.ndarray) -> None:
        metrics = recall_and_mrr(first_gold_ranks(scores, doc_ids, query_ids, gold), (1, 10))
        rows.append({"method": method, "p": p, "damping": damping, **metrics})
        print(rows[-1], flush=True)
        if args.save_scores is not None and p == 0:
            with atomic_file(args.save_scores / f"{method} (p=0).npy") as tmp, open(tmp, "wb") as f:
                np.save(f, scores.astype(np.float32), allow_pickle=False)

    start = time.perf_counter()
    curvature = CurvatureCollector(model, spec.gradients, args.labels, 0)
    covariance = curvature.covariance(pairs)
    print(f"covariance {time.perf_counter() - start:.1f} s", flush=True)
    for p in args.dims:
        gradients = dataclasses.replace(spec.gradients, projection_dim=p, normalizer="none")
        train = GradientCollector(model, gradients).collect(pairs)[0]
        query = GradientCollector(model, gradients).collect(query_pairs)[0]
        report("dot", p, None, query @ train.T)
        report("cosine", p, None, unit(query) @ unit(train).T)
        for space in ("projected", "full") if p else ("full",):
            eigen = KroneckerEigen.from_covariance(covariance, projection_for(gradients, space))
            correction = curvature.correction(pairs, eigen)
            for kind in ("ekfac", "kfac"):
                for damping in args.damping:
                    pre = KroneckerPreconditioner(eigen, correction if kind == "ekfac" else None, damping)
                    prepared = GradientCollector(model, gradients, transform=pre).collect(query_pairs)[0]
                    name = kind if p == 0 else f"{kind} ({space} space)"
                    report(name, p, damping, prepared @ train.T)
                    report(f"{name} (cosine)", p, damping, unit(prepared) @ unit(train).T)
        del train
    print(f"\n{len(docs)} documents, {len(queries)} queries, labels {args.labels}, "
          f"{time.perf_counter() - start:.0f} s\n\n{markdown_table(pl.DataFrame(rows))}")


if __name__ == "__main__":
    main()
