"""Sweep of the gradient settings that decide fact-tracing quality, on generated corpora.

Grid: ``projection_dim`` (default 16 32 64 128) x query loss (``completion`` = answer only,
``full`` = whole query text) x optimizer normalizer (``none``, ``adafactor``, ``adam``), each
scored with TrackStar (preconditioned cosine), BM25 as the reference. Corpora: ``demo``
(the embedded demo's DemoSpec), ``heldout`` (a different seed: other people, answers, init
and data order; ``template_variant: 1``: other query phrasings) and ``other`` (``names: 1``,
``relations: DEMO_OTHER_RELATIONS``, seed 11: other names, relations, answers and phrasings),
so that defaults chosen on the demo are checked on corpora they were not tuned on; and
``fewer-gold`` (8 phrasings per fact instead of 12, for ``eval_demo.py --demo``'s LDS probe).

Each corpus is materialized once (corpus, tokenizer, model, tokenized shards and queries) under
``--storage/<corpus>/<pipeline>`` (kept and reused: ``ln -s $PWD/.storage <storage>/demo``
reuses ``make demo``'s model and shards); every grid point then runs
``fact_tracing.fact_tracing_table`` (the assets' code path) without tail patch. Prints one
Markdown table per corpus (MRR, recall@10, bytes per stored row, seconds per grid point) and
writes ``sweep.json`` under ``--out``.

    nice -n 10 .venv/bin/python benchmarks/sweep_defaults.py --storage /tmp/sweep
    .venv/bin/python benchmarks/sweep_defaults.py --corpora heldout --dims 32 64
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import dagster as dg
import polars as pl
import torch

from attribution_assets.defs.factory import build_definitions
from attribution_assets.defs.planning import Stage
from attribution_assets.defs.profiles import DeploymentProfile
from attribution_assets.defs.resources import ComputeResource, StorageResource
from attribution_assets.defs.runner import materialize_pipeline
from attribution_assets.engine.evaluation import fact_tracing
from attribution_assets.engine.evaluation.methods import BM25, trackstar
from attribution_assets.engine.gradients.collect import collect, make_collector
from attribution_assets.engine.io.data import read_tokenized
from attribution_assets.engine.io.models import load_pipeline_model
from attribution_assets.engine.io.paths import PipelinePaths
from attribution_assets.spec import DEMO_OTHER_RELATIONS, EvaluationSpec, demo_spec

CORPORA = {"demo": {}, "heldout": {"seed": 7, "template_variant": 1},  # DemoSpec overrides
           "other": {"seed": 11, "names": 1, "relations": DEMO_OTHER_RELATIONS},
           # 8 gold documents per fact: the 4 query-word phrasings and 4 plain ones (reversed lists)
           "fewer-gold": {"train_templates_per_relation": 8, "template_variant": 1}}
NORMALIZERS = ("none", "adafactor", "adam")
STAGES = (Stage("prepare", ("corpus", "query_set", "tokenizer", "model", "tokenized_queries"), False),
          Stage("shards", ("tokenized_shards",), True))


def prepare(corpus: str, root: Path):
    """Materialize the corpus's inputs (no gradients) unless ``root`` holds them (a model and
    tokenized shards, e.g. ``make demo``'s storage; a model alone is kept and not retrained);
    return ``(spec, paths, shards)``."""
    spec = demo_spec(evaluation=EvaluationSpec(tail_patch_k=0), **CORPORA[corpus])
    paths = PipelinePaths.under(root, spec.name)
    if not ((paths.model / "training.json").is_file() and paths.tokenized_shards()):
        profile = DeploymentProfile("local", None, StorageResource(root=str(root)), ComputeResource())
        defs = build_definitions([spec], profile)
        instance = dg.DagsterInstance.ephemeral()
        stages = STAGES
        if (paths.model / "training.json").is_file():  # a model trained with the same DemoSpec
            stages = [dataclasses.replace(s, assets=tuple(a for a in s.assets if a != "model")) for s in STAGES]
        materialize_pipeline(defs, spec, instance, stages=stages, log=lambda _: None, log_level="WARNING")
    return spec, paths, paths.tokenized_shards()


def sweep(corpus: str, root: Path, dims: list[int], normalizers: list[str]) -> list[dict]:
    started = time.perf_counter()
    spec, paths, shards = prepare(corpus, root)
    model, _ = load_pipeline_model(spec, paths)
    training = json.loads((paths.model / "training.json").read_text())["metrics"]
    docs = [d for s in shards for d in read_tokenized(paths.tokens(s))]
    queries = read_tokenized(paths.query_tokens)
    table = pl.read_parquet(paths.queries)
    gold = dict(zip(table["doc_id"].to_list(), table["gold_doc_ids"].to_list(), strict=True))
    print(f"{corpus}: {len(docs)} documents, {len(queries)} queries, held-out accuracy "
          f"{training['held_out_phrasing_accuracy']:.3f}, prepared in {time.perf_counter() - started:.0f} s",
          flush=True)
    methods = [BM25] + [trackstar(n) for n in normalizers]
    rows = []
    for p in dims:
        gradients = dataclasses.replace(spec.gradients, projection_dim=p)
        spec_p = dataclasses.replace(spec, gradients=gradients)
        started = time.perf_counter()
        result = fact_tracing.fact_tracing_table(model, spec_p, paths, docs, queries, gold, methods)
        seconds = time.perf_counter() - started
        row_bytes = collect(make_collector(model, spec_p, paths), docs[:1])[0].shape[1] * 4
        for r in result.frame.iter_rows(named=True):
            if r["method"] == "bm25" and p != dims[0]:
                continue
            rows.append({"corpus": corpus, "projection_dim": None if r["method"] == "bm25" else p,
                         "method": r["method"], "query_loss": r["query_loss"], "mrr": r["mrr"],
                         "recall@10": r["recall@10"],
                         "row_bytes": None if r["method"] == "bm25" else row_bytes,
                         "seconds": round(seconds, 1),
                         "held_out_accuracy": training["held_out_phrasing_accuracy"]})
        print(fact_tracing.markdown_table(pl.DataFrame([r for r in rows if r["projection_dim"] == p])),
              f"p = {p}: {seconds:.0f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--storage", default="/tmp/attribution-sweep")
    parser.add_argument("--out", default=None, help="folder for sweep.json (default: --storage)")
    parser.add_argument("--corpora", nargs="+", default=list(CORPORA), choices=list(CORPORA))
    parser.add_argument("--dims", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--normalizers", nargs="+", default=list(NORMALIZERS), choices=NORMALIZERS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or args.storage)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for corpus in args.corpora:
        rows += sweep(corpus, Path(args.storage) / corpus, args.dims, args.normalizers)
        (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    print(fact_tracing.markdown_table(pl.DataFrame(rows)))


if __name__ == "__main__":
    main()
