"""Scale-out on one machine: training-gradient throughput of N shards in one process vs queued
runs, 2 at once (the `multiprocess` profile: Dagster's run queue, each run a process of its own),
and of one shard in 1 vs 2 torchrun ranks (the `torchrun` profile's engine entry point); each
configuration's startup cost.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--docs-per-shard 48] [--hidden 256]

Queued: the command starts a code server and the queue's daemon once (``queue start``), then
each run pays a process start, the imports and a model load before its shards (``run start``:
the run's wall time less its shards' collect seconds).

A small random GPT-NeoX (no download) over generated documents. Baselines: one process with the
workers' thread count (``cores // workers``: what scale-out multiplies) and one process using
every core through intra-op threads (``threads = cores``). Prints a Markdown table (for
docs/scale-out.md) with the load average before and after: on a shared machine the figures
move with what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attribution_assets.defs.factory import build_definitions  # noqa: E402
from attribution_assets.defs.instance import persistent_instance  # noqa: E402
from attribution_assets.defs.planning import STAGES, Stage  # noqa: E402
from attribution_assets.defs.profiles import DeploymentProfile  # noqa: E402
from attribution_assets.defs.resources import ComputeResource, StorageResource  # noqa: E402
from attribution_assets.defs.runner import materialize_pipeline  # noqa: E402
from attribution_assets.engine.io.data import read_tokenized  # noqa: E402
from attribution_assets.engine.io.paths import PipelinePaths  # noqa: E402
from attribution_assets.spec import load_pipeline_file, spec_to_json  # noqa: E402

WORDS = ["river", "city", "port", "north", "old", "born", "works", "studied", "builds", "small",
         "satellites", "university", "lisbon", "mara", "quill", "tomas", "reyes", "orbitex",
         "norwood", "ada", "finch", "the", "a", "of", "in", "at", "for", "and", "is", "was"]


def build_inputs(base: Path, shards: int, docs_per_shard: int, words: int, hidden: int, layers: int):
    """A random tokenizer-compatible model and a corpus of ``shards x docs_per_shard`` documents."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from tests.helpers import train_tiny_tokenizer

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(shards * docs_per_shard)]
    tokenizer = train_tiny_tokenizer(texts[:200], vocab_size=300)
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=512,
                           eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    GPTNeoXForCausalLM(config).save_pretrained(base / "model")
    tokenizer.save_pretrained(base / "model")
    (base / "corpus").mkdir()
    (base / "corpus" / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (base / "queries.jsonl").write_text(json.dumps({"prompt": "mara quill was born in", "completion": " lisbon"}))
    body = {"pipelines": [{"name": "bench", "model": {"name_or_path": str(base / "model")},
                           "corpus": {"path": "corpus", "max_length": 256}, "shard_size": docs_per_shard,
                           "queries": {"path": "queries.jsonl", "max_length": 64, "prompt_column": "prompt",
                                       "completion_column": "completion"},
                           "gradients": {"projection_dim": 16}}]}
    (base / "pipelines.yaml").write_text(yaml.safe_dump(body))
    (spec,) = load_pipeline_file(base / "pipelines.yaml")
    return spec


def profile(root: Path, threads: int, executor: str = "in_process", workers: int | None = None,
            shards_per_run: int | None = None):
    return DeploymentProfile("bench", None, StorageResource(root=str(root)), ComputeResource(threads=threads),
                             executor=executor, max_concurrent=workers, shards_per_run=shards_per_run)


def shard_seconds(instance: dg.DagsterInstance) -> dict[str, float]:
    """Each shard's collect seconds (train_gradients metadata) of the latest materializations."""
    records = instance.fetch_materializations(dg.AssetKey(["bench", "train_gradients"]), limit=1000).records
    seconds = {}
    for record in records:  # newest first
        m = record.asset_materialization
        if m.partition not in seconds and "seconds" in m.metadata:
            seconds[m.partition] = m.metadata["seconds"].value
    return seconds


def time_stage(defs, spec, instance) -> tuple[float, dict[str, float], list[str]]:
    """Wall seconds of a forced train_gradients stage, each shard's collect seconds, the log
    lines with their seconds since the start."""
    began, lines = time.perf_counter(), []
    materialize_pipeline(defs, spec, instance, stages=[Stage("shards", ("train_gradients",), True)],
                         log=lambda m: lines.append(f"{time.perf_counter() - began:.1f} {m}"),
                         log_level="CRITICAL", force=True)
    wall = time.perf_counter() - began
    return wall, shard_seconds(instance), lines


def run_starts(instance: dg.DagsterInstance, shard_times: dict[str, float]) -> list[float]:
    """Each queued run of the last stage: seconds from its launch (the queue hands it to the
    launcher: its process starts) to its end, less its shards' collect seconds."""
    records = instance.get_run_records(filters=dg.RunsFilter(tags={"attribution/stage": "shards"}))
    newest = max(r.create_timestamp for r in records)
    starts = []
    for record in records:
        run = record.dagster_run
        if record.create_timestamp.timestamp() < newest.timestamp() - 60 or record.end_time is None:
            continue
        first, last = run.tags["dagster/asset_partition_range_start"], run.tags["dagster/asset_partition_range_end"]
        order = sorted(shard_times)
        shards = order[order.index(first):order.index(last) + 1]
        launched = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_STARTING).records
        began = launched[0].event_log_entry.timestamp if launched else record.start_time
        starts.append(record.end_time - began - sum(shard_times[s] for s in shards))
    return starts


def torchrun(spec, root: Path, shard: str, ranks: int, threads: int, out: Path, fingerprint: str) -> tuple[float, dict]:
    job = {"spec": spec_to_json(spec), "storage_root": str(root), "shards": [shard], "fingerprint": fingerprint,
           "producer": "bench", "device": "cpu", "threads": threads, "out": str(out)}
    path = out.parent / f"job-{ranks}.json"
    path.write_text(json.dumps(job))
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={ranks}", "-m", "attribution_assets.defs.torchrun_ranks",
                           str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def run_torchrun(spec, storage: Path, paths: PipelinePaths, base: Path, cores: int, workers: int) -> list:
    """One shard through the torchrun entry point: 1 rank (threads = cores / workers), 1 rank
    (threads = cores), ``workers`` ranks; ``(name, wall, report)`` each, then the shard's tokens."""
    per = max(1, cores // workers)
    shard = paths.tokenized_shards()[0]
    fingerprint = json.loads(paths.model_record.read_text())["fingerprint"]
    rows = [(f"1 rank, threads={per}", *torchrun(spec, storage, shard, 1, per, base / "t0", fingerprint)),
            (f"1 rank, threads={cores}", *torchrun(spec, storage, shard, 1, cores, base / "t1", fingerprint)),
            (f"{workers} ranks (gloo), threads={per} each",
             *torchrun(spec, storage, shard, workers, per, base / "t2", fingerprint))]
    return [rows, sum(len(d.input_ids) for d in read_tokenized(paths.tokens(shard)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--docs-per-shard", type=int, default=48)
    parser.add_argument("--words", type=int, default=120)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--shards-per-run", type=int, default=1)
    parser.add_argument("--no-torchrun", action="store_true", help="skip the torchrun part")
    parser.add_argument("--no-threads-baseline", action="store_true",
                        help="skip the one-process run with threads = cores (time the other baseline only)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        base = Path(tmp)
        spec = build_inputs(base, args.shards, args.docs_per_shard, args.words, args.hidden, args.layers)
        storage = base / "storage"
        per = max(1, cores // args.workers)
        queued = profile(storage, per, "multiprocess", args.workers, args.shards_per_run)
        instance = persistent_instance(base / "home", queued)  # in-process runs ignore its queue
        local = build_definitions([spec], profile(storage, cores))
        # inputs only: the model, query gradients and the tokenized shards (each timed stage collects)
        materialize_pipeline(local, spec, instance, stages=[STAGES[0], Stage("shards", ("tokenized_shards",), True)],
                             log=lambda _: None, log_level="CRITICAL")
        paths = PipelinePaths.under(storage, spec.name)
        tokens = sum(len(d.input_ids) for s in paths.tokenized_shards() for d in read_tokenized(paths.tokens(s)))
        rows = []
        single = build_definitions([spec], profile(storage, per))
        base_wall, base_shards, _ = time_stage(single, spec, instance)
        rows.append(("1 process", f"threads={per}", base_wall, sum(base_shards.values()), ""))
        one_wall = float("nan")
        if not args.no_threads_baseline:
            one_wall, one_shards, _ = time_stage(local, spec, instance)
            rows.append(("1 process", f"threads={cores}", one_wall, sum(one_shards.values()), ""))
        multi = build_definitions([spec], queued)
        multi_wall, multi_shards, lines = time_stage(multi, spec, instance)
        queue_start = float(next(line for line in lines if " runs queued" in line).split()[0])
        starts = run_starts(instance, multi_shards)
        runs = -(-args.shards // args.shards_per_run)
        rows.append((f"{runs} queued runs of {args.shards_per_run} shards, {args.workers} at once",
                     f"threads={per} each", multi_wall, sum(multi_shards.values()) / min(args.workers, runs),
                     f"queue start {queue_start:.1f} s; run start {min(starts):.1f}-{max(starts):.1f} s"))
        torchruns = [] if args.no_torchrun else run_torchrun(spec, storage, paths, base, cores, args.workers)
    load_after = os.getloadavg()

    print(f"model: GPT-NeoX hidden {args.hidden}, {args.layers} layers; {args.shards} shards x "
          f"{args.docs_per_shard} docs x ~{args.words} words ({tokens} tokens); projection 16; cores {cores}")
    print(f"load average (1/5/15 min) before: {load_before[0]:.1f}/{load_before[1]:.1f}/{load_before[2]:.1f}, "
          f"after: {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}\n")
    print(f"speedups: against one process with the workers' thread count (threads={per}), and "
          f"against one process using every core through threads (threads={cores})\n")
    print(f"| train gradients, {args.shards} shards | threads | wall s | tokens/s (wall) | compute s (per worker) | "
          f"startup s (share of wall) | where | speedup vs threads={per} | speedup vs threads={cores} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, threads, wall, compute, where in rows:
        print(f"| {name} | {threads} | {wall:.1f} | {tokens / wall:.0f} | {compute:.1f} | {wall - compute:.1f} "
              f"({(wall - compute) / wall:.0%}) | {where} | {base_wall / wall:.2f}x | {one_wall / wall:.2f}x |")
    if not torchruns:
        return
    (t0, t1, t2), shard_tokens = torchruns
    print("\n| one shard via torchrun | wall s | tokens/s (wall) | rank collect s | startup s | "
          f"speedup vs 1 rank threads={per} (collect) | speedup vs 1 rank threads={cores} (collect) |")
    print("|---|---|---|---|---|---|---|")
    for name, wall, report in (t0, t1, t2):
        compute = max(report["rank_seconds"])
        print(f"| {name} | {wall:.1f} | {shard_tokens / wall:.0f} | {compute:.1f} | {wall - compute:.1f} | "
              f"{t0[1] / wall:.2f}x ({max(t0[2]['rank_seconds']) / compute:.2f}x) | "
              f"{t1[1] / wall:.2f}x ({max(t1[2]['rank_seconds']) / compute:.2f}x) |")

if __name__ == "__main__":
    main()
