"""What the runner and the run queue share about runs: the recipe that rebuilds the definitions
in another process, run labels and partition tags, and which step of a run failed."""

from __future__ import annotations

import os
import socket

import dagster as dg
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
    PARTITION_NAME_TAG,
)

#: Definitions metadata key of the recipe (specs + profile, JSON) that rebuilds them elsewhere.
RECIPE_KEY = "attribution/recipe"
#: The environment variable naming a recipe file: the code location (``definitions.py``) then
#: serves exactly the definitions of the command that queued the runs.
RECIPE_ENV = "ATTRIBUTION_RECIPE"
#: Run tags: the host and process that execute a run (a run whose process is gone is released),
#: its pipeline and stage, and whether it recomputes what it could reuse.
HOST_TAG, PID_TAG = "attribution/host", "attribution/pid"
#: The run whose process set the host and pid tags: a retry inherits its parent's tags, and they
#: name its own process only once it set them itself (absent: set by the run's creator).
PID_OF_TAG = "attribution/pid_of"
PIPELINE_TAG, STAGE_TAG, FORCE_TAG = "attribution/pipeline", "attribution/stage", "attribution/force"


def process_tags(run_id: str | None = None) -> dict[str, str]:
    """The host and pid tags of this process (set by run ``run_id`` itself, when given)."""
    tags = {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid())}
    return {**tags, PID_OF_TAG: run_id} if run_id else tags


def process_of(run: dg.DagsterRun) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that executes ``run``, where its tags name it (not the
    inherited tags of a retry whose own process has not tagged it yet)."""
    host, pid, of = run.tags.get(HOST_TAG), run.tags.get(PID_TAG, ""), run.tags.get(PID_OF_TAG)
    if host is None or not pid.isdigit() or (of is not None and of != run.run_id):
        return None
    return host, int(pid)


def recipe_of(defs: dg.Definitions) -> str | None:
    """The recipe (JSON: specs + profile) ``build_definitions`` recorded in ``defs``, if any."""
    value = (defs.metadata or {}).get(RECIPE_KEY)
    return None if value is None else getattr(value, "value", value)


def failed_step(instance: dg.DagsterInstance, run_id: str) -> str | None:
    """``pipeline/asset`` of the step that failed in ``run_id`` (None if no step failed)."""
    records = instance.get_records_for_run(run_id, of_type=dg.DagsterEventType.STEP_FAILURE).records
    for record in records:
        step = record.event_log_entry.step_key
        if step:
            return step.replace("__", "/", 1)
    return None


def range_run(first: str | None, last: str | None) -> tuple[str, dict[str, str]]:
    """The label (`` [first .. last]``) and tags of a run over a contiguous shard range
    (``first is None``: an unpartitioned run)."""
    if first is None:
        return "", {}
    label = f" [{first}]" if first == last else f" [{first} .. {last}]"
    return label, {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def partition_run(partition: str) -> tuple[str, dict[str, str]]:
    """The label and tags of a run of one partition."""
    return f" [{partition}]", {PARTITION_NAME_TAG: partition}
