"""Entry point of each torchrun rank: ``torchrun --nproc-per-node N -m
attribution_assets.defs.torchrun_ranks [JOB.json]``.

Launched through Dagster Pipes (``defs.gradients.torchrun_collect_shards``), rank 0 reads the
job from the ``job`` extra and reports each shard's store through Pipes (a log line and a custom
message per shard, as soon as it is written); the Pipes context closes with the exception that
ended the rank, so the step's error shows it. Launched by hand, it reads ``JOB.json`` and prints
each shard's report as one JSON line. On the other nodes of a multi-node group it runs with no
job at all (rank 0 broadcasts it). Imports ``dagster-pipes`` only (no
Dagster), so every rank starts quickly. The work is ``engine.gradients.distributed.run``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import ExitStack
from pathlib import Path

from attribution_assets.engine.gradients import distributed


def main(job_file: str | None) -> None:
    with ExitStack() as stack:
        pipes = None
        if "DAGSTER_PIPES_CONTEXT" in os.environ and int(os.environ.get("RANK", "0")) == 0:
            from dagster_pipes import open_dagster_pipes

            pipes = stack.enter_context(open_dagster_pipes())
        if pipes is not None:
            def read_job() -> dict:
                return pipes.extras["job"]

            def report(message: dict) -> None:
                pipes.log.info(f"{message['shard']}: {message['ranks']} ranks ({message['backend']}"
                               f"{', fsdp' if message['fsdp'] else ''}) wrote {message['rows']} rows to "
                               f"{message['path']} in {message['seconds']} s")
                pipes.report_custom_message(message)
        else:
            def read_job() -> dict:
                if job_file is None:
                    raise SystemExit("usage: torchrun ... -m attribution_assets.defs.torchrun_ranks JOB.json "
                                     "(or launch it through Dagster Pipes)")
                return json.loads(Path(job_file).read_text())

            def report(message: dict) -> None:
                print(json.dumps(message), flush=True)
        distributed.run(read_job, report)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
