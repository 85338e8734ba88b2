"""Durable, JSON-safe writing shared by checkpoints and result folders."""

from __future__ import annotations

import math
import os
import tempfile
from typing import Any

import numpy as np

__all__ = ["atomic_write", "to_jsonable"]


def _umask() -> int:
    """The process umask (read by setting and restoring it; os has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` via a temp file in the same directory, fsync and os.replace,
    so a reader never sees a partial file, even after an interrupt or a crash.

    The file gets the permissions of an ordinary ``open(path, "w")``: 0666 minus the user's
    umask (``tempfile.mkstemp`` alone would leave 0600, unreadable by colleagues)."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=d)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platform dependent
        pass


def to_jsonable(v: Any) -> Any:
    """Deep JSON-safe copy: NumPy arrays and scalars to lists / Python numbers, tuples to
    lists, dict keys to str, paths to str, NaN and inf to None (strict JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): to_jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [to_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return to_jsonable(v.tolist())
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    return v
