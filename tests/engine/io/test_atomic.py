"""Atomic writes: writer-named temporaries, and sweeping what killed writers leave behind."""

import errno
import os
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from attribution_assets.engine.io import atomic
from attribution_assets.engine.io.atomic import atomic_dir, atomic_file, replace_dir, sweep_stale
from attribution_assets.engine.runtime import process_alive

HOST = atomic._host()
DAY = 24 * 3600


def _run(script: str, check_rc: int = 1) -> list[str]:
    """Run ``script`` in a fresh interpreter; return its stdout lines."""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == check_rc, proc.stderr
    return proc.stdout.split()


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    (pid,) = _run("import os; print(os.getpid())", check_rc=0)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)
    return int(pid)


def _leftover(
    parent: Path,
    name: str,
    kind: str = "tmp",
    host: str = HOST,
    pid: int | None = None,
    directory: bool = True,
) -> Path:
    """A temporary like a writer ``host``/``pid`` leaves, holding a file."""
    path = (
        parent
        / f".{name}.{kind}-{host}-{_dead_pid() if pid is None else pid}-{uuid.uuid4().hex[:8]}"
    )
    if directory:
        path.mkdir(parents=True)
        (path / "part.bin").write_bytes(b"half a file")
    else:
        path.write_bytes(b"half a file")
    return path


def _age(path: Path, seconds: float) -> None:
    """Set the mtime of ``path`` and its direct entries ``seconds`` into the past."""
    old = time.time() - seconds
    for p in [*path.iterdir(), path] if path.is_dir() else [path]:
        os.utime(p, (old, old), follow_symlinks=False)


def _siblings(final: Path) -> list[str]:
    return sorted(p.name for p in final.parent.iterdir())


def _crash_inside(kind: str, final: Path) -> tuple[Path, int]:
    """A child process enters ``atomic_<kind>(final)``, writes, then is killed (``os._exit``)."""
    write = (
        "(tmp / 'part.bin').write_bytes(b'half')" if kind == "dir" else "tmp.write_bytes(b'half')"
    )
    script = f"""
import os
from attribution_assets.engine.io.atomic import atomic_{kind}
with atomic_{kind}({str(final)!r}) as tmp:
    {write}
    print(tmp, os.getpid(), flush=True)
    os._exit(1)  # a kill: no cleanup handler runs
"""
    tmp, pid = _run(script)
    return Path(tmp), int(pid)


def test_temporary_names_identify_host_and_pid(tmp_path):
    final = tmp_path / "out"
    prefix = f".out.tmp-{HOST}-{os.getpid()}-"
    with atomic_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(prefix) and tmp.is_dir()
        assert atomic._parse(tmp.name, "out") == (HOST, os.getpid())
    with atomic_file(tmp_path / "f.txt") as tmp:
        assert tmp.name.startswith(f".f.txt.tmp-{HOST}-{os.getpid()}-") and tmp.is_file()
    assert set(HOST) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")


def test_host_name_is_sanitized(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "my host/ü:1")
    assert atomic._host() == "my_host___1"
    monkeypatch.setattr("socket.gethostname", lambda: "")
    assert atomic._host() == "unknown-host"
    # a host name with dashes and digits still parses back (pid and suffix are the last fields)
    assert atomic._parse(".x.tmp-node-12-3-345-ab_c9", "x") == ("node-12-3", 345)
    assert atomic._parse(".x.tmp-k2j4h1xq", "x") is None  # before writers were named


def test_outputs_follow_the_umask_not_tempfile_private_modes(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "a").write_text("x")
        with atomic_file(tmp_path / "f") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644


def test_killed_atomic_dir_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    final = tmp_path / "store" / "shard-00000"
    tmp, pid = _crash_inside("dir", final)
    assert tmp.is_dir() and (tmp / "part.bin").exists(), "a kill leaves the temporary behind"
    assert tmp.name.startswith(f".shard-00000.tmp-{HOST}-{pid}-")
    assert not final.exists()
    with atomic_dir(final) as new:
        (new / "part.bin").write_bytes(b"complete")
    assert not tmp.exists()
    assert (final / "part.bin").read_bytes() == b"complete"
    assert _siblings(final) == ["shard-00000"]


def test_killed_atomic_file_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    final = tmp_path / "table.parquet"
    final.write_bytes(b"previous")
    tmp, pid = _crash_inside("file", final)
    assert tmp.is_file() and tmp.name.startswith(f".table.parquet.tmp-{HOST}-{pid}-")
    assert final.read_bytes() == b"previous"
    with atomic_file(final) as new:
        new.write_bytes(b"complete")
    assert not tmp.exists() and final.read_bytes() == b"complete"
    assert _siblings(final) == ["table.parquet"]


def test_killed_while_deleting_the_replaced_version_leaves_final_complete_and_old_sweepable(
    tmp_path,
):
    final = tmp_path / "index"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    script = f"""
import os
from attribution_assets.engine.io import atomic
atomic.shutil.rmtree = lambda *a, **k: os._exit(1)  # killed just before deleting the old version
print(os.getpid(), flush=True)
with atomic.atomic_dir({str(final)!r}) as tmp:
    (tmp / "v").write_text("2")
"""
    (pid,) = _run(script)
    # the old version sits at the writer's temporary (exchanged in place) or its .old- name
    (old,) = [p for p in tmp_path.iterdir() if p.name.startswith((".index.old-", ".index.tmp-"))]
    assert old.name.split("-", 1)[1].startswith(f"{HOST}-{pid}-") and (old / "v").read_text() == "1"
    assert (final / "v").read_text() == "2", "the new version is in place before the old is deleted"
    assert sweep_stale(final) == [old]
    assert _siblings(final) == ["index"]


def test_temporaries_of_live_processes_are_kept(tmp_path):
    final = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = _leftover(tmp_path, "out", pid=os.getpid())  # e.g. another thread of this process
        theirs = _leftover(tmp_path, "out", pid=sleeper.pid)
        trash = _leftover(tmp_path, "out", kind="old", pid=sleeper.pid)
        init = _leftover(tmp_path, "out", pid=1)
        as_file = _leftover(tmp_path, "out", pid=sleeper.pid, directory=False)
        for p in (ours, theirs, trash, init, as_file):
            _age(p, 10 * DAY)  # age does not matter when the writer is known
        with atomic_dir(final) as tmp:
            (tmp / "a").write_text("x")
        with atomic_file(final.with_name("f")) as tmp:
            tmp.write_text("x")
        assert all(p.exists() for p in (ours, theirs, trash, init, as_file))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(sweep_stale(final)) == sorted([theirs, trash, as_file]), (
        "swept once the writer is dead"
    )
    assert ours.exists() and init.exists()


def test_permission_error_means_the_process_exists(monkeypatch):
    def denied(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "kill", denied)
    assert process_alive(12345)


def test_a_zombie_is_not_alive():
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.time() + 30
    while process_alive(child.pid) and time.time() < deadline:  # exited, not reaped: a zombie
        time.sleep(0.05)
    assert not process_alive(child.pid)
    child.wait()


def test_temporaries_of_other_hosts_are_never_removed(tmp_path):
    final = tmp_path / "out"
    other = [
        _leftover(tmp_path, "out", host="other-node"),
        _leftover(tmp_path, "out", kind="old", host="other-node"),
        _leftover(tmp_path, "out", host=HOST + "x"),
        _leftover(tmp_path, "out", host="other-node", directory=False),
    ]
    for p in other:
        _age(p, 10 * DAY)
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("x")
    assert all(p.exists() for p in other)
    assert sweep_stale(final) == []


def test_only_the_siblings_of_this_final_are_swept(tmp_path):
    mine = _leftover(tmp_path, "out")
    not_mine = [
        _leftover(tmp_path, "out2"),
        _leftover(tmp_path, "ou"),
        _leftover(tmp_path / "sub", "out"),
    ]
    (tmp_path / ".out.bak").mkdir()
    assert sweep_stale(tmp_path / "out") == [mine]
    assert all(p.exists() for p in not_mine) and (tmp_path / ".out.bak").exists()
    assert sweep_stale(tmp_path / "missing-dir" / "out") == []


@pytest.mark.parametrize(
    "name", [".out.tmp-k2j4h1xq", ".out.old-1f3a9c0e", ".out.tmp-4242", ".out.tmp-x-y"]
)
def test_names_without_a_writer_are_removed_only_after_a_day_unchanged(tmp_path, name):
    final = tmp_path / "out"
    legacy = tmp_path / name
    legacy.mkdir()
    (legacy / "part.bin").write_bytes(b"half")
    legacy_file = tmp_path / (name + "f")
    legacy_file.write_bytes(b"half")
    assert sweep_stale(final) == [], "fresh: may belong to a running writer"
    _age(legacy, DAY - 600)
    _age(legacy_file, DAY - 600)
    assert sweep_stale(final) == []
    _age(legacy, DAY + 600)
    os.utime(legacy / "part.bin")  # still being written into: the directory's entries count
    _age(legacy_file, DAY + 600)
    assert sweep_stale(final) == [legacy_file]
    _age(legacy, DAY + 600)
    with atomic_dir(final) as tmp:
        (tmp / "a").write_text("x")
    assert _siblings(final) == ["out"]


def test_symlinks_are_unlinked_never_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.bin").write_bytes(b"precious")
    parent = tmp_path / "parent"
    parent.mkdir()
    pid = _dead_pid()
    link = parent / f".out.tmp-{HOST}-{pid}-linkdir1"
    link.symlink_to(outside, target_is_directory=True)
    file_link = parent / f".out.old-{HOST}-{pid}-linkfil1"
    file_link.symlink_to(outside / "keep.bin")
    inner = _leftover(parent, "out", pid=pid)
    (inner / "escape").symlink_to(outside, target_is_directory=True)
    legacy = parent / ".out.tmp-abcdefgh"
    legacy.symlink_to(outside, target_is_directory=True)
    _age(legacy, 10 * DAY)
    assert sorted(sweep_stale(parent / "out")) == sorted([link, file_link, inner, legacy])
    assert _siblings(parent / "out") == []
    assert (outside / "keep.bin").read_bytes() == b"precious"


def test_concurrent_sweeps_remove_each_leftover_exactly_once(tmp_path):
    final = tmp_path / "out"
    pid = _dead_pid()
    stale = []
    for i in range(60):
        path = tmp_path / f".out.{'tmp' if i % 2 else 'old'}-{HOST}-{pid}-s{i:07d}"
        path.mkdir()
        for j in range(5):
            (path / f"f{j}").write_bytes(b"x" * 100)
        stale.append(path)
    results: list[list[Path]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(6)

    def sweep():
        try:
            barrier.wait()
            results.append(sweep_stale(final))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sweep) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    removed = [p for r in results for p in r]
    assert sorted(removed) == sorted(stale), "each leftover reported by exactly one sweeper"
    assert _siblings(final) == []


def test_concurrent_writer_processes_never_remove_each_others_temporaries(tmp_path):
    final = tmp_path / "shard"
    crashed, _ = _crash_inside("dir", final)
    script = f"""
import os, sys
from attribution_assets.engine.io.atomic import atomic_dir, atomic_file
for i in range(25):
    with atomic_dir({str(final)!r}) as tmp:
        for j in range(4):
            (tmp / f"part{{j}}").write_text(sys.argv[1])
    with atomic_file({str(final) + ".json"!r}) as tmp:
        tmp.write_text(sys.argv[1])
"""
    writers = [
        subprocess.Popen([sys.executable, "-c", script, str(k)], stderr=subprocess.PIPE, text=True)
        for k in range(4)
    ]
    for w in writers:
        _, err = w.communicate(timeout=120)
        assert w.returncode == 0, err
    contents = {(final / f"part{j}").read_text() for j in range(4)}
    assert len(contents) == 1 and contents <= {"0", "1", "2", "3"}, (
        "one writer's complete directory"
    )
    assert (final.with_name("shard.json")).read_text() in {"0", "1", "2", "3"}
    assert not crashed.exists()
    assert _siblings(final) == ["shard", "shard.json"]


def test_replace_dir_replaces_a_non_empty_directory(tmp_path):
    final = tmp_path / "d"
    final.mkdir()
    (final / "old").write_text("1")
    src = tmp_path / "src"
    src.mkdir()
    (src / "new").write_text("2")
    replace_dir(src, final)
    assert sorted(p.name for p in final.iterdir()) == ["new"]
    assert _siblings(final) == ["d"]


def test_failed_write_removes_its_temporary_and_keeps_the_previous_version(tmp_path):
    final = tmp_path / "d"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("boom")
    with pytest.raises(RuntimeError), atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("x")
        raise RuntimeError("boom")
    assert (final / "v").read_text() == "1"
    assert _siblings(final) == ["d"]


def test_replace_dir_never_leaves_final_missing_for_readers(tmp_path):
    """Readers polling ``final`` while writers keep replacing it always find a complete copy
    (atomic exchange; on systems without it the fallback leaves a short gap)."""
    final = tmp_path / "store"
    with atomic_dir(final) as tmp:
        (tmp / "data").write_text("0" * 1000)
    if not atomic._exchange(final, final):  # renameat2 unsupported here: nothing to test
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available")
    stop, misses, errors = threading.Event(), [], []

    def read():
        while not stop.is_set():
            try:
                if len((final / "data").read_text()) != 1000:
                    errors.append("incomplete")
            except FileNotFoundError:
                misses.append(1)
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                errors.append(repr(exc))

    def write(n):
        for _ in range(n):
            with atomic_dir(final) as tmp:
                (tmp / "data").write_text("1" * 1000)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(100,)) for _ in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    reader.join()
    assert not misses and not errors and _siblings(final) == ["store"]


def test_fallback_without_exchange_replaces_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda src, final: False)
    final = tmp_path / "store"
    for version in ("1", "2"):
        with atomic_dir(final) as tmp:
            (tmp / "v").write_text(version)
    assert (final / "v").read_text() == "2" and _siblings(final) == ["store"]


def test_failed_fallback_replace_keeps_the_previous_version(tmp_path, monkeypatch):
    final = tmp_path / "store"
    with atomic_dir(final) as tmp:
        (tmp / "v").write_text("1")
    monkeypatch.setattr(atomic, "_exchange", lambda src, final: False)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(src).name.startswith(".store.tmp-") and Path(dst) == final:
            raise OSError(errno.EIO, "simulated I/O error")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"), atomic_dir(final) as tmp:
        (tmp / "v").write_text("2")
    assert (final / "v").read_text() == "1" and _siblings(final) == ["store"]
