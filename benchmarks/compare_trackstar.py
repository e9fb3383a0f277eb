"""Fact tracing side by side: this project's TrackStar vs Bergson 2.5.1 ``trackstar --unit_normalize``
(issue #30), on the held-out fixtures of ``bergson_fixture.py`` (one per seed).

Per seed and projection: Bergson through its own pipeline function in
``benchmarks/.bergson-venv`` (``bergson_trackstar_child.py``; full-text queries: Bergson's
prompt/completion path needs a chat template, which the demo tokenizer has not), and ours
through the engine functions the score assets use (``GradientCollector``, the training and
query autocorrelations, ``trackstar_preconditioner``, ``QueryScorer``) with the pipeline
defaults (no optimizer normalizer, summed token loss, cosine, damping 0.1, auto mixing), for
full-text queries (loss on every token but the first) and prompt/completion queries (loss on
the answer), and ours before #30 on full-text queries (auto mixing with the paper's share of
the dims, ``k = dims * 1000 / 65536``, for every query form).
Same model, documents, token ids and projection size; the projection matrices are each tool's
own (seeded) draws. MRR and recall@10: rank of the first gold document among all documents,
ties pessimistic. Prints per-seed figures, then mean and [min, max] over seeds.

    nice -n 10 .venv/bin/python benchmarks/compare_trackstar.py --seeds 1 2 3 --dims 16 32 64
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bergson_fixture import build_fixture, tokenized  # noqa: E402
from compare_bergson import BERGSON_PY, OFFLINE_ENV, ensure_bergson  # noqa: E402


def ranks_to_metrics(scores: np.ndarray, gold: list[list[int]]) -> tuple[float, float]:
    """(MRR, recall@10) of ``scores [q, n]``; rank = 1 + #non-gold scoring >= the best gold."""
    rr, hit = [], []
    for i, g in enumerate(gold):
        others = np.ones(scores.shape[1], dtype=bool)
        others[g] = False
        rank = 1 + int((scores[i, others] >= scores[i, g].max()).sum())
        rr.append(1.0 / rank)
        hit.append(rank <= 10)
    return float(np.mean(rr)), float(np.mean(hit))


def ours(folder: Path, p: int) -> dict[str, np.ndarray]:
    """``{row label: [q, n] scores}`` of our defaults (both query forms) and of the rule before #30."""
    import torch
    from transformers import AutoModelForCausalLM

    from attribution_assets.engine.gradients.collector import GradientCollector
    from attribution_assets.engine.preconditioning.autocorrelation import (
        accumulate,
        row_autocorrelation,
    )
    from attribution_assets.engine.preconditioning.preconditioners import trackstar_preconditioner
    from attribution_assets.engine.scoring.run import QueryScorer
    from attribution_assets.spec import GradientSpec, ScoringSpec

    docs, completion, full, _ = tokenized(folder)
    model = AutoModelForCausalLM.from_pretrained(folder / "model", dtype=torch.float32).eval()
    collector = GradientCollector(model, GradientSpec(projection_dim=p), device="cpu")
    layout = collector.module_layout
    train = collector.collect(docs)[0]
    r_train = accumulate([train], layout)
    scoring = ScoringSpec(top_k=0)
    out = {}
    for form, pairs in (("full text", full), ("prompt/completion", completion)):
        query = collector.collect(pairs)[0]
        r_query = row_autocorrelation(query, layout)
        settings = [("ours", form == "full text")] + [("ours before #30", False)] * (form == "full text")
        for name, full_text in settings:
            pre = trackstar_preconditioner(r_train, r_query, scoring, full_text=full_text)
            out[f"{name}, {form}"] = QueryScorer(query, None, pre, scoring).score(train)
    return out


def bergson(folder: Path, p: int, work: Path) -> np.ndarray:
    """Bergson's ``[q, n]`` full-text scores (a fresh child process in its own venv)."""
    out = work / f"bergson-{folder.name}-p{p}"
    if not (out / "scores.npy").is_file():
        shutil.rmtree(out, ignore_errors=True)  # an interrupted run's folder: Bergson refuses to reuse it
        env = {**os.environ, **OFFLINE_ENV}
        cmd = [str(BERGSON_PY), str(HERE / "bergson_trackstar_child.py"), str(folder), str(p), str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
            raise SystemExit(f"Bergson failed on {folder} at projection {p}")
    return np.load(out / "scores.npy")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--storage", default="/tmp/compare-trackstar", help="fixtures and Bergson runs (kept)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the per-seed figures here")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.environ.update(OFFLINE_ENV, OMP_NUM_THREADS=str(args.threads))
    ensure_bergson()
    root = Path(args.storage)
    rows = []
    for seed in args.seeds:
        folder = build_fixture(root, seed, log=lambda m: print(m, flush=True))
        gold = tokenized(folder)[3]
        for p in args.dims:
            started = time.perf_counter()
            scores = {"Bergson 2.5.1, full text": bergson(folder, p, root)} | ours(folder, p)
            for name, s in scores.items():
                mrr, r10 = ranks_to_metrics(s, gold)
                rows.append({"seed": seed, "projection": p, "method": name, "mrr": mrr, "recall@10": r10})
                print(f"seed {seed}  p {p:3d}  {name:36s} MRR {mrr:.3f}  R@10 {r10:.3f}", flush=True)
            print(f"seed {seed}  p {p}: {time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"\nmean [min, max] over seeds {args.seeds}\n")
    print("| method | " + " | ".join(f"p = {p}: MRR | R@10" for p in args.dims) + " |")
    print("|---|" + "---:|---:|" * len(args.dims))
    for name in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for p in args.dims:
            for key in ("mrr", "recall@10"):
                v = [r[key] for r in rows if r["method"] == name and r["projection"] == p]
                cells.append(f"{np.mean(v):.3f} [{min(v):.3f}, {max(v):.3f}]")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
