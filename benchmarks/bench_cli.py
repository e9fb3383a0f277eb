"""How fast the `attribution` command answers: `--help` in a fresh interpreter, loading the
Dagster definitions (what every process pays that loads them: the CLI, each queued run, code
servers, the UI), and a no-op `materialize` of an up-to-date pipeline of 400 documents (4 shards)
made by `attribution run` from a generated corpus (a local model from `attribution init`, no
download), with the heavy libraries the no-op imported (none expected).

    .venv/bin/python benchmarks/bench_cli.py             # figures (about 1-2 min on 2 cores)
    .venv/bin/python benchmarks/bench_cli.py --shards 40 # planning against the shard count
    .venv/bin/python benchmarks/bench_cli.py --profile   # also the no-op's top functions (cProfile)

Each figure is the median of --repeat fresh processes: wall seconds and CPU seconds (user +
system, which other load on a shared machine disturbs less), next to the slowest wall time.
The processes import the package as the environment resolves it, so `PYTHONPATH=<a checkout of
another revision>` times that revision with the same script.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["Mara", "Tomas", "Ada", "Lena", "Piet", "Ines", "Olek", "Rui", "Sana", "Yuri"]
PLACES = ["Lisbon", "Porto", "Oslo", "Riga", "Lyon", "Turin", "Graz", "Cork", "Bern", "Gent"]
VERBS = ["was born in", "lives in", "works in", "studied in", "once visited"]
#: Libraries that loading the definitions and planning do not need (steps import them).
HEAVY = ("torch", "transformers", "scipy", "faiss", "polars", "duckdb", "datasets")


def write_data(folder: Path, documents: int = 400) -> None:
    """``corpus.jsonl`` (``documents`` one-sentence facts) and ``queries.jsonl`` (prompt/completion)."""
    rng = random.Random(0)
    lines = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(PLACES)} in {1800 + i}." for i in range(documents)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"prompt": f"{n} was born in", "completion": f" {p}"})
                                                  + "\n" for n, p in zip(NAMES, PLACES)))


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, float, str]:
    """Wall and CPU seconds of ``command`` and its output (raises if it fails)."""
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - start, _children_cpu() - cpu
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, cpu, done.stdout + done.stderr


def figure(name: str, command: list[str], env: dict, cwd: Path, repeat: int) -> str:
    """Run ``command`` ``repeat`` times; print the median wall and CPU seconds; return the last output."""
    runs = [timed(command, env, cwd) for _ in range(repeat)]
    walls = [wall for wall, _, _ in runs]
    print(f"{name:<44} median {statistics.median(walls):6.2f} s (cpu {statistics.median(c for _, c, _ in runs):5.2f} s)"
          f"   max {max(walls):6.2f} s   ({repeat} runs)", flush=True)
    return runs[-1][2]


def with_loaded_modules(args: list[str]) -> list[str]:
    """``python -m attribution_assets.cli *args`` that also prints, at exit, which of
    :data:`HEAVY` it imported."""
    code = ("import atexit, runpy, sys; "
            f"atexit.register(lambda: print('heavy imports:', [m for m in {HEAVY!r} if m in sys.modules])); "
            f"sys.argv = ['attribution', *{args!r}]; runpy.run_module('attribution_assets.cli', run_name='__main__')")
    return [sys.executable, "-c", code]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--shards", type=int, default=4, help="shards of the pipeline (documents / shards each)")
    parser.add_argument("--profile", action="store_true", help="print the no-op's top 25 functions by cumulative time")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "attribution_assets.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "DAGSTER_HOME": str(folder / "home"), "ATTRIBUTION_STORAGE": str(folder / "storage"),
               "ATTRIBUTION_PIPELINES": str(folder / "pipelines.yaml"), "HF_HUB_OFFLINE": "1", "CI": "true"}
        figure("attribution --help", [*cli, "--help"], env, folder, args.repeat)
        write_data(folder, args.documents)
        seconds, _, out = timed([*cli, "run", "--corpus", "corpus.jsonl", "--queries", "queries.jsonl",
                                 "--prompt-column", "prompt", "--completion-column", "completion", "--shard-size",
                                 str(max(1, -(-args.documents // args.shards)))], env, folder)
        print(f"{'attribution run (first build, incl. init)':<44} {seconds:6.2f} s", flush=True)
        figure("import attribution_assets.definitions", [sys.executable, "-c", "import attribution_assets.definitions"],
               env, folder, args.repeat)
        noop = [*cli, "materialize", "--pipeline", "corpus"]
        out = figure(f"no-op materialize, {args.documents} documents, {args.shards} shards", noop, env, folder,
                     args.repeat)
        assert out.count("up to date") >= 5, out
        out = timed(with_loaded_modules(noop[3:]), env, folder)[2]
        print(next(line for line in out.splitlines() if line.startswith("heavy imports:")).replace(
            "heavy imports:", f"{'heavy libraries the no-op imported':<44}"), flush=True)
        if args.profile:
            stats = folder / "noop.prof"
            timed([sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "attribution_assets.cli",
                   *noop[3:]], env, folder)
            import pstats

            pstats.Stats(str(stats)).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
