"""Richardson extrapolation over nested refinement levels (docs/theory.md section 8).

A discretised value with leading error of order p behaves as Q(hx) = Q* + b hx^p + ...; on two
levels whose mesh widths differ by the refinement ratio r (Q_c on hx, Q_f on hx / r)

    R = Q_f + (Q_f - Q_c) / (r^p - 1)                                    (extrapolation)

removes the b hx^p term exactly. Three consecutive levels Q_0, Q_1, Q_2 measure the order

    p_obs = log_r(|Q_1 - Q_0| / |Q_2 - Q_1|)                             (observed order)

and the error estimate of R is |R_k - R_{k-1}| once p_obs is close to p (asymptotic range),
else the more cautious max(|R_k - R_{k-1}|, |Q_k - Q_{k-1}|); with two levels only it is
|Q_k - Q_{k-1}|. With three levels the extrapolation itself uses the observed order when it is
not the nominal one but a plausible measured order, and is skipped when the observed order is
erratic (:func:`extrapolation_order`). All functions are pure, elementwise over NumPy arrays (any broadcastable shapes),
and used by :func:`hbar.references.fokker_planck_nll` for the mean NLL and for every point.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["richardson_extrapolate", "observed_order", "is_asymptotic", "error_estimate", "extrapolation_order"]


def richardson_extrapolate(coarse: Any, fine: Any, ratio: float, order: Any) -> np.ndarray:
    """R = fine + (fine - coarse) / (ratio^order - 1), elementwise.

    ``coarse`` and ``fine`` are the values on mesh widths hx and hx / ``ratio`` (ratio > 1);
    ``order`` (scalar or broadcastable array) is the assumed order p of the leading error term.
    Exact for Q(hx) = a + b hx^p."""
    fine = np.asarray(fine, dtype=float)
    fac = 1.0 / (float(ratio) ** np.asarray(order, dtype=float) - 1.0)
    return fine + (fine - np.asarray(coarse, dtype=float)) * fac


def observed_order(q0: Any, q1: Any, q2: Any, ratio: float) -> np.ndarray:
    """p_obs = log(|q1 - q0| / |q2 - q1|) / log(ratio) from three consecutive levels (q0 the
    coarsest), elementwise; NaN where either difference is zero or not finite."""
    d01 = np.abs(np.asarray(q1, dtype=float) - np.asarray(q0, dtype=float))
    d12 = np.abs(np.asarray(q2, dtype=float) - np.asarray(q1, dtype=float))
    ok = (d01 > 0) & (d12 > 0) & np.isfinite(d01) & np.isfinite(d12)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.log(np.where(ok, d01, 1.0) / np.where(ok, d12, 1.0)) / np.log(float(ratio))
    return np.where(ok, p, np.nan)


def is_asymptotic(p_obs: Any, order: Any) -> np.ndarray:
    """True where the observed order lies in [order - 0.5, order + 1] (NaN is not asymptotic)."""
    p_obs = np.asarray(p_obs, dtype=float)
    order = np.asarray(order, dtype=float)
    return np.isfinite(p_obs) & (order - 0.5 <= p_obs) & (p_obs <= order + 1.0)


def error_estimate(r_prev: Any, r_new: Any, dq: Any, asymptotic: Any) -> np.ndarray:
    """Error estimate of the newest extrapolation r_new: |r_new - r_prev| where ``asymptotic``,
    else max(|r_new - r_prev|, dq) with dq = |Q_k - Q_{k-1}| (the raw level difference)."""
    e_r = np.abs(np.asarray(r_new, dtype=float) - np.asarray(r_prev, dtype=float))
    return np.where(np.asarray(asymptotic, dtype=bool), e_r, np.maximum(e_r, np.asarray(dq, dtype=float)))


def extrapolation_order(p_obs: Any, order: Any, lo: float = 0.5) -> np.ndarray:
    """The order to extrapolate with, elementwise: the nominal ``order`` where the observed
    order is asymptotic (:func:`is_asymptotic`) or higher than nominal (the level differences
    shrink at least as fast as assumed); the observed order itself where it is a measured order
    in [lo, order) (e.g. p_obs ~ 1 from a nominally second-order scheme whose solution is not yet
    resolved, where extrapolating with the nominal order would under-correct); NaN (do not
    extrapolate) where it is erratic (NaN: non-monotone or unmeasurable, or below lo)."""
    p_obs = np.asarray(p_obs, dtype=float)
    order = np.broadcast_to(np.asarray(order, dtype=float), p_obs.shape)
    nominal = is_asymptotic(p_obs, order) | (np.isfinite(p_obs) & (p_obs >= order))
    measured = np.isfinite(p_obs) & (p_obs >= lo) & (p_obs < order)
    return np.where(nominal, order, np.where(measured, p_obs, np.nan))
