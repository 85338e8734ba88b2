"""The series in h: coefficients read off values of NLL(h) (docs/theory.md sections 5, 8).

A brute-force reference (Fokker–Planck, path integral) gives NLL(h) at a few h > 0 and the
exact NLL0 at h = 0. The WKB coefficients are then checked against the polynomial through
(0, NLL0) fitted by least squares to the values at h,

    NLL(h) - NLL0 ~ sum_{k=1}^{K} a_k h^k,     a_1 ~ C1, a_2 ~ C2,

which resolves h -> 0 without solving at tiny h, where a brute-force solver is least accurate.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hbar.validation import HbarInputError, check_h, check_positive_int

__all__ = ["polynomial_coefficients"]


def polynomial_coefficients(hs: Any, values: Any, value0: float, degree: int) -> np.ndarray:
    """Least-squares a_1..a_K (shape (K,)) of values(h) - value0 = sum_k a_k h^k.

    hs, values: (m,) with m >= degree distinct h > 0; value0: the exact value at h = 0."""
    H = check_h(hs, "hs")
    v = np.asarray(values, dtype=float).reshape(-1)
    degree = check_positive_int(degree, "degree")
    if v.shape != H.shape:
        raise HbarInputError(f"hs and values must have the same length, got {H.shape[0]} and {v.shape[0]}")
    if np.any(H <= 0) or len(np.unique(H)) < degree:
        raise HbarInputError(f"need at least degree={degree} distinct h > 0, got {H.tolist()}")
    if not (np.all(np.isfinite(v)) and np.isfinite(value0)):
        raise HbarInputError("values and value0 must be finite")
    A = np.stack([H**k for k in range(1, degree + 1)], axis=1)
    return np.linalg.lstsq(A, v - float(value0), rcond=None)[0]
