"""Everything derived from the results of the paper2024 study (docs/theory.md section 10):
``figures/*.png`` (from the results and the stored stage arrays), ``*.csv`` tables and
``report.md`` (:func:`report.render_markdown`, a function of the results only)."""

from __future__ import annotations

import csv
import io
import os
from typing import Any

import numpy as np

from hbar.serialization import atomic_write

from . import plots
from .report import NLL_H_COLUMNS, nice_name, nll_h_rows, render_markdown, table1_rows
from .stages import load_stage

__all__ = ["write_outputs", "write_figures", "write_csvs", "nll_h_figure_args", "nll_h_rows"]


def _csv(path: str, header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r in rows:
        w.writerow(["" if v is None else v for v in r])
    atomic_write(path, buf.getvalue().encode())
    return path


def write_csvs(out_dir: str, results: dict[str, Any]) -> list[str]:
    files = []
    rows = table1_rows(results)
    if rows:
        keys: list[str] = []
        for r in rows:
            keys += [k for k in r if k not in keys]
        files.append(_csv(os.path.join(out_dir, "table1.csv"), keys, [[r.get(k) for k in keys] for r in rows]))
    w2rows = []
    for m, r in results["models"].items():
        for key in ("w2", "w2wide"):
            js = r.get(key)
            for h, a, b in zip(js["h"], js["w2"], js["w2_sq"]) if js else ():
                w2rows.append([m, key, h, a[0], a[1], b[0], b[1], js["trials"], js["n"], js["steps"]])
    if w2rows:
        files.append(_csv(os.path.join(out_dir, "w2.csv"), ["model", "range", "h", "w2", "w2_se", "w2_squared",
                                                             "w2_squared_se", "trials", "n", "steps"], w2rows))
    fdrows = []
    for m, r in results["models"].items():
        fd = r.get("fd")
        for v in fd["variants"] if fd else ():
            fdrows.append([m, fd["n"], v["outer_tol"], v["inner_tol"], fd["c1_exact"]["mean"], fd["c1_exact"]["se"],
                           v["c1_fd"]["mean"], v["c1_fd"]["se"], v["rms_diff"], v["max_abs_diff"], v["corr"],
                           v["n_failed"], v["seconds"]])
    if fdrows:
        files.append(_csv(os.path.join(out_dir, "finite_difference.csv"),
                          ["model", "n", "outer_tol", "inner_tol", "c1_exact", "c1_exact_se", "c1_fd", "c1_fd_se",
                           "rms_diff", "max_abs_diff", "corr", "n_failed", "seconds"], fdrows))
    g = results.get("gauss1d")
    if g:
        grows = []
        for c in g["cases"]:
            n0, c1, c2 = c["wkb"]["nll0"][0], c["wkb"]["c1"][0], c["wkb"]["c2"][0]
            for i, h in enumerate(c["h_grid"]):
                grows.append([c["eps"], h, c["nll_oracle_expect"][i], c["nll_oracle"][i], c["w2_oracle"][i],
                              n0 + h * c1, n0 + h * c1 + h * h * c2])
        files.append(_csv(os.path.join(out_dir, "gauss1d.csv"), ["eps", "h", "nll_closed_form_expectation",
                                                                  "nll_closed_form_points", "w2_closed_form",
                                                                  "nll_wkb1", "nll_wkb2"], grows))
    hrows = [[m] + row for m, r in results["models"].items() if r.get("path") for row in nll_h_rows(r["path"])]
    if hrows:
        files.append(_csv(os.path.join(out_dir, "nll_h.csv"), ["model"] + NLL_H_COLUMNS, hrows))
    mrows = []
    for m, r in results["models"].items():
        mm = r.get("minimisers") or {}
        if mm:
            mrows.append([m, mm.get("c1"), mm.get("c2"), mm.get("radius_median"), mm.get("h_star_wkb2"),
                          mm.get("h_star_wkb2_outside_radius"), mm.get("h_min_nll"), mm.get("h_min_nll_source"),
                          mm.get("h_min_nll_fp"), mm.get("h_min_w2_small"), mm.get("h_min_w2_wide")])
    if mrows:
        files.append(_csv(os.path.join(out_dir, "minimisers.csv"),
                          ["model", "c1", "c2", "radius_median", "h_star_wkb2_inside_radius", "h_star_wkb2_outside_radius",
                           "h_min_nll_converged_brute_force", "h_min_nll_source", "h_min_nll_fp_converged_only",
                           "h_min_w2_small", "h_min_w2_wide"], mrows))
    return files


def _gauss1d_cases(g: dict[str, Any]) -> list[dict[str, Any]]:
    cases = []
    for c in g["cases"]:
        s, pth, fp = c["samples"], c["path"], c["fp"]
        cases.append(dict(
            eps=c["eps"], h_grid=c["h_grid"], nll_oracle=c["nll_oracle"], w2_oracle=c["w2_oracle"],
            nll0=c["wkb"]["nll0"][0], c1=c["wkb"]["c1"][0], c2=c["wkb"]["c2"][0],
            h_fp=fp["h"], nll_fp=fp["nll"], nll_fp_err=[0.0 if e is None else e for e in fp["error"]],
            h_path=pth["h"], nll_path=pth["nll"], nll_path_se=pth["mc_se"],
            h_samples=s["h"], nll_fit=[v[0] for v in s["nll_gauss_fit"]], nll_fit_se=[v[1] for v in s["nll_gauss_fit"]],
            w2_samples=[v[0] for v in s["w2"]], w2_samples_se=[v[1] for v in s["w2"]], w2_floor=s["w2_floor"][0]))
    return cases


def nll_h_figure_args(pth: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of :func:`plots.plot_nll_h_converged` from a ``path`` stage (all on its points)."""
    ser, fp, rows = pth.get("series"), pth.get("fp"), pth["rows"]
    kw: dict[str, Any] = dict(nll0=pth["nll0_same_points"][0], c1=pth["c1_same_points"][0], h_max=max(pth["h"]),
                              h_path=[r["h"] for r in rows], nll_path=[r["nll"] for r in rows],
                              err_path=[r["total_error"] for r in rows], conv_path=[r["converged"] for r in rows])
    if ser:
        kw.update(c2=ser["c2"][0], radius=ser["radius_median"], h_grid=ser["h_grid"], pade=ser["pade"],
                  pade_frac=ser["pade_frac"])
    if fp:
        kw.update(h_fp=fp["h"], nll_fp=fp["nll"], err_fp=fp["error"], conv_fp=fp["converged"])
    return kw


def write_figures(out_dir: str, results: dict[str, Any]) -> dict[str, str]:
    """All figures; returns {key: absolute path}."""
    fig_dir = os.path.join(out_dir, "figures")
    figs: dict[str, str] = {}
    if results.get("gauss1d"):
        figs["gauss1d"] = plots.plot_gauss1d(_gauss1d_cases(results["gauss1d"]), os.path.join(fig_dir, "gauss1d.png"))
    curves: dict[str, dict[str, dict]] = {"w2": {}, "w2wide": {}}
    curves_sq: dict[str, dict[str, dict]] = {"w2": {}, "w2wide": {}}
    floors: dict[str, float] = {}
    floors_sq: dict[str, float] = {}
    for m, r in results["models"].items():
        nl, c2, fp = r.get("nll"), r.get("c2"), r.get("fpfine") or r.get("fp")
        pth = r.get("path")
        if nl and pth:
            figs[f"nll_h/{m}"] = plots.plot_nll_h_converged(os.path.join(fig_dir, f"nll_h_{m}.png"),
                                                            title=f"{nice_name(m)}: NLL(h) on {pth['n']} test points",
                                                            **nll_h_figure_args(pth))
        elif nl:
            figs[f"nll_h/{m}"] = plots.plot_nll_h(
                os.path.join(fig_dir, f"nll_h_{m}.png"),
                nll0=fp["nll0_same_points"][0] if fp else nl["nll0"]["mean"],
                nll0_se=fp["nll0_same_points"][1] if fp else nl["nll0"]["se"],
                c1=fp["c1_same_points"][0] if fp else nl["c1"]["mean"],
                c2=c2["c2"]["mean"] if c2 else None, h_fp=fp["h"] if fp else None, nll_fp=fp["nll"] if fp else None,
                err_fp=fp["error"] if fp else None, converged=fp["converged"] if fp else None,
                entropy=nl["entropy"][0] if nl.get("entropy") else None, title=f"{nice_name(m)}: NLL(h)")
        for key in ("w2", "w2wide"):
            js = r.get(key)
            if not js:
                continue
            _, arr = load_stage(out_dir, f"{key}/{m}")
            if arr is not None:
                hs = [float(h) for h in arr["h"]]
                pick: dict[float, np.ndarray] = {}
                for hw in results["config"]["sample_plot_h"]:
                    i = int(np.argmin(np.abs(np.asarray(hs) - hw)))
                    if abs(hs[i] - hw) < 0.02 and hs[i] not in pick:
                        pick[hs[i]] = arr[f"samples_h{i}"]
                if pick:
                    figs[f"samples_{key}/{m}"] = plots.plot_samples_grid(
                        arr["data"], pick, os.path.join(fig_dir, f"samples_{key}_{m}.png"), title=nice_name(m))
                if results.get("kind") == "demo":
                    for i, h in enumerate(hs):
                        if any(k.startswith(f"sample_h{h:g}/{m}/") for k in figs):
                            continue
                        figs[f"sample_h{h:g}/{m}/{key}"] = plots.plot_samples_single(
                            arr[f"samples_h{i}"], os.path.join(fig_dir, f"samples_h{h:g}.png"),
                            title=f"{nice_name(m)}, h = {h:g}", data=arr["data"])
            lab = f"{nice_name(m)} [{min(js['h']):g}, {max(js['h']):g}]"
            curves[key][lab] = {"h": js["h"], "mean": [v[0] for v in js["w2"]], "se": [v[1] for v in js["w2"]]}
            curves_sq[key][lab] = {"h": js["h"], "mean": [v[0] for v in js["w2_sq"]], "se": [v[1] for v in js["w2_sq"]]}
            floors[lab] = js["floor_w2"][0]
            floors_sq[lab] = js["floor_w2_sq"][0]
        fd = r.get("fd")
        if fd:
            _, arr = load_stage(out_dir, f"fd/{m}")
            if arr is not None:
                series = {f"outer {v['outer_tol']:g}, inner {v['inner_tol']:g}": arr[f"c1_fd_{k}"]
                          for k, v in enumerate(fd["variants"])}
                figs[f"fd/{m}"] = plots.plot_fd_vs_exact(os.path.join(fig_dir, f"fd_vs_exact_{m}.png"),
                                                         arr["c1_exact"], series, title=nice_name(m))
    for key, cur in curves.items():
        if not cur:
            continue
        figs[f"w2/{key}"] = plots.plot_w2_h(os.path.join(fig_dir, f"w2_{key}.png"), cur, ylabel="W2 (distance)",
                                            floor=floors, title="W2(samples, fresh data)")
        figs[f"w2sq/{key}"] = plots.plot_w2_h(os.path.join(fig_dir, f"w2sq_{key}.png"), curves_sq[key],
                                              ylabel="W2 squared (paper's EMD)", floor=floors_sq,
                                              title="W2^2 (as the paper's code)")
    return figs


def write_outputs(out_dir: str | os.PathLike, results: dict[str, Any]) -> dict[str, Any]:
    """Write figures, CSV tables and report.md for ``results`` into ``out_dir``; stores the
    figure paths (relative to ``out_dir``) in ``results["figures"]``. A hand-written
    ``out_dir/NOTES.md`` is included in the report verbatim. Returns the paths written."""
    out_dir = os.fspath(out_dir)
    figs = write_figures(out_dir, results)
    results["figures"] = {k: os.path.relpath(p, out_dir) for k, p in figs.items()}
    csvs = write_csvs(out_dir, results)
    notes_path = os.path.join(out_dir, "NOTES.md")
    run_notes = None
    if os.path.exists(notes_path):
        with open(notes_path, encoding="utf-8") as fh:
            run_notes = fh.read()
    p = os.path.join(out_dir, "report.md")
    atomic_write(p, render_markdown(results, run_notes).encode("utf-8"))
    return {"figures": figs, "csv": csvs, "report": p}
