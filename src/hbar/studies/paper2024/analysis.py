"""Derived quantities of the paper2024 study (docs/theory.md section 10): which h minimises
NLL and W2 and what the WKB coefficients predicted, robust summaries of the per-point C1 / C2,
and the W2 trend in h. Pure functions of stage results; nothing here runs a solver."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["minimisers", "robust_summary", "w2_slope", "brute_force_nll", "path_series"]


def path_series(c2_arr: dict[str, np.ndarray], idx: Any, hs: Any, n_grid: int = 101) -> dict[str, Any] | None:
    """The order-2 WKB series on the points ``idx`` of the ``path`` stage, from the per-point NLL0,
    C1, C2 of the ``c2`` stage (None unless it covers every one of them validly): means of
    NLL0 / C1 / C2, the per-point radius |C1/C2| (median, 10 / 90 % quantiles), the WKB-1/2 mean
    and the [0/1] Pade resummation on a grid of [0, max hs] and at hs. The Pade mean is over the
    points below their pole (a point beyond it has no Pade value); ``pade_frac`` is that fraction."""
    from hbar.series import evaluate_series

    from ._util import mse

    pos = {int(i): k for k, i in enumerate(c2_arr["idx"])}
    if not all(int(i) in pos for i in idx):
        return None
    k = np.array([pos[int(i)] for i in idx])
    if not np.asarray(c2_arr["valid"], bool)[k].all():
        return None
    n0, a1, a2 = (np.asarray(c2_arr[c], float)[k] for c in ("nll0", "c1", "c2"))
    hs = np.asarray(hs, float)
    hg = np.linspace(0.0, float(hs.max()), n_grid)
    out: dict[str, Any] = {"nll0": mse(n0), "c1": mse(a1), "c2": mse(a2)}
    for tag, h in (("", hg), ("_at_h", hs)):
        e1, e2 = evaluate_series(n0, a1, a2, h, order=1), evaluate_series(n0, a1, a2, h, order=2)
        ok = np.isfinite(e2.pade_points)
        frac = ok.mean(axis=1)
        pade = np.where(frac > 0, np.nansum(np.where(ok, e2.pade_points, 0.0), axis=1) / np.maximum(ok.sum(axis=1), 1),
                        np.nan)
        out.update({f"wkb1{tag}": e1.wkb, f"wkb2{tag}": e2.wkb, f"pade{tag}": pade, f"pade_frac{tag}": frac,
                    f"trunc_err1{tag}": e1.truncation_error, f"trunc_err2{tag}": e2.truncation_error,
                    f"frac_inside{tag}": e2.frac_inside})
    rho = e2.radius
    out.update(h_grid=hg, radius_median=e2.radius_median, radius_q10=float(np.nanquantile(rho, 0.1)),
               radius_q90=float(np.nanquantile(rho, 0.9)))
    return out


def _f(v: Any) -> float:
    return math.nan if v is None else float(v)


def brute_force_nll(path_js: dict[str, Any] | None) -> list[dict[str, Any]]:
    """NLL(h) on the points of the ``path`` stage from converged brute force only: h = 0 (the exact
    probability-flow NLL0, error 0 on these points), then per h the converged path-integral value
    (error: its total MC + discretisation error) or else, where the path integral did not
    converge, the converged Fokker-Planck value on the same points (error: the FP stage's
    estimate). Unconverged values are left out. Rows sorted by h: {h, nll, error, source}."""
    if not path_js:
        return []
    rows = [{"h": 0.0, "nll": path_js["nll0_same_points"][0], "error": 0.0, "source": "NLL0 (PF ODE)"}]
    fp = path_js.get("fp") or {}
    fpv = {float(h): (_f(v), _f(e), bool(c)) for h, v, e, c in zip(fp.get("h", []), fp.get("nll", []),
                                                                      fp.get("error", []), fp.get("converged", []))}
    seen = set()
    for r in path_js["rows"]:
        h = float(r["h"])
        if r["converged"] and math.isfinite(_f(r["nll"])):
            rows.append({"h": h, "nll": r["nll"], "error": r["total_error"], "source": "path integral"})
            seen.add(h)
    for h, (v, e, c) in fpv.items():
        if h not in seen and c and math.isfinite(v):
            rows.append({"h": h, "nll": v, "error": e, "source": "Fokker-Planck"})
    return sorted(rows, key=lambda r: r["h"])


def minimisers(nll_js, c2_js, fp_js, w2_js, w2w_js, path_js=None) -> dict[str, Any]:
    """Where the brute-force NLL and W2 are smallest, and what the WKB coefficients predicted.

    Optimal-h statements for the NLL come from converged brute force only (:func:`brute_force_nll`
    on the points of the ``path`` stage; the FP argmin over converged FP values only). The
    WKB-2 parabola's minimiser h* = -C1/(2 C2) is reported as a prediction only when it lies
    inside the series' median per-point radius (``path`` stage); otherwise it is recorded under
    ``h_star_wkb2_outside_radius`` (or ``h_star_wkb2_unchecked`` without a radius) and not used."""
    out: dict[str, Any] = {}
    if nll_js is None:
        return out
    c1 = nll_js["c1"]["mean"]
    c2 = c2_js["c2"]["mean"] if c2_js else None
    out["c1"] = c1
    out["c2"] = c2
    out["wkb1_predicts"] = "NLL falls for small h" if c1 < 0 else "NLL rises for small h"
    ser = (path_js or {}).get("series")
    rho = ser["radius_median"] if ser else None
    out["radius_median"] = rho
    if c2 is not None and c2 > 0 and c1 < 0:
        hstar, nmin = -c1 / (2 * c2), nll_js["nll0"]["mean"] - c1 * c1 / (4 * c2)
        if rho is not None and hstar < rho:
            out["h_star_wkb2"], out["nll_min_wkb2"] = hstar, nmin
        else:
            out["h_star_wkb2"] = None
            out["h_star_wkb2_outside_radius" if rho is not None else "h_star_wkb2_unchecked"] = hstar
    elif c2 is not None:
        out["h_star_wkb2"] = None if c1 < 0 else 0.0
    bf = brute_force_nll(path_js)
    if len(bf) > 1:
        i = int(np.argmin([r["nll"] for r in bf]))
        best = bf[i]
        out["h_min_nll"] = best["h"]
        out["nll_min"] = best["nll"]
        out["h_min_nll_source"] = best["source"]
        out["brute_force_grid"] = [r["h"] for r in bf]
        # h whose value is within 2 combined errors of the minimum: not distinguishable from it
        out["h_min_nll_ties"] = [r["h"] for j, r in enumerate(bf) if j != i and abs(r["nll"] - best["nll"])
                                 <= 2 * math.hypot(r["error"], best["error"])]
        out["path_grid"] = [float(r["h"]) for r in path_js["rows"]]
        out["path_n_unconverged"] = int(sum(not r["converged"] for r in path_js["rows"]))
    if fp_js is not None:
        conv = [True] + [bool(c) for c in fp_js["converged"]]
        hs = [0.0] + [float(h) for h in fp_js["h"]]
        vals = [fp_js["nll0_same_points"][0]] + [_f(v) for v in fp_js["nll"]]
        arr = np.where(conv, np.array(vals, float), np.nan)
        out["fp_grid"] = hs
        out["fp_n_unconverged"] = int(sum(not c for c in conv))
        if np.isfinite(arr[1:]).any():  # a minimiser needs at least one converged FP value at h > 0
            i = int(np.nanargmin(arr))
            out["h_min_nll_fp"] = hs[i]
            out["nll_min_fp"] = vals[i]
    for key, js in (("small", w2_js), ("wide", w2w_js)):
        if js is not None:
            out[f"h_min_w2_{key}"] = js["h_min_w2"]
            a0, amin = js["w2"][0][0], js["w2_at_min"][0]
            out[f"w2_drop_{key}"] = (a0 - amin) if js["h"][0] == 0 and a0 is not None and amin is not None else None
    if "h_min_nll" in out:
        out["c1_sign_agrees_with_nll_minimiser"] = bool((c1 < 0) == (out["h_min_nll"] > 0))
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
