"""Input checks shared by the path modules (docs/theory.md section 3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.schedules import Schedule
from hbar.scores import declared_dim
from hbar.validation import HbarInputError, check_h

CONVENTIONS = ("ito", "midpoint")


def check_h_positive(h: Any, name: str = "h") -> np.ndarray:
    """``check_h`` plus h > 0: a path density or path KL needs noise. Returns a float array (m,)."""
    arr = check_h(h, name)
    if np.any(arr <= 0):
        raise HbarInputError(f"{name} must be > 0 here (a path density / path KL needs noise; "
                             f"h = 0 is the deterministic probability-flow limit), got {h}")
    return arr


def check_convention(convention: str) -> str:
    """``convention`` if it is one of :data:`CONVENTIONS` ("ito", "midpoint")."""
    if convention not in CONVENTIONS:
        raise HbarInputError(f"unknown convention {convention!r}; choose from {CONVENTIONS}")
    return convention


def check_score_dim(score: Callable, d: int) -> None:
    """Raise if the score declares a dimension (:func:`hbar.scores.declared_dim`) other than d."""
    dim = declared_dim(score)
    if dim is not None and dim != d:
        raise HbarInputError(f"points have dimension {d}, but the score has dimension {dim}")


def orient_path(schedule: Schedule, path: Any, times: Any, increasing: bool) -> tuple[Array, Array]:
    """Validate a (steps + 1, n, d) path and its (steps + 1,) grid; return both ordered along
    increasing (forward) or decreasing (backward) times."""
    try:
        ts = np.asarray(times, dtype=float)
    except Exception as err:  # traced or unreadable
        raise HbarInputError(f"times must be a concrete 1-D array: {err}") from err
    if ts.ndim != 1 or ts.size < 2:
        raise HbarInputError(f"times must have shape (steps + 1,) with steps >= 1, got {ts.shape}")
    schedule.check_time(ts, "path times")
    diffs = np.diff(ts)
    if not (np.all(diffs > 0) or np.all(diffs < 0)):
        raise HbarInputError("times must be strictly increasing or strictly decreasing")
    p = jnp.asarray(path, dtype=jnp.result_type(float))
    if p.ndim != 3 or p.shape[0] != ts.size:
        raise HbarInputError(f"path must have shape (steps + 1 = {ts.size}, n, d), got {p.shape}")
    if not bool(jnp.all(jnp.isfinite(p))):
        raise HbarInputError("path contains NaN or inf")
    if (diffs[0] > 0) != increasing:
        p, ts = p[::-1], ts[::-1]
    return p, jnp.asarray(ts.copy(), dtype=p.dtype)
