"""Fact tracing and linear datamodeling score (LDS) on the materialized demo; prints tables.

Reads ``<storage>/demo`` (``make demo`` first; nothing there is modified) and writes
tables and LDS retrain partitions under ``--out``. Retrains are incremental: a
(subset, seed) whose ``query_losses.json`` exists is not retrained.

    .venv/bin/python benchmarks/eval_demo.py --k 32            # ~40 s per retrain, x2 seeds
    .venv/bin/python benchmarks/eval_demo.py --k 8 --workers 2 --epochs 20
    .venv/bin/python benchmarks/eval_demo.py --skip-lds        # fact tracing only
    .venv/bin/python benchmarks/eval_demo.py --reuse-scores    # LDS from the saved score matrices

``--demo '{"train_templates_per_relation": 8}'`` evaluates a demo generated with those
``DemoSpec`` overrides: materialize it first under its own ``--storage`` (e.g. with
``sweep_defaults.py``, whose corpora are such overrides) and give an ``--out`` of its own.

The completion-loss score matrices of every method are saved under ``--out/scores``
(``<method>.npy`` ``[q, n]``, ``doc_ids.json``, ``query_ids.json``), so ``--reuse-scores``
recomputes the LDS tables without rerunning fact tracing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl
import torch

from attribution_assets.engine.demo.corpus import generate_demo_corpus
from attribution_assets.engine.evaluation import fact_tracing as evaluation
from attribution_assets.engine.evaluation import lds
from attribution_assets.engine.evaluation.metrics import recall_and_mrr
from attribution_assets.engine.io.atomic import atomic_dir
from attribution_assets.engine.io.data import read_tokenized
from attribution_assets.engine.io.models import load_pipeline_model
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import LDS_SEED_B_VARIES, DemoSpec, demo_spec


def _retrain_job(args: tuple) -> float:
    model_dir, texts, keep, config, queries, out, (seed, order_seed) = args
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lds.retrain_partition(tokenizer, texts, keep, config, queries, out, seed=seed, order_seed=order_seed)
    return time.perf_counter() - started


def _spec(args):
    """The demo pipeline's spec with the ``--demo`` overrides (JSON; lists become tuples)."""
    overrides = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.demo).items()}
    return demo_spec(**overrides)


def _config(args) -> DemoSpec:
    demo = _spec(args).demo
    return dataclasses.replace(demo, epochs=args.epochs) if args.epochs else demo


def _run_folder(init: int, order: int) -> str:
    """``seed-S`` when one seed sets init and data order, else ``init-I-order-O``."""
    return f"seed-{init}" if init == order else f"init-{init}-order-{order}"


def retrain(demo: PipelinePaths, out: Path, queries, args) -> tuple[np.ndarray, dict[str, list[Path]]]:
    """Run the missing (subset, seed) retrains; return the masks and the partition folders
    of seed a and seed b."""
    texts = pl.read_parquet(demo.documents)["text"].to_list()
    config = _config(args)
    masks = lds.lds_subsets(len(texts), args.k, args.fraction, args.subset_seed)
    runs = lds.retrain_seeds(config.seed, args.seed_b_varies)
    root = out / "lds" / f"e{config.epochs}-f{args.fraction}-s{args.subset_seed}"
    dirs = {name: [root / f"subset-{k:03d}-{_run_folder(*seeds)}" for k in range(args.k)]
            for name, seeds in runs.items()}
    jobs = []
    for name, seeds in runs.items():
        for k, folder in enumerate(dirs[name]):
            if not (folder / "query_losses.json").exists():
                jobs.append((str(demo.tokenizer), texts, masks[k], config, queries, folder, seeds))
    print(f"LDS: {args.k} subsets x 2 seeds (seed b varies {args.seed_b_varies}), {len(jobs)} retrains to run "
          f"({config.epochs} epochs, {args.workers} workers)", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(args.workers) as pool:
        for i, seconds in enumerate(pool.map(_retrain_job, jobs)):
            print(f"  retrain {i + 1}/{len(jobs)}: {seconds:.1f} s", flush=True)
    print(f"retrain wall time {time.perf_counter() - started:.0f} s for {len(jobs)} retrains", flush=True)
    return masks, dirs


def lds_report(demo: PipelinePaths, out: Path, scores: dict[str, np.ndarray], doc_ids: list[str],
               query_ids: list[str], gold: dict, masks: np.ndarray, dirs: dict[str, list[Path]],
               args) -> None:
    """LDS per method and score variant (columns reordered to the training order), the gold
    documents as a reference predictor, and the seed agreement / noise ceiling."""
    corpus_ids = pl.read_parquet(demo.documents)["doc_id"].to_list()
    position = {d: i for i, d in enumerate(doc_ids)}
    order = np.array([position[d] for d in corpus_ids])
    started = time.perf_counter()
    references = {"gold documents (reference)": lds.gold_indicator(query_ids, corpus_ids, gold)}
    frame, markdown = lds.lds_table({n: s[:, order] for n, s in scores.items()}, masks,
                                    lds.read_partition_losses(dirs["seed a"], query_ids, masks),
                                    lds.read_partition_losses(dirs["seed b"], query_ids, masks),
                                    top_k=args.top_k, references=references, baseline="dot")
    epochs = _config(args).epochs
    suffix = "" if args.seed_b_varies == "init_and_data_order" else f"_{args.seed_b_varies}"
    evaluation.write_tables(frame, markdown, out, f"lds_k{args.k}_e{epochs}_f{args.fraction}{suffix}")
    print(f"\nLDS ({args.k} subsets, fraction {args.fraction}, {epochs} epochs, completion-loss "
          f"query gradients, seed b varies {args.seed_b_varies}):\n{markdown}")
    print(f"LDS computation {time.perf_counter() - started:.1f} s")


def alias_table(spec, docs, query_ids: list[str], gold: dict, scores: dict[str, np.ndarray]) -> str:
    """MRR and recall@10 of each method on the alias queries (gold documents name the person
    only by an alias) and on the other queries."""
    alias = {q["query_id"] for q in generate_demo_corpus(spec.demo).queries if q["alias"]}
    doc_ids = [d.source_id for d in docs]
    rows = []
    for name, matrix in scores.items():
        ranks = evaluation.first_gold_ranks(matrix, doc_ids, query_ids, gold)
        for kind, keep in (("alias", True), ("named", False)):
            subset = {q: r for q, r in ranks.items() if (q in alias) == keep}
            if subset:
                m = recall_and_mrr(subset, (1, 10))
                rows.append({"method": name, "queries": kind, "count": m["queries"],
                             "recall@10": m["recall@10"], "mrr": m["mrr"]})
    return evaluation.markdown_table(pl.DataFrame(rows))


def save_scores(folder: Path, scores: dict[str, np.ndarray], doc_ids: list[str], query_ids: list[str]) -> None:
    """Replace ``folder`` atomically with one ``<method>.npy`` per method and the id lists."""
    with atomic_dir(folder) as tmp:
        for name, matrix in scores.items():
            np.save(tmp / f"{name}.npy", matrix.astype(np.float32), allow_pickle=False)
        (tmp / "doc_ids.json").write_text(json.dumps(doc_ids))
        (tmp / "query_ids.json").write_text(json.dumps(query_ids))


def load_scores(folder: Path) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    if not (folder / "doc_ids.json").is_file():
        raise SystemExit(f"no saved scores in {folder}: run once without --reuse-scores")
    scores = {p.stem: np.load(p, allow_pickle=False) for p in sorted(folder.glob("*.npy"))}
    return (scores, json.loads((folder / "doc_ids.json").read_text()),
            json.loads((folder / "query_ids.json").read_text()))


def main() -> None:
    spec_defaults = demo_spec().evaluation
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default=os.environ.get("ATTRIBUTION_STORAGE", ".storage"))
    parser.add_argument("--out", default=".storage/demo-evaluation")
    parser.add_argument("--k", type=int, default=32, help="LDS subsets")
    parser.add_argument("--fraction", type=float, default=spec_defaults.lds_fraction,
                        help="share of the documents each LDS subset keeps")
    parser.add_argument("--subset-seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=None, help="retrain epochs (default: demo's)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch threads for gradients")
    parser.add_argument("--demo", default="{}", help="DemoSpec overrides as JSON (default: the demo's)")
    parser.add_argument("--skip-lds", action="store_true")
    parser.add_argument("--reuse-scores", action="store_true",
                        help="LDS from the score matrices a previous run saved (no fact tracing)")
    parser.add_argument("--seed-b-varies", choices=LDS_SEED_B_VARIES, default=spec_defaults.lds_seed_b_varies,
                        help="what the second retrain of each subset changes (EvaluationSpec.lds_seed_b_varies)")
    parser.add_argument("--top-k", type=int, nargs="+", default=list(spec_defaults.lds_top_k),
                        help="LDS score variants: 0 = every score, k = each query's top k")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo, out = PipelinePaths.under(args.storage, "demo"), Path(args.out)
    spec = _spec(args)
    model, _ = load_pipeline_model(spec, demo)
    shards = demo.tokenized_shards()
    docs = [d for s in shards for d in read_tokenized(demo.tokens(s))]
    queries = read_tokenized(demo.query_tokens)
    qs = pl.read_parquet(demo.queries)
    gold = dict(zip(qs["doc_id"].to_list(), qs["gold_doc_ids"].to_list(), strict=True))
    print(f"{len(docs)} documents, {len(queries)} queries, p = {spec.gradients.projection_dim}")

    if not args.skip_lds:
        masks, dirs = retrain(demo, out, queries, args)
    query_ids = [q.doc_id for q in queries]
    if args.reuse_scores:
        scores, doc_ids, saved_query_ids = load_scores(out / "scores")
        assert saved_query_ids == query_ids, "saved scores are for other queries"
    else:
        started = time.perf_counter()
        result = evaluation.fact_tracing_table(model, spec, demo, docs, queries, gold)
        evaluation.write_tables(result.frame, result.markdown, out, "fact_tracing")
        print(f"\nFact tracing (configured: {spec.gradients.normalizer} TrackStar):\n{result.markdown}")
        print(f"fact tracing wall time {time.perf_counter() - started:.1f} s", flush=True)
        scores, doc_ids = result.scores["completion"], [d.doc_id for d in docs]
        save_scores(out / "scores", scores, doc_ids, query_ids)
        print(f"\nBy query kind (completion-loss scores):\n{alias_table(spec, docs, query_ids, gold, scores)}")
    if not args.skip_lds:
        lds_report(demo, out, scores, doc_ids, query_ids, gold, masks, dirs, args)


if __name__ == "__main__":
    main()
