"""Two pipelines on the same cores: does each finish within 2.5x of its time alone?

A small demo pipeline (synthetic facts, a GPT-NeoX trained on them, gradients, TrackStar
preconditioner, FAISS index, score tables) is materialized in a subprocess with its own
``DAGSTER_HOME`` and storage, first alone, then two at once. Each run prints its stages'
wall times; the table gives, per stage, the time alone and in each of the two concurrent
runs, and the ratios (target: total <= 2.5x alone). Thread settings are the package's
defaults (``threads: 0`` = the cores this process may use; pools wait passively). With
``--spin`` the runs use busy-waiting pools instead (``OMP_WAIT_POLICY=ACTIVE``,
``KMP_BLOCKTIME=200``, ``OPENBLAS_THREAD_TIMEOUT=28``: the libraries' behaviour before
the package set its defaults), for comparison.

    .venv/bin/python benchmarks/bench_shared_cores.py [--people 30] [--spin]
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

SPIN = {"OMP_WAIT_POLICY": "ACTIVE", "KMP_BLOCKTIME": "200", "OPENBLAS_THREAD_TIMEOUT": "28"}


def child(root: Path, people: int, epochs: int) -> dict:
    from attribution_assets.defs.instance import persistent_instance
    from attribution_assets.defs.planning import STAGES
    from attribution_assets.defs.runner import materialize_pipeline
    from attribution_assets.engine.runtime import available_cores
    from attribution_assets.spec import demo_spec
    from tests.helpers import definitions_for

    spec = demo_spec(people=people, epochs=epochs)
    defs = definitions_for([spec], root / "storage")
    instance = persistent_instance(root / "dagster_home")
    stages = []
    for stage in STAGES:
        start = time.perf_counter()
        materialize_pipeline(defs, spec, instance, stages=[stage], log=lambda _: None, log_level="ERROR")
        stages.append((stage[0][-1], time.perf_counter() - start))
    return {"stages": stages, "threads": available_cores(), "wait_policy": os.environ.get("OMP_WAIT_POLICY")}


def launch(args, tmp: Path, name: str) -> subprocess.Popen:
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in SPIN and k != "OMP_NUM_THREADS"}
    env |= {"PYTHONPATH": f"{repo}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"} | (SPIN if args.spin else {})
    root = tmp / name
    root.mkdir()
    return subprocess.Popen([sys.executable, __file__, "--child", str(root), "--people", str(args.people),
                             "--epochs", str(args.epochs)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, started: float) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        sys.exit(f"a pipeline run failed:\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - started
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--people", type=int, default=30, help="demo people (~19 documents each)")
    ap.add_argument("--epochs", type=int, default=3, help="demo model training epochs")
    ap.add_argument("--spin", action="store_true", help="busy-waiting thread pools (the old behaviour)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child), args.people, args.epochs)))
        return
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        alone = finish(launch(args, tmp, "alone"), start)
        start = time.perf_counter()
        procs = [launch(args, tmp, name) for name in ("a", "b")]
        pair = [finish(proc, start) for proc in procs]
    print(f"demo pipeline, {args.people} people, {args.epochs} epochs; threads per run: {alone['threads']}; "
          f"OMP_WAIT_POLICY={alone['wait_policy']}; {os.cpu_count()} CPUs; 1-minute load average "
          f"before: {load:.2f}")
    print(f"{'stage (last asset)':>24} {'alone s':>8} {'A s':>8} {'B s':>8} {'A/alone':>8} {'B/alone':>8}")
    rows = [(name, t, a, b) for (name, t), (_, a), (_, b)
            in zip(alone["stages"], pair[0]["stages"], pair[1]["stages"])]
    rows.append(("total (process wall)", alone["wall"], pair[0]["wall"], pair[1]["wall"]))
    for name, t, a, b in rows:
        print(f"{name:>24} {t:8.1f} {a:8.1f} {b:8.1f} {a / t:8.2f} {b / t:8.2f}")
    worst = max(pair[0]["wall"], pair[1]["wall"]) / alone["wall"]
    print(f"two at once: the slower finished in {worst:.2f}x its time alone (target <= 2.5)")


if __name__ == "__main__":
    main()
