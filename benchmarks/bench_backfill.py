"""A UI backfill of 8 shards through Dagster's run queue: the UI's own GraphQL mutation
(``launchPartitionBackfill``) over ``train_gradients`` of 8 shards, the backfill daemon cutting it
by the profile's policy (``shards_per_run``), the queue running ``max_concurrent`` at once; prints
each run's timeline (queued, launched, started, ended) and how many ran at once.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_backfill.py [--shards-per-run 2] [--workers 2]

Inputs as ``bench_scale.py`` (a small random GPT-NeoX over generated documents).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import dagster as dg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_scale import build_inputs, profile  # noqa: E402

from attribution_assets.defs.factory import build_definitions  # noqa: E402
from attribution_assets.defs.instance import persistent_instance  # noqa: E402
from attribution_assets.defs.planning import STAGES  # noqa: E402
from attribution_assets.defs.queue import DAEMONS, QueueSession  # noqa: E402
from attribution_assets.defs.runner import materialize_pipeline  # noqa: E402
from attribution_assets.defs.runs import recipe_of  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--docs-per-shard", type=int, default=32)
    parser.add_argument("--shards-per-run", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-backfill-") as tmp:
        base = Path(tmp)
        spec = build_inputs(base, args.shards, args.docs_per_shard, 60, 128, 2)
        queued = profile(base / "storage", 1, "multiprocess", args.workers, args.shards_per_run)
        instance = persistent_instance(base / "home", queued)
        defs = build_definitions([spec], queued)
        materialize_pipeline(defs, spec, instance, stages=STAGES[:1], log=lambda _: None, log_level="CRITICAL")
        shards = instance.get_dynamic_partitions(f"{spec.name}_shards")
        from dagster._core.execution.backfill import BulkActionStatus
        from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION
        from dagster_graphql.test.utils import execute_dagster_graphql

        began = time.time()
        with QueueSession(instance, recipe_of(defs), log=lambda _: None, daemons=(*DAEMONS, "BACKFILL")) as queue:
            ready = time.time()
            with queue.context.create_request_context() as workspace:
                launched = execute_dagster_graphql(workspace, LAUNCH_PARTITION_BACKFILL_MUTATION, {"backfillParams": {
                    "partitionNames": shards,
                    "assetSelection": [{"path": [spec.name, "tokenized_shards"]},
                                       {"path": [spec.name, "train_gradients"]}]}})
            backfill_id = launched.data["launchPartitionBackfill"]["backfillId"]
            while instance.get_backfill(backfill_id).status == BulkActionStatus.REQUESTED:
                time.sleep(1)
        ended = time.time()
        status = instance.get_backfill(backfill_id).status
        records = sorted(instance.get_run_records(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id})),
                         key=lambda r: r.create_timestamp)
        rows, windows = [], []
        for record in records:
            run = record.dagster_run
            launch = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.RUN_STARTING).records
            launched_at = launch[0].event_log_entry.timestamp if launch else float("nan")
            windows.append((launched_at, record.end_time))
            rows.append((f"{run.tags['dagster/asset_partition_range_start']} .. "
                         f"{run.tags['dagster/asset_partition_range_end']}", run.run_id[:8], run.status.value,
                         record.create_timestamp.timestamp() - ready, launched_at - ready,
                         record.start_time - ready, record.end_time - ready))
    events = sorted([(a, 1) for a, _ in windows] + [(b, -1) for _, b in windows])
    at_once = peak = 0
    for _, step in events:
        at_once += step
        peak = max(peak, at_once)
    load_after = os.getloadavg()
    print(f"backfill {backfill_id} of {args.shards} shards (tokenized_shards + train_gradients): {status.value}; "
          f"{len(rows)} runs of {args.shards_per_run} shards, max_concurrent {args.workers}; "
          f"queue start {ready - began:.1f} s, backfill {ended - ready:.1f} s; most runs in flight at once: {peak}")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f}; cores {os.cpu_count()}\n")
    print("| shards | run | status | queued s | launched s | started s | ended s |")
    print("|---|---|---|---|---|---|---|")
    for shards, run_id, state, *times in rows:
        print(f"| {shards} | {run_id} | {state} | " + " | ".join(f"{t:.1f}" for t in times) + " |")


if __name__ == "__main__":
    main()
