"""The NLL(h) figure and optimal-h statements of the paper2024 study: pure functions of stage
results (no solver runs). Converged brute force only; the WKB lines and h* only inside the
series' radius; unconverged references drawn hollow and never used."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hbar.series import evaluate_series, series_radius
from hbar.studies.paper2024 import plots
from hbar.studies.paper2024.analysis import brute_force_nll, minimisers
from hbar.studies.paper2024.outputs import nll_h_figure_args
from hbar.studies.paper2024.report import nll_h_rows


def _path_js(conv=(True, True, False), nll=(1.50, 1.48, 1.20), fp_conv=(True, False, True)):
    """A path stage on three points: NLL0 1.52, C1 < 0, C2 > 0 (radius |C1/C2| per point)."""
    rng = np.random.default_rng(0)
    n0 = 1.52 + 0.1 * rng.normal(size=3)
    c1 = np.array([-0.3, -0.2, -0.4])
    c2 = np.array([1.0, 2.0, 0.5])
    hs = [0.1, 0.5, 1.0]
    hg = np.linspace(0, 1.0, 11)
    ev, at = evaluate_series(n0, c1, c2, hg), evaluate_series(n0, c1, c2, np.array(hs))
    at1 = evaluate_series(n0, c1, c2, np.array(hs), order=1)
    rows = [dict(h=h, nll=v, mc_se=0.004, disc_error=0.005, total_error=math.hypot(0.004, 0.005), converged=c,
                 extrapolated=False, steps=200, n_paths=512, observed_order=math.nan, seconds=1.0)
            for h, v, c in zip(hs, nll, conv)]
    return {"n": 3, "h": hs, "rows": rows, "ladder": [[] for _ in hs], "flags": [],
            "nll0_same_points": [float(n0.mean()), 0.05], "c1_same_points": [float(c1.mean()), 0.05],
            "series": {"nll0": [float(n0.mean()), 0.05], "c1": [float(c1.mean()), 0.05], "c2": [float(c2.mean()), 0.4],
                       "radius_median": ev.radius_median, "radius_q10": 0.2, "radius_q90": 0.8, "h_grid": hg,
                       "wkb1": evaluate_series(n0, c1, c2, hg, order=1).wkb, "wkb2": ev.wkb, "pade": ev.pade,
                       "pade_frac": np.ones_like(hg), "pade_frac_at_h": np.ones(3),
                       "pade_at_h": at.pade, "wkb1_at_h": at1.wkb, "wkb2_at_h": at.wkb,
                       "trunc_err1_at_h": at1.truncation_error, "trunc_err2_at_h": at.truncation_error,
                       "frac_inside_at_h": at.frac_inside},
            "fp": {"h": hs, "nll": [1.49, 1.10, 1.47], "error": [0.003, 0.2, 0.004], "converged": list(fp_conv), "n_fp": 3}}


def _nll_js(c1, c2=None):
    return {"c1": {"mean": c1}, "nll0": {"mean": 1.52}}, ({"c2": {"mean": c2}} if c2 is not None else None)


def test_brute_force_uses_converged_values_only():
    pth = _path_js()
    bf = brute_force_nll(pth)
    by_h = {r["h"]: r for r in bf}
    assert by_h[0.0]["source"].startswith("NLL0")
    assert by_h[0.1]["source"] == "path integral" and by_h[0.1]["nll"] == pth["rows"][0]["nll"]
    # h = 1: the path integral did not converge (its 1.20 would be the minimum); FP did and replaces it
    assert by_h[1.0]["source"] == "Fokker-Planck" and by_h[1.0]["nll"] == pth["fp"]["nll"][2]
    # nothing unconverged: the unconverged FP 1.10 at h = 0.5 is not used either (path converged there)
    assert all(r["nll"] not in (1.20, 1.10) for r in bf)
    mm = minimisers(*_nll_js(-0.3, 1.17), None, None, None, path_js=pth)
    assert mm["h_min_nll"] == min(bf, key=lambda r: r["nll"])["h"] == 1.0
    # with neither converged at h = 1, the minimiser comes from the remaining converged values
    pth2 = _path_js(fp_conv=(True, False, False))
    assert 1.0 not in [r["h"] for r in brute_force_nll(pth2)]
    assert minimisers(*_nll_js(-0.3, 1.17), None, None, None, path_js=pth2)["h_min_nll"] == 0.5


def test_ties_within_errors():
    pth = _path_js(nll=(1.50, 1.4805, 1.20))
    pth["fp"]["nll"][2] = 1.481
    mm = minimisers(*_nll_js(-0.3, 1.17), None, None, None, path_js=pth)
    assert mm["h_min_nll"] == 0.5 and mm["h_min_nll_ties"] == [1.0]


def test_wkb2_minimiser_only_inside_radius():
    pth = _path_js()
    rho = pth["series"]["radius_median"]
    c1 = -0.3
    inside = minimisers(*_nll_js(c1, -c1 / (2 * 0.5 * rho)), None, None, None, path_js=pth)  # h* = rho / 2
    assert inside["h_star_wkb2"] == pytest.approx(0.5 * rho)
    outside = minimisers(*_nll_js(c1, -c1 / (2 * 2.0 * rho)), None, None, None, path_js=pth)  # h* = 2 rho
    assert outside["h_star_wkb2"] is None and outside["h_star_wkb2_outside_radius"] == pytest.approx(2 * rho)
    unknown = minimisers(*_nll_js(c1, 1.0), None, None, None, path_js=None)
    assert unknown["h_star_wkb2"] is None and unknown["h_star_wkb2_unchecked"] == pytest.approx(0.15)


def test_fp_minimiser_ignores_unconverged():
    fp = {"h": [0.1, 0.5], "nll": [1.51, 1.0], "converged": [True, False], "nll0_same_points": [1.52, 0.05]}
    mm = minimisers(*_nll_js(-0.3), fp, None, None)
    assert mm["h_min_nll_fp"] == 0.1 and mm["fp_n_unconverged"] == 1
    fp["converged"] = [False, False]
    assert "h_min_nll_fp" not in minimisers(*_nll_js(-0.3), fp, None, None)


def test_figure_draws_series_inside_radius_and_marks_unconverged(monkeypatch, tmp_path):
    pth = _path_js()
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figs.append(fig) or str(path))
    plots.plot_nll_h_converged(tmp_path / "f.png", **nll_h_figure_args(pth))
    ax = figs[0].axes[0]
    rho = pth["series"]["radius_median"]
    assert rho < 1.0
    labels = {ln.get_label(): ln for ln in ax.get_lines()}
    for name in ("WKB 1", "WKB 2"):
        ln = next(v for k, v in labels.items() if k.startswith(name))
        assert np.max(ln.get_xdata()) == pytest.approx(rho)
    pade = labels["[0/1] Pade, per point, mean"]
    np.testing.assert_allclose(pade.get_ydata(), pth["series"]["pade"])
    leg = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "path integral (NOT converged, not a reference)" in leg
    assert "Fokker-Planck (NOT converged, not a reference)" in leg
    # the converged path-integral markers are exactly the converged rows, with their total errors
    conv = [c for c in ax.containers if c.get_label() == "path integral (converged)"][0]
    np.testing.assert_allclose(conv.lines[0].get_xdata(), [r["h"] for r in pth["rows"] if r["converged"]])


def test_nll_h_rows_series_values():
    pth = _path_js()
    rows = nll_h_rows(pth)
    assert [r[0] for r in rows] == pth["h"]
    c1, c2 = np.array([-0.3, -0.2, -0.4]), np.array([1.0, 2.0, 0.5])
    assert pth["series"]["radius_median"] == pytest.approx(np.median(series_radius(c1, c2)))
    for i, r in enumerate(rows):
        assert r[5] == pth["series"]["pade_at_h"][i]  # the Pade column
        assert r[8] == pth["rows"][i]["nll"] and r[12] == pth["rows"][i]["converged"]
        assert r[16] == pth["fp"]["nll"][i] and r[18] == pth["fp"]["converged"][i] and r[19] == 1.0


def test_path_series_pade_over_points_below_pole():
    """path_series: the Pade mean is over the points below their pole, with that share; radius
    median and WKB means are those of evaluate_series on the same points."""
    from hbar.studies.paper2024.analysis import path_series

    c1 = np.array([-0.3, 0.2, -0.4, -1.0])
    c2 = np.array([1.0, 2.0, 0.5, 3.0])  # point 1: C1, C2 > 0, pole at h = 0.1
    n0 = np.array([1.0, 1.1, 1.2, 1.3])
    c2_arr = {"idx": np.array([5, 7, 9, 11, 13]), "valid": np.array([True] * 5),
              "nll0": np.r_[n0, 0.0], "c1": np.r_[c1, 0.0], "c2": np.r_[c2, 0.0]}
    ser = path_series(c2_arr, [5, 7, 9, 11], [0.05, 0.5])
    from hbar.series import pade01
    want = pade01(n0, c1, c2, np.array([0.05, 0.5]))
    np.testing.assert_allclose(ser["pade_at_h"], [want[0].mean(), np.delete(want[1], 1).mean()])
    np.testing.assert_allclose(ser["pade_frac_at_h"], [1.0, 0.75])
    assert ser["radius_median"] == pytest.approx(np.median(np.abs(c1 / c2)))
    np.testing.assert_allclose(ser["wkb2_at_h"], [np.mean(n0 + h * c1 + h * h * c2) for h in (0.05, 0.5)])
    assert path_series(c2_arr, [5, 8], [0.5]) is None  # a point the C2 stage does not cover
