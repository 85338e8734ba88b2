"""Small shared helpers of the paper2024 study: summaries of per-point values."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from hbar.stats import mean_se

__all__ = ["finite", "mse", "summary"]


def finite(a: Any) -> np.ndarray:
    """The finite entries of ``a`` as a flat float array (failed points are NaN)."""
    arr = np.asarray(a, float).ravel()
    return arr[np.isfinite(arr)]


def mse(a: Any) -> tuple[float, float]:
    """(mean, standard error) over the finite entries (:func:`hbar.stats.mean_se`)."""
    return mean_se(finite(a))


def summary(a: Any) -> dict[str, float]:
    """mean, se, per-point sd and count of the finite entries."""
    f = finite(a)
    m, se = mean_se(f)
    return {"mean": m, "se": se, "sd": float(f.std(ddof=1)) if f.size > 1 else math.nan, "n": int(f.size)}
