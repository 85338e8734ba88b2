"""Derived quantities of the paper2024 study (docs/theory.md section 10): which h minimises
NLL and W2 and what the WKB coefficients predicted, robust summaries of the per-point C1 / C2,
and the W2 trend in h. Pure functions of stage results; nothing here runs a solver."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["minimisers", "robust_summary", "w2_slope"]


def minimisers(nll_js, c2_js, fp_js, w2_js, w2w_js) -> dict[str, Any]:
    """Where the brute-force NLL and W2 are smallest, and what the WKB coefficients predicted."""
    out: dict[str, Any] = {}
    if nll_js is None:
        return out
    c1 = nll_js["c1"]["mean"]
    c2 = c2_js["c2"]["mean"] if c2_js else None
    out["c1"] = c1
    out["c2"] = c2
    out["wkb1_predicts"] = "NLL falls for small h" if c1 < 0 else "NLL rises for small h"
    if c2 is not None and c2 > 0 and c1 < 0:
        out["h_star_wkb2"] = -c1 / (2 * c2)
        out["nll_min_wkb2"] = nll_js["nll0"]["mean"] - c1 * c1 / (4 * c2)
    elif c2 is not None:
        out["h_star_wkb2"] = None if c1 < 0 else 0.0
    if fp_js is not None:
        hs = [0.0] + [float(h) for h in fp_js["h"]]
        vals = [fp_js["nll0_same_points"][0]] + [math.nan if v is None else float(v) for v in fp_js["nll"]]
        conv = [True] + [bool(c) for c in fp_js["converged"]]
        arr = np.array(vals, float)
        if np.isfinite(arr).any():
            i = int(np.nanargmin(arr))
            out["h_min_nll_fp"] = hs[i]
            out["nll_min_fp"] = vals[i]
            out["h_min_nll_fp_converged"] = conv[i]
            out["fp_grid"] = hs
            out["fp_n_unconverged"] = int(sum(not c for c in conv))
    for key, js in (("small", w2_js), ("wide", w2w_js)):
        if js is not None:
            out[f"h_min_w2_{key}"] = js["h_min_w2"]
            a0, amin = js["w2"][0][0], js["w2_at_min"][0]
            out[f"w2_drop_{key}"] = (a0 - amin) if js["h"][0] == 0 and a0 is not None and amin is not None else None
    if "h_min_nll_fp" in out:
        out["c1_sign_agrees_with_fp_minimiser"] = bool((c1 < 0) == (out["h_min_nll_fp"] > 0))
    if "h_min_w2_small" in out:
        out["c1_sign_agrees_with_w2_minimiser"] = bool((c1 < 0) == (out["h_min_w2_small"] > 0))
    return out


def _trimmed(sorted_vals: np.ndarray, frac: float = 0.05) -> float:
    k = int(frac * sorted_vals.size)
    inner = sorted_vals[k:sorted_vals.size - k]
    return float(inner.mean() if inner.size else sorted_vals.mean())


def robust_summary(nll_arr: dict[str, np.ndarray] | None, c2_arr: dict[str, np.ndarray] | None) -> dict[str, Any] | None:
    """Median, 5 %-trimmed mean, quantiles and extremes of the per-point C1 (and C2) of the
    valid points; None when fewer than 3 finite values."""
    if nll_arr is None:
        return None
    valid = np.asarray(nll_arr["valid"], bool)
    c = np.asarray(nll_arr["c1"], float)[valid]
    c = np.sort(c[np.isfinite(c)])
    if c.size < 3:
        return None
    out: dict[str, Any] = {"n": int(c.size), "median": float(np.median(c)), "trim5": _trimmed(c),
                           "q01": float(np.quantile(c, 0.01)), "q99": float(np.quantile(c, 0.99)),
                           "min": float(c[0]), "max": float(c[-1]),
                           "nll0_median": float(np.median(np.asarray(nll_arr["nll0"], float)[valid])),
                           "c2_median": None, "c2_trim5": None, "c2_maxabs": None, "c2_min": None, "c2_max": None}
    if c2_arr is not None:
        c2 = np.asarray(c2_arr["c2"], float)[np.asarray(c2_arr["valid"], bool)]
        c2 = np.sort(c2[np.isfinite(c2)])
        if c2.size >= 3:
            out.update(c2_median=float(np.median(c2)), c2_trim5=_trimmed(c2), c2_maxabs=float(np.max(np.abs(c2))),
                       c2_min=float(c2[0]), c2_max=float(c2[-1]))
    return out


def w2_slope(h: Any, trials: Any) -> tuple[float, float]:
    """Least-squares slope d(metric)/dh over all trials pooled, with its standard error
    (OLS, residual variance); ``trials`` is (nh, n_trials). NaN if fewer than 3 values."""
    x = np.repeat(np.asarray(h, float), [len(t) for t in trials])
    y = np.concatenate([np.asarray([math.nan if v is None else v for v in t], float) for t in trials])
    ok = np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0:
        return math.nan, math.nan
    X = np.stack([np.ones_like(x), x], axis=1)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    s2 = float(resid @ resid) / (x.size - 2)
    cov = s2 * np.linalg.inv(X.T @ X)
    return float(beta[1]), float(math.sqrt(cov[1, 1]))
