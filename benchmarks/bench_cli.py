"""How fast the `attribution` command answers: `--help` in a fresh interpreter, and a no-op
`materialize` of an up-to-date pipeline of 400 documents (4 shards) made by `attribution run`
from a generated corpus (a local model from `attribution init`, no download).

    .venv/bin/python benchmarks/bench_cli.py            # figures (about 1-2 min on 2 cores)
    .venv/bin/python benchmarks/bench_cli.py --profile  # also the no-op's top functions (cProfile)

Each figure is the median of --repeat fresh processes (wall seconds), next to the slowest.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NAMES = ["Mara", "Tomas", "Ada", "Lena", "Piet", "Ines", "Olek", "Rui", "Sana", "Yuri"]
PLACES = ["Lisbon", "Porto", "Oslo", "Riga", "Lyon", "Turin", "Graz", "Cork", "Bern", "Gent"]
VERBS = ["was born in", "lives in", "works in", "studied in", "once visited"]


def write_data(folder: Path, documents: int = 400) -> None:
    """``corpus.jsonl`` (``documents`` one-sentence facts) and ``queries.jsonl`` (prompt/completion)."""
    rng = random.Random(0)
    lines = [f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(PLACES)} in {1800 + i}." for i in range(documents)]
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"prompt": f"{n} was born in", "completion": f" {p}"})
                                                  + "\n" for n, p in zip(NAMES, PLACES)))


def timed(command: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return seconds, done.stdout + done.stderr


def figure(name: str, samples: list[float]) -> None:
    print(f"{name:<44} median {statistics.median(samples):6.2f} s   max {max(samples):6.2f} s   "
          f"({len(samples)} runs)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--documents", type=int, default=400)
    parser.add_argument("--profile", action="store_true", help="print the no-op's top 25 functions by cumulative time")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "attribution_assets.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "DAGSTER_HOME": str(folder / "home"), "ATTRIBUTION_STORAGE": str(folder / "storage"),
               "ATTRIBUTION_PIPELINES": str(folder / "pipelines.yaml"), "HF_HUB_OFFLINE": "1", "CI": "true"}
        figure("attribution --help", [timed([*cli, "--help"], env, folder)[0] for _ in range(args.repeat)])
        write_data(folder, args.documents)
        seconds, out = timed([*cli, "run", "--corpus", "corpus.jsonl", "--queries", "queries.jsonl", "--prompt-column",
                              "prompt", "--completion-column", "completion", "--shard-size",
                              str(max(1, args.documents // 4))], env, folder)
        print(f"{'attribution run (first build, incl. init)':<44} {seconds:6.2f} s", flush=True)
        noop = [*cli, "materialize", "--pipeline", "corpus"]
        samples = []
        for _ in range(args.repeat):
            seconds, out = timed(noop, env, folder)
            samples.append(seconds)
        assert out.count("up to date") >= 5, out
        figure(f"no-op materialize, {args.documents} documents", samples)
        if args.profile:
            stats = folder / "noop.prof"
            timed([sys.executable, "-m", "cProfile", "-o", str(stats), "-m", "attribution_assets.cli",
                   *noop[3:]], env, folder)
            import pstats

            pstats.Stats(str(stats)).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
