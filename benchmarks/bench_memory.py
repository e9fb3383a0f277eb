"""Peak resident memory of a whole demo-like pipeline at ``projection_dim: 64``, at two corpus
sizes: does the peak stay flat when the corpus doubles?

Each size runs in a fresh subprocess with its own storage and an ephemeral Dagster instance:
the demo pipeline (synthetic facts, a GPT-NeoX trained for ``--epochs`` on them, Adafactor
normalization) with ``projection_dim`` 64, materialized stage by stage in one process (the
``in_process`` executor). Before each stage the process's peak-RSS window is reset
(``engine.runtime.reset_peak_rss``); assets that record ``peak_rss_mb`` in their metadata
reset it again when their step starts, so a stage's peak is the largest of its reading at
the end and its assets' own figures (printed too). The last lines give each run's peak and
the growth when the corpus doubles (target < 10%).

    .venv/bin/python benchmarks/bench_memory.py --people 47 94
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(people: int, root: Path, projection_dim: int, epochs: int) -> dict:
    import dagster as dg

    from attribution_assets.defs.common import key
    from attribution_assets.defs.planning import STAGES
    from attribution_assets.defs.runner import materialize_pipeline
    from attribution_assets.engine.io.corpus import read_documents
    from attribution_assets.engine.runtime import peak_rss_mb, reset_peak_rss
    from attribution_assets.spec import GradientSpec, demo_spec
    from tests.helpers import definitions_for

    spec = demo_spec(people=people, shard_size=256, epochs=epochs,
                     gradients=GradientSpec(projection_dim=projection_dim, normalizer="adafactor"))
    defs = definitions_for([spec], root)
    instance = dg.DagsterInstance.ephemeral()
    stages, metadata = [], {}
    for stage in STAGES:
        reset_peak_rss()
        start = time.perf_counter()
        materialize_pipeline(defs, spec, instance, stages=[stage], log=lambda _: None, log_level="ERROR")
        seconds, peak = round(time.perf_counter() - start, 1), round(peak_rss_mb())
        for name in stage[0]:
            event = instance.get_latest_materialization_event(key(spec, name))
            value = event and event.asset_materialization.metadata.get("peak_rss_mb")
            if value is not None:
                metadata[name] = round(value.value)
                peak = max(peak, metadata[name])
        stages.append({"stage": "+".join(stage[0]), "seconds": seconds, "peak_rss_mb": peak})
    documents = len(read_documents(defs.resources["storage"].paths(spec).documents))
    return {"people": people, "documents": documents, "stages": stages, "asset_peak_rss_mb": metadata,
            "peak_rss_mb": max(s["peak_rss_mb"] for s in stages)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, nargs=2, default=[47, 94],
                    help="demo people of the two runs (~17.5 documents each: 825 and 1591 documents)")
    ap.add_argument("--projection-dim", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=2, help="demo model training (memory does not depend on it)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--root", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, Path(args.root), args.projection_dim, args.epochs)))
        return
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = []
    for people in args.people:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run([sys.executable, __file__, "--child", str(people), "--root", tmp,
                                  "--projection-dim", str(args.projection_dim), "--epochs", str(args.epochs)],
                                 env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"run with {people} people failed:\n{out.stderr[-4000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(run)
        print(f"\n{run['documents']} documents ({people} people), projection_dim {args.projection_dim}")
        print(f"{'stage (assets)':>70} {'seconds':>8} {'peak MiB':>9}")
        for s in run["stages"]:
            print(f"{s['stage']:>70} {s['seconds']:8.1f} {s['peak_rss_mb']:9d}")
        if run["asset_peak_rss_mb"]:
            print("asset metadata peak_rss_mb: " + ", ".join(f"{k} {v}" for k, v in run["asset_peak_rss_mb"].items()))
    small, large = runs
    growth = large["peak_rss_mb"] / small["peak_rss_mb"] - 1
    print(f"\npeak RSS: {small['peak_rss_mb']} MiB ({small['documents']} documents), "
          f"{large['peak_rss_mb']} MiB ({large['documents']} documents): growth {growth:+.1%} (target < 10%)")


if __name__ == "__main__":
    main()
