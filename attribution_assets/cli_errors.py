"""How the ``attribution`` command ends on an error or a signal: one line for the user, the
traceback in a log file (``$DAGSTER_HOME/logs`` or the temp directory), exit 2; exit 130 on
Ctrl-C or SIGTERM. Imports nothing heavy (``attribution --help`` stays fast)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class UserError(Exception):
    """An error whose message alone tells the user what to fix (no traceback needed)."""


def interrupted() -> int:
    print("Interrupted. Finished shards are kept; run the same command again to continue.", file=sys.stderr)
    return 130


def interrupt(signum, frame):  # SIGTERM behaves like Ctrl-C at every stage
    raise KeyboardInterrupt


def root_cause(exc: BaseException) -> tuple[BaseException, str | None]:
    """The user's own exception inside Dagster's wrappers, and where it failed
    (``pipeline/asset [shards]``)."""
    where = getattr(exc, "failed_in", None)  # set by the runner
    while True:
        inner = getattr(exc, "user_exception", None)
        if inner is None or inner is exc:
            return exc, where
        exc = inner


def report_error(exc: Exception, args: argparse.Namespace) -> int:
    """Print one message (asset, error, log path); the full traceback goes to a log file."""
    import tempfile
    import time
    import traceback

    from attribution_assets.defs.profiles import ProfileError
    from attribution_assets.spec import PipelineSpecError

    cause, step = root_cause(exc)
    text = "".join(traceback.format_exception(exc))
    home = os.environ.get("DAGSTER_HOME")
    directory = Path(home) / "logs" if home else Path(tempfile.gettempdir())
    directory.mkdir(parents=True, exist_ok=True)
    log = directory / f"attribution-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log.write_text(text)
    if getattr(args, "verbose", False):
        print(text, file=sys.stderr)
    print(f"error{f' in {step}' if step else ''}: {cause}", file=sys.stderr)
    if not isinstance(cause, UserError | PipelineSpecError | ProfileError):
        print(f"(full traceback: {log}; --verbose prints it)", file=sys.stderr)
    return 2
