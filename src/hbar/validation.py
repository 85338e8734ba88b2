"""Input checks shared by the public API: clear errors instead of silently wrong numbers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["HbarInputError", "check_points", "check_h", "check_positive_int", "check_number", "check_seed"]


class HbarInputError(ValueError):
    """Raised for bad user input: the message names the problem."""


def check_points(x: Any, name: str = "x", d: int | None = None) -> np.ndarray:
    """Check that ``x`` is a finite (n, d) array (a 1-D array is read as (n, 1)).

    Returns it as a NumPy array. Raises :class:`HbarInputError` for NaN/inf, wrong rank,
    empty input or a dimension different from ``d``.
    """
    try:
        arr = np.asarray(x)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise HbarInputError(f"{name} could not be read as an array: {err}") from err
    if arr.dtype.kind not in "fiu":
        raise HbarInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise HbarInputError(f"{name} must have shape (n, d), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise HbarInputError(f"{name} is empty (shape {arr.shape})")
    if d is not None and arr.shape[1] != d:
        raise HbarInputError(f"{name} has dimension {arr.shape[1]}, expected {d}")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise HbarInputError(
            f"{name} contains NaN or inf in {len(rows)} row(s), first at row {int(rows[0])}"
        )
    return arr


def check_h(h: Any, name: str = "h") -> np.ndarray:
    """Check that the noise strength(s) h are finite and >= 0; returns a float array."""
    arr = np.atleast_1d(np.asarray(h, dtype=float))
    if not np.all(np.isfinite(arr)):
        raise HbarInputError(f"{name} must be finite, got {h}")
    if np.any(arr < 0):
        raise HbarInputError(f"{name} must be >= 0 (h = 0 is the probability-flow ODE), got {h}")
    return arr


def check_positive_int(value: Any, name: str) -> int:
    """An int >= 1 (an integral float such as 3.0 is accepted); bools, strings and other
    objects are refused with a message naming ``name``."""
    ok = isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating)) and math.isfinite(value)
                                                  and float(value).is_integer())
    if isinstance(value, (bool, np.bool_)) or not ok or int(value) <= 0:
        raise HbarInputError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_number(value: Any, name: str, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real number (optionally > 0 or >= 0), as float; a clear error otherwise."""
    if isinstance(value, (bool, np.bool_)):
        raise HbarInputError(f"{name} must be a number, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError) as err:
        raise HbarInputError(f"{name} must be a number, got {value!r}") from err
    if not math.isfinite(f):
        raise HbarInputError(f"{name} must be finite, got {value!r}")
    if positive and not f > 0:
        raise HbarInputError(f"{name} must be a finite positive number, got {value!r}")
    if nonnegative and not f >= 0:
        raise HbarInputError(f"{name} must be a finite number >= 0, got {value!r}")
    return f


def check_seed(value: Any, name: str = "seed") -> int:
    """A PRNG seed: an integer in [0, 2**32) (what jax.random.PRNGKey, NumPy and scikit-learn
    all accept); a clear error otherwise instead of a raw library exception or a silent wrap-around."""
    ok = isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if not ok or not 0 <= int(value) < 2**32:
        raise HbarInputError(f"{name} must be an integer in [0, 2**32 - 1], got {value!r}")
    return int(value)


def is_finite_number(v: float) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)
