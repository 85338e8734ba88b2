"""Summary statistics reported with every Monte Carlo or per-point number."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["mean_se"]


def mean_se(a: Any) -> tuple[float, float]:
    """(mean, standard error of the mean) of the entries of ``a``: se = sd / sqrt(n) with the
    n - 1 (unbiased) variance; se is NaN for fewer than two entries, both are NaN for none.
    Callers drop failed entries first (and report how many they dropped)."""
    arr = np.asarray(a, dtype=float).ravel()
    if arr.size == 0:
        return math.nan, math.nan
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else math.nan
    return float(arr.mean()), se
