"""Runs whose process died, and pool slots held by live runs: checked before each stage and
while queued runs are awaited, so a killed run never blocks later ones."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import dagster as dg

from attribution_assets.defs.runs import process_of
from attribution_assets.engine.runtime import process_alive

#: The pools a stage may need a slot of.
POOLS = ("gpu",)


def release_dead_runs(instance: dg.DagsterInstance, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the unfinished runs of this host whose process (``runs.process_of``) is gone,
    and free their concurrency slots; return their run ids. A run that failed so is retried by
    Dagster's run retries where the instance has them."""
    host, released = socket.gethostname(), []
    unfinished = instance.get_runs(filters=dg.RunsFilter(statuses=[
        dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING, dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.CANCELING]))
    for run in unfinished:
        process = process_of(run)
        if process is None or process[0] != host or process_alive(process[1]):
            continue
        instance.report_run_failed(run, f"the process that ran it (pid {process[1]}) is gone")
        instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        released.append(run.run_id)
        log(f"released run {run.run_id} of {run.job_name}: its process {process[1]} died")
    return released


def check_pools(instance: dg.DagsterInstance, timeout: float = 0.0, poll: float = 2.0) -> None:
    """Wait up to ``timeout`` seconds for a free slot in each pool a stage may use; then raise
    naming the runs that hold the slots and how to free them."""
    storage = instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        return
    deadline = time.monotonic() + timeout
    for pool in POOLS:
        while True:
            info = storage.get_concurrency_info(pool)
            if info.slot_count == 0 or len(info.claimed_slots) < info.slot_count:
                break
            if time.monotonic() >= deadline:
                holders = sorted({f"{s.run_id} ({s.step_key})" for s in info.claimed_slots})
                raise RuntimeError(
                    f"All {info.slot_count} slots of pool {pool!r} are held by running runs: "
                    f"{', '.join(holders)}. Wait for them, stop them (`dagster run delete <id>` or "
                    f"the UI), or free the slots with `dagster instance concurrency set {pool} "
                    f"{info.slot_count}` after marking dead runs failed.")
            time.sleep(poll)
