"""The process's share of the machine: CPU threads sized from what this process may use, and
the peak resident memory of a step.

Threads: :func:`available_cores` is the CPU affinity of the process (``os.sched_getaffinity``)
capped by its cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``,
rounded up). :func:`limit_threads` sizes torch's, FAISS's and every BLAS pool to it (or to a
given number). Pools that busy-wait for work oversubscribe a shared machine badly; importing
``attribution_assets`` sets ``OMP_WAIT_POLICY=PASSIVE`` and friends before any OpenMP runtime
loads (see ``attribution_assets/__init__.py``).

Memory: :func:`reset_peak_rss` starts a new peak window (Linux >= 4.0 resets the high-water
mark through ``/proc/self/clear_refs``); :func:`peak_rss_mb` is the peak resident set size
since then (since the process started where the reset is unsupported). RSS counts
memory-mapped file pages that were read, as ``ru_maxrss`` does.
"""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """CPUs allowed by the cgroup quota of this process and its ancestors (``None``: no quota).

    cgroup v2: ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) in the process's
    cgroup directory and each parent; v1: ``cpu.cfs_quota_us`` (-1 = none) and
    ``cpu.cfs_period_us`` in the ``cpu`` hierarchy. The smallest limit wins.
    """
    limits = []
    for line in (_read(proc_cgroup) or "").splitlines():
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # v2 unified hierarchy
            bases, parse = [root], _v2_limit
        elif "cpu" in controllers.split(","):
            bases, parse = [root / controllers, root / "cpu", root / "cpu,cpuacct"], _v1_limit
        else:
            continue
        for base in bases:
            directory = base / rel
            while True:
                limit = parse(directory)
                if limit is not None:
                    limits.append(limit)
                if directory == base or not directory.is_relative_to(base):
                    break
                directory = directory.parent
    return min(limits) if limits else None


def _v2_limit(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _v1_limit(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0 or int(period) <= 0:
        return None
    return int(quota) / int(period)


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by the cgroup quota (rounded up), >= 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def limit_threads(threads: int = 0) -> Callable[[], None]:
    """Size torch's intra-op pool, FAISS's OpenMP pool and every BLAS pool (``threadpoolctl``)
    to ``threads`` (0: :func:`available_cores`); returns a function that restores them."""
    import faiss
    import torch
    from threadpoolctl import threadpool_limits

    if threads < 0:
        raise ValueError(f"threads must be >= 0 (0 = the cores this process may use), got {threads}")
    threads = threads or available_cores()
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    blas = threadpool_limits(limits=threads, user_api="blas")
    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)

    def restore() -> None:
        torch.set_num_threads(torch_threads)
        faiss.omp_set_num_threads(faiss_threads)
        blas.restore_original_limits()

    return restore


def process_alive(pid: int) -> bool:
    """False only when process ``pid`` of this host is known to be gone: it does not exist, or it
    is a zombie (killed, not yet reaped by its parent)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence/permission check only, nothing is sent
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: it exists (another user's process)
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def claim_slot(directory: str | os.PathLike, slots: int, poll: float = 1.0,
               wait: bool = True) -> tuple[int, Callable[[], None]]:
    """The lowest of ``slots`` slots (e.g. the GPUs of this machine) that no other process holds:
    an exclusive ``flock`` on ``directory/slot-<N>.lock``, held until the returned release is
    called or the process ends (a killed process frees its slot). When all are held, wait
    (checking every ``poll`` seconds), or raise ``BlockingIOError`` with ``wait=False``."""
    import fcntl

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    while True:
        for slot in range(slots):
            handle = open(directory / f"slot-{slot}.lock", "a+")  # noqa: SIM115 (held until release)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            return slot, handle.close  # closing the file releases the lock
        if not wait:
            raise BlockingIOError(f"all {slots} slots under {directory} are held")
        time.sleep(poll)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window; ``False`` where the kernel does not support it
    (no ``/proc/self/clear_refs``, or one that accepts the write and keeps the old peak,
    as some sandboxed kernels do)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    peak, resident = _status_mib("VmHWM"), _status_mib("VmRSS")
    return peak is not None and resident is not None and peak <= resident + 8


def _status_mib(field: str) -> float | None:
    """``field`` of ``/proc/self/status`` in MiB, ``None`` where it is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set size of this process, MiB, since :func:`reset_peak_rss` (or start):
    ``VmHWM`` of ``/proc/self/status`` (which the reset clears), else ``ru_maxrss`` (never reset)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
