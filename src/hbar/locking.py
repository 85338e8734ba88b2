"""Run-directory locks: one writer per training run or study output folder (docs/theory.md section 14.4).

:func:`run_lock` is a context manager that creates ``<directory>/.hbar.lock`` atomically
(``os.open`` with ``O_CREAT | O_EXCL``, which also holds on NFS v3+) and writes into it, as one
JSON object, who holds the directory: pid, hostname, start time (UTC), the command line, what
the holder does and a random token. A second writer gets :class:`~hbar.validation.HbarInputError`
naming the holder. The lock is removed when the block ends, normally or by an exception
(including KeyboardInterrupt), and only if it is still this holder's (same token).

A process killed with SIGKILL cannot remove its lock. Such a lock is *stale* when it was taken
on this host and its pid is no longer alive (or the pid now belongs to a process started later
than the lock, i.e. it was reused); a stale lock is reported with a :class:`StaleLockWarning`
and taken over. Taking over is itself serialised by a short-lived ``.hbar.lock.takeover``
file (also O_EXCL), so two processes finding the same stale lock cannot both win. A lock from
another host cannot be checked; the error says so and names the file to delete if that process
is known to be gone.
"""

from __future__ import annotations

import datetime
import json
import os
import secrets
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from hbar.validation import HbarInputError

__all__ = ["LOCK_FILE", "StaleLockWarning", "lock_holder", "run_lock"]

LOCK_FILE = ".hbar.lock"
#: a lock file that is still empty or unreadable after this many seconds is treated as stale
#: (its writer died between creating and writing it); younger ones are being written
_UNREADABLE_GRACE_S = 5.0
#: a takeover marker older than this is left over from a killed takeover and removed
_TAKEOVER_GRACE_S = 30.0


class StaleLockWarning(UserWarning):
    """A lock left by a process that no longer runs was found and taken over."""


def _proc_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux /proc/<pid>/stat field 22), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read().decode(errors="replace")
        return int(stat[stat.rindex(")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _pid_alive(pid: int, start_ticks: int | None) -> bool:
    """Whether ``pid`` runs on this host and is the process that wrote the lock."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    except OSError:  # pragma: no cover - platform dependent
        return True
    if start_ticks is not None:
        now = _proc_start_ticks(pid)
        if now is not None and now != start_ticks:  # the pid was reused by a later process
            return False
    return True


def _read(path: str) -> dict[str, Any] | None:
    """The holder record in a lock file, or None when it is missing, empty or unreadable."""
    try:
        with open(path, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def lock_holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record of ``directory``'s lock (pid, host, since, command, what), or None."""
    return _read(os.path.join(os.fspath(directory), LOCK_FILE))


def _describe(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "an unknown process (the lock file is being written or unreadable)"
    return (f"pid {rec.get('pid')} on {rec.get('host')} since {rec.get('since')} "
            f"({rec.get('what')}: {rec.get('command')})")


def _is_stale(path: str) -> tuple[bool, dict[str, Any] | None]:
    """(stale?, record) of an existing lock file."""
    rec = _read(path)
    if rec is None:
        try:
            age = time.time() - os.stat(path).st_mtime
        except FileNotFoundError:
            return True, None
        return age > _UNREADABLE_GRACE_S, None
    if rec.get("host") != socket.gethostname():
        return False, rec
    try:
        pid = int(rec.get("pid", -1))
    except (TypeError, ValueError):
        return True, rec
    if pid == os.getpid():
        return False, rec  # this very process: a nested acquisition is refused, never taken over
    return not _pid_alive(pid, rec.get("proc_start")), rec


def _try_create(path: str, record: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(record, fh)
        fh.flush()
        os.fsync(fh.fileno())
    return True


def _take_over(path: str, stale: dict[str, Any] | None) -> bool:
    """Remove a stale lock under the takeover marker; True if removed (by us)."""
    marker = path + ".takeover"
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        try:
            if time.time() - os.stat(marker).st_mtime > _TAKEOVER_GRACE_S:
                os.unlink(marker)  # left over from a takeover that was killed
        except FileNotFoundError:
            pass
        return False
    os.close(fd)
    try:
        if _read(path) != stale:  # someone else replaced it meanwhile
            return False
        still_stale, _ = _is_stale(path)
        if not still_stale:
            return False
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return True
    finally:
        os.unlink(marker)


@contextmanager
def run_lock(directory: str | os.PathLike, what: str, *, create: bool = True) -> Iterator[dict[str, Any]]:
    """Hold ``<directory>/.hbar.lock`` for the duration of the block; yields the holder record.

    ``what`` says what the holder does (e.g. "hbar train"); it appears in the error a second
    writer gets. ``create``: make ``directory`` (and parents) if missing; a directory created
    here is removed again on exit if it is still empty (a refused run leaves nothing behind).
    Raises HbarInputError when ``directory`` is an existing file or is locked by a live process
    (also by this process: locks are not re-entrant)."""
    d = os.fspath(directory)
    if os.path.exists(d) and not os.path.isdir(d):
        raise HbarInputError(f"{d} is an existing file, not a directory; give a directory for the results")
    made = False
    if not os.path.isdir(d):
        if not create:
            raise HbarInputError(f"directory not found: {d}")
        try:
            os.makedirs(d)
            made = True
        except FileExistsError:
            pass
        except OSError as err:
            raise HbarInputError(f"cannot create directory {d} ({err.strerror})") from None
    path = os.path.join(d, LOCK_FILE)
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "since": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv) or sys.executable, "what": what,
              "proc_start": _proc_start_ticks(os.getpid()), "token": secrets.token_hex(8)}
    try:
        for _ in range(100):
            try:
                if _try_create(path, record):
                    break
            except PermissionError:
                raise HbarInputError(f"cannot write a lock file in {d}: not writable") from None
            stale, rec = _is_stale(path)
            if not stale:
                if rec is not None and rec.get("host") != socket.gethostname():
                    hint = f"; if that process is gone, delete {path}"
                else:
                    hint = ""
                raise HbarInputError(f"{d} is in use by {_describe(rec)}: wait for it to finish or use another "
                                     f"directory{hint}")
            if _take_over(path, rec):
                warnings.warn(f"{d}: taking over a stale lock left by {_describe(rec)}, which is no longer "
                              "running", StaleLockWarning, stacklevel=3)
            else:
                time.sleep(0.05)
        else:  # pragma: no cover - a pathological race
            raise HbarInputError(f"could not acquire the lock {path}")
    except BaseException:
        if made:
            _remove_if_empty(d)
        raise
    try:
        yield record
    finally:
        if (_read(path) or {}).get("token") == record["token"]:
            try:
                os.unlink(path)
            except FileNotFoundError:  # pragma: no cover
                pass
        if made:
            _remove_if_empty(d)


def _remove_if_empty(d: str) -> None:
    try:
        os.rmdir(d)
    except OSError:
        pass
