"""The series in h: coefficients read off values of NLL(h) (docs/theory.md sections 5, 8).

A brute-force reference (Fokker–Planck, path integral) gives NLL(h) at a few h > 0 and the
exact NLL0 at h = 0. The WKB coefficients are then checked against the polynomial through
(0, NLL0) fitted by least squares to the values at h,

    NLL(h) - NLL0 ~ sum_{k=1}^{K} a_k h^k,     a_1 ~ C1, a_2 ~ C2,

which resolves h -> 0 without solving at tiny h, where a brute-force solver is least accurate.

Beyond the truncated series (section 6.3): the per-point radius estimate |C1/C2|
(:func:`series_radius`), the [0/1] Pade resummation NLL0 + h C1 / (1 - h C2/C1) (:func:`pade01`)
and a per-h trust flag from the estimated truncation error (:func:`evaluate_series`, used by
``LikelihoodResult.nll(h, validity=True)``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hbar.validation import HbarInputError, check_h, check_positive_int

__all__ = ["polynomial_coefficients", "series_radius", "pade01", "SeriesEvaluation", "evaluate_series"]


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


# ---------------------------------------------------------------------------------------------
# beyond the truncated series: radius, resummation, trust (docs/theory.md section 6.3)
# ---------------------------------------------------------------------------------------------

def series_radius(c1: Any, c2: Any, c3: Any = None) -> np.ndarray:
    """Per-point estimate of the radius of convergence in h of NLL(h) = NLL0 + h C1 + h^2 C2 + ...

    Ratio test: rho = |C1 / C2| (the distance of the pole of the [0/1] Pade approximant), and
    min(|C1/C2|, |C2/C3|) when C3 is given. inf where C2 = 0; 0 where C1 = 0 != C2 (no
    information: treat as untrusted). Elementwise, NumPy."""
    c1 = np.asarray(c1, dtype=float)
    c2 = np.asarray(c2, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        rho = np.where(c2 == 0, np.inf, np.abs(c1) / np.abs(c2))
        if c3 is not None:
            c3 = np.asarray(c3, dtype=float)
            rho = np.minimum(rho, np.where(c3 == 0, np.inf, np.abs(c2) / np.abs(c3)))
    return np.where(np.isfinite(c1) & np.isfinite(c2), rho, np.nan)


def pade01(nll0: Any, c1: Any, c2: Any, h: Any) -> np.ndarray:
    """The [0/1] Pade resummation of the WKB series per point,

        NLL(h) ~ NLL0 + h C1 / (1 - h C2 / C1),

    which reproduces NLL0 + h C1 + h^2 C2 + O(h^3) and sums the geometric tail
    C1 (h C2/C1)^k exactly. h: scalar or (m,); nll0, c1, c2: (n,). Returns (m, n) (or (n,)
    for scalar h). Where C1 = 0 the WKB-2 value is returned; beyond the pole (h C2/C1 >= 1)
    the approximant is meaningless and NaN is returned."""
    hh = np.atleast_1d(np.asarray(h, dtype=float))[:, None]
    nll0, c1, c2 = (np.asarray(a, dtype=float)[None, :] for a in (nll0, c1, c2))
    with np.errstate(divide="ignore", invalid="ignore"):
        den = 1.0 - hh * np.where(c1 != 0, c2 / c1, 0.0)
        out = np.where(c1 != 0, nll0 + hh * c1 / den, nll0 + hh**2 * c2)
        out = np.where((c1 != 0) & (den <= 0), np.nan, out)
    return out if np.ndim(h) else out[0]


@dataclasses.dataclass
class SeriesEvaluation:
    """NLL(h) from the WKB series with its validity, per h (docs/theory.md section 6.3).

    h (m,); ``wkb`` (m,): mean of NLL0 + h C1 (+ h^2 C2); ``pade`` (m,): mean of the per-point
    [0/1] resummation (NaN if any point is beyond its pole); ``truncation_error`` (m,): mean over
    points of the estimated first omitted term, |C_K| h^K (h / rho) / (1 - h / rho) (inf where
    h >= rho); ``trusted`` (m,): truncation_error <= tol; ``frac_inside`` (m,): fraction of points
    with h < rho_i / 2; ``radius`` (n,): per-point radius estimate; ``radius_median``; ``order``;
    ``tol``. Per-point arrays (m, n): ``wkb_points``, ``pade_points``.
    """

    h: np.ndarray
    wkb: np.ndarray
    pade: np.ndarray
    truncation_error: np.ndarray
    trusted: np.ndarray
    frac_inside: np.ndarray
    radius: np.ndarray
    radius_median: float
    order: int
    tol: float
    wkb_points: np.ndarray
    pade_points: np.ndarray

    def rows(self) -> list[dict[str, Any]]:
        return [dict(h=float(self.h[i]), wkb=float(self.wkb[i]), pade=float(self.pade[i]),
                     truncation_error=float(self.truncation_error[i]), trusted=bool(self.trusted[i]),
                     frac_inside=float(self.frac_inside[i])) for i in range(len(self.h))]


def evaluate_series(nll0: Any, c1: Any, c2: Any, h: Any, *, order: int = 2, c3: Any = None,
                    tol: float = 1e-2) -> SeriesEvaluation:
    """The truncated WKB series (``order`` 1 or 2), its [0/1] Pade resummation and per-h trust.

    Per point i with radius rho_i (:func:`series_radius`), the error of the order-K truncation is
    estimated by the geometric tail of its next term, |C_K| h^K (h/rho_i) / (1 - h/rho_i)
    (C_1 for K = 1, C_2 for K = 2; infinite for h >= rho_i); the mean over points of that
    estimate must be <= ``tol`` (nats) for the series to be ``trusted`` at h. nll0, c1, c2: (n,)
    finite per-point values (the caller drops invalid points)."""
    order = check_positive_int(order, "order")
    if order > 2:
        raise HbarInputError("order must be 1 or 2")
    hh = np.atleast_1d(np.asarray(h, dtype=float))
    nll0, c1, c2 = (np.asarray(a, dtype=float).reshape(-1) for a in (nll0, c1, c2))
    rho = series_radius(c1, c2, c3)
    per = nll0[None] + hh[:, None] * c1[None]
    if order == 2:
        per = per + hh[:, None] ** 2 * c2[None]
    ck = np.abs(c1 if order == 1 else c2)[None]
    x = hh[:, None] / rho[None]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        err = np.where(x < 1, ck * hh[:, None] ** order * x / (1 - x), np.inf)
    err = np.where(hh[:, None] == 0, 0.0, err)
    pp = pade01(nll0, c1, c2, hh)
    terr = err.mean(axis=1)
    return SeriesEvaluation(h=hh, wkb=per.mean(axis=1), pade=pp.mean(axis=1), truncation_error=terr,
                            trusted=terr <= tol, frac_inside=np.mean(x < 0.5, axis=1), radius=rho,
                            radius_median=float(np.nanmedian(rho)) if rho.size else float("nan"), order=order,
                            tol=float(tol), wkb_points=per, pade_points=pp)
