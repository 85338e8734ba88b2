"""hbar.locking.run_lock: one writer per run directory; the holder is named; stale locks of killed
processes are recognised and taken over (docs/theory.md section 14.4)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from hbar.locking import LOCK_FILE, StaleLockWarning, lock_holder, run_lock
from hbar.validation import HbarInputError

_HOLDER = """
import sys, time
from hbar.locking import run_lock
with run_lock(sys.argv[1], "test holder"):
    print("locked", flush=True)
    sys.stdin.readline()  # hold until the parent closes stdin (or kills us)
print("released", flush=True)
"""


def _env():
    src = os.path.join(os.path.dirname(__file__), os.pardir, "src")
    return {**os.environ, "PYTHONPATH": os.path.abspath(src) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _start_holder(d):
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_process_is_refused_and_a_killed_holder_is_taken_over(tmp_path):
    d = tmp_path / "run"
    proc = _start_holder(d)
    try:
        rec = lock_holder(d)
        assert rec["pid"] == proc.pid and rec["host"] == socket.gethostname() and rec["what"] == "test holder"
        with pytest.raises(HbarInputError) as err:
            with run_lock(d, "second writer"):
                pass
        msg = str(err.value)
        assert f"pid {proc.pid}" in msg and socket.gethostname() in msg and rec["since"] in msg
        assert "test holder" in msg and "in use" in msg
    finally:
        proc.kill()  # kill -9: the holder cannot clean up
        proc.wait()
        proc.stdin.close()
        proc.stdout.close()
    assert (d / LOCK_FILE).exists()  # left behind by the killed process
    with pytest.warns(StaleLockWarning, match=f"pid {proc.pid}"):
        with run_lock(d, "after the kill") as mine:
            assert lock_holder(d)["token"] == mine["token"]
    assert not (d / LOCK_FILE).exists()


def test_normal_exit_of_the_holder_releases(tmp_path):
    d = tmp_path / "run"
    proc = _start_holder(d)
    proc.stdin.close()  # let it leave the block
    assert proc.stdout.readline().strip() == "released"
    proc.wait()
    proc.stdout.close()
    assert not (d / LOCK_FILE).exists()
    with run_lock(d, "next"):
        pass


def test_fake_stale_lock_from_a_dead_pid(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": socket.gethostname(), "since": "2026-01-01T00:00:00+00:00", "command": "hbar train",
         "what": "hbar train", "token": "x"}))
    with pytest.warns(StaleLockWarning, match="stale lock"):
        with run_lock(tmp_path, "me"):
            assert lock_holder(tmp_path)["pid"] == os.getpid()
    assert not (tmp_path / LOCK_FILE).exists()


def test_lock_of_another_host_or_in_writing_is_respected(tmp_path):
    lock = tmp_path / LOCK_FILE
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "since": "s", "command": "c", "what": "w"}))
    with pytest.raises(HbarInputError, match=f"elsewhere.example.*delete {lock}"):
        with run_lock(tmp_path, "me"):
            pass
    lock.write_text("")  # just created by another process, not yet written
    with pytest.raises(HbarInputError, match="unknown process"):
        with run_lock(tmp_path, "me"):
            pass
    old = time.time() - 60  # ... but an empty lock a minute old was left by a process killed while writing it
    os.utime(lock, (old, old))
    with pytest.warns(StaleLockWarning):
        with run_lock(tmp_path, "me"):
            pass


def test_released_on_exceptions_and_interrupts_and_not_reentrant(tmp_path):
    for exc in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(exc):
            with run_lock(tmp_path, "me"):
                assert (tmp_path / LOCK_FILE).exists()
                raise exc
        assert not (tmp_path / LOCK_FILE).exists()
    with run_lock(tmp_path, "outer"):
        with pytest.raises(HbarInputError, match=f"pid {os.getpid()}"):
            with run_lock(tmp_path, "inner"):
                pass
        assert lock_holder(tmp_path)["what"] == "outer"  # the refused inner call did not remove it


def test_a_file_is_not_a_directory_and_a_refused_new_directory_is_removed(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(HbarInputError, match="existing file"):
        with run_lock(f, "me"):
            pass
    new = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="boom"):
        with run_lock(new, "me"):
            raise ValueError("boom")
    assert not new.exists()  # created for the run and still empty: removed again
    with pytest.raises(HbarInputError, match="not found"):
        with run_lock(tmp_path / "missing", "me", create=False):
            pass


def test_pid_reuse_is_stale(tmp_path, monkeypatch):
    """A live pid whose process started after the lock was written (pid reuse) does not hold it."""
    import hbar.locking as locking

    tmp_path.joinpath(LOCK_FILE).write_text(json.dumps(
        {"pid": os.getppid(), "host": socket.gethostname(), "since": "s", "command": "c", "what": "w",
         "proc_start": -1}))  # the parent is alive, but its start time is not the recorded one
    if locking._proc_start_ticks(os.getppid()) is None:
        pytest.skip("no /proc start times on this platform")
    with pytest.warns(StaleLockWarning):
        with run_lock(tmp_path, "me"):
            pass
