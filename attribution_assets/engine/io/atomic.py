"""Atomic writes: build output in a temporary sibling, rename into place when complete.

A crash (or a concurrent writer) never leaves a half-written file or directory
at the final path: readers see either the previous complete version or the new
complete version.

Temporary names identify their writer. While writing ``DIR/NAME``:

* the new version is built in ``DIR/.NAME.tmp-{host}-{pid}-{random}``
  (:func:`atomic_dir`, :func:`atomic_file`);
* a replaced directory is exchanged atomically with the new one on Linux, so it ends up
  at the temporary name and is deleted from there; elsewhere it is first moved aside to
  ``DIR/.NAME.old-{host}-{pid}-{random}`` and deleted after the new version is in place
  (:func:`replace_dir`).

``host`` is the host name reduced to ``[A-Za-z0-9_.-]`` and ``pid`` the writing
process. A writer that is killed (OOM killer, SIGKILL, ``os._exit``) leaves these
hidden siblings behind; ``NAME`` itself is untouched or complete. (Nothing is fsynced:
after a power loss the filesystem's own journaling decides what survives.)
They are removed by :func:`sweep_stale`, which every :func:`atomic_dir` and
:func:`atomic_file` call runs for its own ``NAME`` before writing: so the leftovers of
a crash disappear the next time the same path is written from the same host. A
leftover is removed only once its writer is known dead (same host name, pid gone);
see :func:`sweep_stale` for the exact rules, including names from before this scheme.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import re
import shutil
import socket
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from attribution_assets.engine.runtime import process_alive

log = logging.getLogger(__name__)

# Names that do not carry a writer (written before writers were named) are removed
# once neither they nor (for directories) their direct entries changed for this long.
LEGACY_MAX_AGE_S = 24 * 3600


def _host() -> str:
    """This machine's host name, reduced to characters that are safe in a file name."""
    host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]
    return host or "unknown-host"


def _writer_prefix(final: Path, kind: str) -> str:
    """``.NAME.tmp-HOST-PID-`` (or ``.old-``): the start of this process's temporary names."""
    return f".{final.name}.{kind}-{_host()}-{os.getpid()}-"


def _create_temp(final: Path, directory: bool) -> Path:
    """Create an empty ``.NAME.tmp-HOST-PID-RANDOM`` directory or file next to ``final``.

    Unlike ``tempfile.mkdtemp``/``mkstemp`` (modes 0700/0600), the mode follows the umask
    like a plain ``mkdir``/``open``, since the temporary becomes the published artifact.
    """
    prefix = _writer_prefix(final, "tmp")
    for _ in range(100):
        path = final.parent / f"{prefix}{uuid.uuid4().hex[:8]}"
        try:
            if directory:
                os.mkdir(path)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(final.parent / prefix))


def _parse(name: str, final_name: str) -> tuple[str, int] | None:
    """``(host, pid)`` of a temporary name of ``final_name``, or None if it carries no writer."""
    match = re.fullmatch(
        rf"\.{re.escape(final_name)}\.(?:tmp|old)-(?P<host>[A-Za-z0-9_.-]+)-(?P<pid>[0-9]+)-[A-Za-z0-9_]+",
        name,
    )
    if match is None:
        return None
    return match["host"], int(match["pid"])


def _newest_mtime(path: Path) -> float:
    """mtime of ``path`` (not followed), and of its direct entries if it is a real directory."""
    st = os.lstat(path)
    newest = st.st_mtime
    if stat.S_ISDIR(st.st_mode):
        with os.scandir(path) as entries:
            for entry in entries:
                with contextlib.suppress(FileNotFoundError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
    return newest


def _is_stale(path: Path, final_name: str, host: str, now: float) -> bool:
    writer = _parse(path.name, final_name)
    if writer is not None:
        writer_host, pid = writer
        return writer_host == host and not process_alive(pid)
    try:
        return now - _newest_mtime(path) > LEGACY_MAX_AGE_S
    except OSError:  # gone already, or unreadable: leave it
        return False


def _remove(path: Path, final: Path) -> bool:
    """Claim ``path`` by renaming it to a trash name of this process, then delete it.

    The rename makes concurrent sweepers safe (exactly one of them wins it) and a sweeper
    killed while deleting leaves a name that identifies it, so a later sweep finishes the job.
    Only the name in ``final.parent`` is renamed or unlinked: a symlink is never followed.
    """
    claim = final.parent / f"{_writer_prefix(final, 'old')}{uuid.uuid4().hex[:8]}"
    try:
        os.rename(path, claim)
    except FileNotFoundError:  # another sweeper (or the writer itself) got there first
        return False
    except OSError as exc:
        log.warning("could not remove stale temporary %s: %s", path, exc)
        return False
    try:
        if stat.S_ISDIR(os.lstat(claim).st_mode):
            shutil.rmtree(claim, ignore_errors=True)
        else:
            claim.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not remove stale temporary %s (now %s): %s", path, claim, exc)
    if os.path.lexists(claim):
        log.warning("could not fully remove stale temporary %s (now %s)", path, claim)
    return True


def sweep_stale(final: str | os.PathLike) -> list[Path]:
    """Remove the temporaries that dead writers of ``final`` left; return the removed paths.

    Candidates are the siblings of ``final`` named ``.NAME.tmp-*`` or ``.NAME.old-*``
    (``NAME = final.name``); one listing of ``final.parent``. A candidate is removed when:

    * its name carries a writer (``.NAME.tmp-HOST-PID-RANDOM``), ``HOST`` is this host's
      name and process ``PID`` no longer exists (``os.kill(pid, 0)`` raises
      ProcessLookupError). Entries of other hosts (a shared filesystem) are never
      removed, nor those of live processes, including this one and its other threads.
      A pid reused by an unrelated process keeps the entry until that process ends;
      host names must tell apart machines (and pid namespaces) that share a filesystem;
    * its name carries no writer (written before writers were named, e.g.
      ``.NAME.tmp-k2j4h1xq``, ``.NAME.old-1f3a9c0e`` or the old ``.NAME.tmp-PID``):
      nobody can tell whether its writer is alive, so it is removed only when neither it
      nor, for a directory, any of its direct entries was modified for
      :data:`LEGACY_MAX_AGE_S` (24 h). No writer of this project keeps a file open and
      unchanged that long.

    Removal renames the candidate to this process's own ``.NAME.old-`` name first, so
    concurrent sweeps never fail or remove an entry twice, then deletes it: real
    directories with ``shutil.rmtree`` (which does not follow symlinks inside), files and
    symlinks with unlink (the link, never its target). Errors are logged, never raised:
    a sweep never makes a write fail.
    """
    final = Path(final)
    prefixes = (f".{final.name}.tmp-", f".{final.name}.old-")
    try:
        with os.scandir(final.parent) as entries:
            names = [entry.name for entry in entries if entry.name.startswith(prefixes)]
    except OSError as exc:
        if not isinstance(exc, FileNotFoundError):
            log.warning("could not list %s for stale temporaries: %s", final.parent, exc)
        return []
    host, now = _host(), time.time()
    removed = []
    for name in sorted(names):
        path = final.parent / name
        if _is_stale(path, final.name, host, now) and _remove(path, final):
            removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory next to ``final``; on success it replaces ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = _create_temp(final, directory=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(src: Path, final: Path) -> bool:
    """Atomically swap two existing paths with Linux ``renameat2(RENAME_EXCHANGE)``.

    Returns False where that is unavailable (another OS, old libc or kernel, a filesystem
    without support) or ``final`` does not exist; the caller then falls back to renames.
    """
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(final), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOENT, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(code, os.strerror(code), str(final))


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def replace_dir(src: Path, final: Path) -> None:
    """Move directory ``src`` onto ``final``, replacing any existing directory there.

    On Linux the two are exchanged atomically (``renameat2(RENAME_EXCHANGE)``), so readers
    of ``final`` always find a complete directory, even during a concurrent rewrite; the
    old version, now at ``src``, is deleted afterwards. Elsewhere the old version is first
    moved aside to ``.NAME.old-HOST-PID-RANDOM``, leaving ``final`` briefly absent, and
    deleted once ``src`` is in place. Either way concurrent writers are safe (the last
    complete rename wins, readers see one writer's complete directory) and a crash leaves
    ``final`` complete plus a sweepable leftover.
    """
    final = Path(final)
    if final.is_dir() and not final.is_symlink() and _exchange(src, final):
        shutil.rmtree(src, ignore_errors=True)  # ``src`` now holds the old version
        return
    trash: list[Path] = []
    try:
        while True:
            try:
                os.replace(src, final)  # atomic; succeeds when ``final`` is absent or empty
                break
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
            old = final.parent / f"{_writer_prefix(final, 'old')}{uuid.uuid4().hex[:8]}"
            try:
                os.replace(final, old)
            except FileNotFoundError:  # another writer moved it first: try again
                continue
            trash.append(old)
    except BaseException:
        if trash and not final.exists():  # put the last complete version back
            with contextlib.suppress(OSError):
                os.replace(trash.pop(), final)
        raise
    finally:
        for old in trash:
            shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to ``final``; on success it is renamed onto ``final``."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(final)
    tmp = _create_temp(final, directory=False)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(final: str | os.PathLike, text: str) -> None:
    with atomic_file(final) as tmp:
        tmp.write_text(text)
