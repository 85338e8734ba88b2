"""Markdown report of the paper2024 study (docs/theory.md section 10), section by section.

Every section is a small function ``section(results) -> list[str]`` of the results dict only
(the dict :func:`hbar.studies.paper2024.run_reproduce` returns and writes to ``results.json``;
``results["figures"]`` holds the figure paths relative to the results folder). Every
run-specific statement is generated from those results; the hand-written commentary lives in
``notes.md`` beside this module and is included verbatim. Missing stages are listed as missing,
never filled in.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from importlib import resources
from typing import Any

from .analysis import w2_slope
from .paper import PAPER_EPOCHS, PAPER_N_TEST, PAPER_TABLE1, PAPER_W2_TRIALS

__all__ = ["render_markdown", "load_notes", "table1_rows", "SECTIONS", "expected_stages", "nice_name", "nll_h_rows",
           "NLL_H_COLUMNS"]

NICE = {"swiss_roll": "Swiss roll", "25gaussians": "25 Gaussians", "simple": "SIMPLE", "cosine": "COSINE"}
Results = dict[str, Any]


# ======================================================================================
# formatting helpers
# ======================================================================================

def fmt(v: Any, p: int = 3) -> str:
    if v is None:
        return "n/a"
    try:
        x = float(v)
    except (TypeError, ValueError):
        return str(v)
    if not math.isfinite(x):
        return "n/a"
    if x != 0 and (abs(x) < 10 ** (-p) or abs(x) >= 1e5):
        return f"{x:.{max(p - 1, 1)}e}"
    return f"{x:.{p}f}"


def pm(ms: Any, p: int = 3) -> str:
    """'mean ± se' of a (mean, se) pair or a {"mean", "se"} dict."""
    if ms is None:
        return "n/a"
    if isinstance(ms, dict):
        return f"{fmt(ms.get('mean'), p)} ± {fmt(ms.get('se'), p)}"
    return f"{fmt(ms[0], p)} ± {fmt(ms[1], p)}"


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out + [""]


def nice_name(m: str) -> str:
    ds, sc = m.split("-")
    return f"{NICE.get(ds, ds)} / {NICE.get(sc, sc)}"


def _fig(results: Results, key: str) -> str | None:
    return (results.get("figures") or {}).get(key)


def _is_demo(results: Results) -> bool:
    return results.get("kind") == "demo"


@functools.cache
def load_notes() -> dict[str, str]:
    """The hand-written commentary (notes.md beside this module), keyed by its ``## key`` headings."""
    text = resources.files(__package__).joinpath("notes.md").read_text(encoding="utf-8")
    notes: dict[str, str] = {}
    key = None
    for line in text.splitlines():
        if line.startswith("## "):
            key = line[3:].strip()
            notes[key] = ""
        elif key is not None:
            notes[key] += line + "\n"
    return {k: v.strip() for k, v in notes.items()}


def _note(key: str) -> list[str]:
    return [load_notes()[key], ""]


def _join_range(vals: list[float], p: int = 3) -> str:
    vals = [v for v in vals if v is not None and math.isfinite(v)]
    if not vals:
        return "n/a"
    lo, hi = min(vals), max(vals)
    return fmt(lo, p) if math.isclose(lo, hi) else f"{fmt(lo, p)}-{fmt(hi, p)}"


# ======================================================================================
# sections
# ======================================================================================

def section_header(results: Results) -> list[str]:
    cfg = results["config"]
    if _is_demo(results):
        ds = ", ".join(NICE.get(d, d) for d in cfg["datasets"])
        sc = ", ".join(NICE.get(s, s) for s in cfg["schedules"])
        title = f"hbar demo: {ds}, {sc} schedule"
    else:
        title = "Reproduction of Hirono, Tanaka & Fukushima (ICML 2024)"
    status = "complete" if results["complete"] else "PARTIAL (stages missing, see below)"
    fn = "run_demo" if _is_demo(results) else "run_reproduce"
    L = [f"# {title}", "",
         f"Configuration `{cfg['name']}`, seed {results['seed']}. Status: **{status}**; updated {results['updated_at']}.", "",
         f"Produced by `hbar.studies.paper2024.{fn}(out_dir, seed={results['seed']}, config=ReproduceConfig(name="
         f"{cfg['name']!r}, ...))`; calling it again on the same `out_dir` resumes an interrupted run and recomputes "
         "nothing that has finished. Paper numbers: docs/theory.md section 10.", ""]
    tot = results.get("total_stage_seconds")
    L.append(f"Sum of the wall times of all stages: {fmt(tot / 60 if tot else None, 1)} min "
             f"({'including' if any(k.startswith('train/') for k in results.get('stage_seconds', {})) else 'excluding'} "
             "the training stages).")
    for h in results.get("wall_seconds_history") or []:
        L.append(f"- call finished {h['finished_at']}: {h['seconds'] / 60:.1f} min wall, recomputed "
                 f"{len(h['recomputed'])} stage(s)")
    return L + [""]


def section_conventions(results: Results) -> list[str]:
    return _note("conventions")


def section_gauss1d(results: Results) -> list[str]:
    cfg = results["config"]
    if not cfg.get("run_gauss1d"):
        return []
    L = ["## 1. One-dimensional Gaussian (paper section 5.1)", ""]
    g = results.get("gauss1d")
    if not g:
        return L + ["*Missing: the `gauss1d` stage has not finished.*", ""]
    s = g["setting"]
    L += [f"Data N(0, v0) with v0 = {s['v0']}, OU schedule {s['schedule']} (f = -beta/2, g² = beta), "
          f"score {s['score']}, i.e. the exact score scaled by (1 + eps). Closed form: `gaussian_oracle` "
          f"(Gaussian moment ODEs with h-sensitivities). WKB: `hbar.nll(order=2)` on {cfg['g1_n_points']} data "
          f"points. Samplers: Euler-Maruyama, {cfg['g1_steps']} steps, {cfg['g1_n_samples']} samples vs as many "
          f"fresh data points, {cfg['g1_trials']} trial(s); NLL of a Gaussian fitted to the samples; path-integral "
          f"Monte Carlo (`path_nll`, {cfg['g1_path_paths']} paths, {cfg['g1_path_steps']} steps); 1-D "
          f"Fokker-Planck (`fokker_planck_nll`, tol {cfg['g1_fp_tol']:g}). All NLLs are means over the same points.", ""]
    rows = []
    for c in g["cases"]:
        w = c["wkb"]
        d = w["max_abs_diff_vs_oracle"]
        rows.append([f"{c['eps']:+g}", fmt(c["oracle_nll0_points"], 4), pm(w["nll0"], 4), fmt(c["oracle_c1_points"], 4),
                     pm(w["c1"], 4), fmt(c["oracle_c2_points"], 4), pm(w["c2"], 4), f"{d['c1']:.1e} / {d['c2']:.1e}",
                     fmt(c["nll_oracle"][-1] - c["nll_oracle"][0], 4)])
    L += table(["eps", "NLL0 closed form", "NLL0 WKB", "C1 closed form", "C1 WKB", "C2 closed form", "C2 WKB",
                "max per-point diff C1 / C2", "NLL(1) - NLL(0)"], rows)
    same_sign = all((c["oracle_c1"] < 0) == (c["nll_oracle_expect"][-1] < c["nll_oracle_expect"][0]) for c in g["cases"])
    L += [f"Closed form over h in [0, 1]: the NLL **falls** with h for eps = {g['nll_falls_with_h']} and **rises** for "
          f"eps = {g['nll_rises_with_h']}; C1 has the same sign as NLL(1) - NLL(0) "
          f"{'in every case' if same_sign else '**not** in every case'}.", ""]
    var0 = [(c["eps"], c["samples"]["oracle_var"][0]) for c in g["cases"] if c["samples"]["h"][0] == 0]
    if var0:
        L += ["At h = 0 the closed-form sample variance is "
              + ", ".join(f"{fmt(v, 3)} ({'narrower' if v < s['v0'] else 'wider'} than v0) for eps = {e:+g}"
                          for e, v in var0) + ".", ""]
    L += _note("gauss1d-mechanism")
    rows = []
    for c in g["cases"]:
        sm = c["samples"]
        for i, h in enumerate(sm["h"]):
            rows.append([f"{c['eps']:+g}", f"{h:g}", fmt(sm["oracle_nll"][i], 4), pm(sm["nll_gauss_fit"][i], 4),
                         fmt(sm["oracle_w2"][i], 4), pm(sm["w2"][i], 4), pm(sm["w2_sq"][i], 5),
                         fmt(sm["oracle_var"][i], 4), pm(sm["var"][i], 4)])
    floor = pm(g["cases"][0]["samples"]["w2_floor"], 4)
    L += [f"Samples (W2 floor between two independent data sets of the same size: {floor}):", ""]
    L += table(["eps", "h", "NLL closed form", "NLL Gaussian fit", "W2 closed form", "W2 samples", "W2² samples",
                "var closed form", "var samples"], rows)
    rows = []
    for c in g["cases"]:
        fp, pth = c["fp"], c["path"]
        for i, h in enumerate(fp["h"]):
            rows.append([f"{c['eps']:+g}", f"{h:g}", fmt(fp["oracle_nll"][i], 4), fmt(fp["nll"][i], 4),
                         fmt(fp["error"][i], 1), str(bool(fp["converged"][i])), "", ""])
        for i, h in enumerate(pth["h"]):
            rows.append([f"{c['eps']:+g}", f"{h:g}", fmt(pth["oracle_nll"][i], 4), "", "", "",
                         f"{fmt(pth['nll'][i], 4)} ± {fmt(pth['mc_se'][i], 4)}", fmt(pth["bias"][i], 4)])
    L += ["Brute-force references (Fokker-Planck and path-integral Monte Carlo):", ""] + _note("gauss1d-references")
    L += table(["eps", "h", "NLL closed form", "NLL Fokker-Planck", "FP error est.", "FP converged",
                "NLL path MC ± MC se", "path MC bias"], rows)
    if _fig(results, "gauss1d"):
        L += [f"![1-D study]({_fig(results, 'gauss1d')})", ""]
    return L


def _training_text(results: Results) -> str:
    cfg = results["config"]
    trains = [r["train"] for r in results["models"].values() if r.get("train")]
    if not trains:
        return f"Models: `TrainConfig.paper` with {cfg['epochs']} epochs (training stage missing)."
    tc, tr = trains[0]["config"], trains[0]
    steps = f" of {tr['steps'] // tr['epochs']} steps" if tr.get("epochs") else ""
    ema = f", EMA weights (decay {tc['ema_decay']:g})" if tc.get("ema_decay") else ""
    return (f"Models: `TrainConfig.paper` ({tr['epochs']} epochs{steps}, {tc['n_train']} training points, batch "
            f"{tc['batch_size']}, Adam {tc['lr']:g}, {tc['weighting']}-weighted DSM{ema}, network {tc['network']['name']} "
            f"width {tc['network']['width']} depth {tc['network']['depth']}, seed {tc['seed']}; the paper trains "
            f"{PAPER_EPOCHS} epochs).")


def section_table1(results: Results) -> list[str]:
    cfg = results["config"]
    demo = _is_demo(results)
    L = ["## NLL and WKB coefficients" if demo else "## 2. Table 1: NLL0 and C1 on the 2-D data sets (paper section 5.2)", ""]
    L += [f"{_training_text(results)} NLL0 and C1 by exact autodiff along characteristics (`hbar.nll(order=1)`, "
          f"rtol = atol = {cfg['nll_tol']:g}) on the {cfg['n_test']} held-out points; trajectories leaving "
          f"[-{cfg['bound']:g}, {cfg['bound']:g}]² are excluded and counted.", ""]
    rows = []
    for m, r in results["models"].items():
        nl, p = r.get("nll"), PAPER_TABLE1.get(m)
        if not nl:
            rows.append([nice_name(m), "missing", "", "", "", "", ""])
            continue
        rows.append([nice_name(m), pm(nl["nll0"]), f"{p[0]:.2f} ± {p[1]:.2f}" if p else "-", pm(nl["c1"]),
                     f"{p[2]:.2f} ± {p[3]:.2f}" if p else "-", f"{p[4]:.2f} ± {p[5]:.2f}" if p else "-",
                     f"{nl['n_failed']} / {nl['n']}"])
    L += table(["model", "NLL0 ours", "NLL0 paper", "C1 ours (exact)", "C1 paper (tol 1e-3)", "C1 paper (tol 1e-5)",
                "excluded"], rows)
    return L


def _diff_text(ours: float | None, ours_se: float | None, paper: float, paper_pm: float) -> str:
    if ours is None or not math.isfinite(ours):
        return "missing"
    d = ours - paper
    band = math.sqrt(paper_pm**2 + (ours_se or 0.0) ** 2)
    verdict = "within" if abs(d) <= band else f"beyond ({abs(d) / band:.1f}x)"
    return f"{d:+.3f} ({verdict} the combined error bar {band:.2f})"


def section_table1_lines(results: Results) -> list[str]:
    if _is_demo(results):
        return []
    L = ["Line by line (difference ours - paper, compared with the paper's ± combined with our se):", ""]
    for m, r in results["models"].items():
        nl, p = r.get("nll"), PAPER_TABLE1.get(m)
        if not nl or not p:
            continue
        L.append(f"- **{nice_name(m)}**: NLL0 {_diff_text(nl['nll0']['mean'], nl['nll0']['se'], p[0], p[1])}; "
                 f"C1 vs tol 1e-3 {_diff_text(nl['c1']['mean'], nl['c1']['se'], p[2], p[3])}; "
                 f"C1 vs tol 1e-5 {_diff_text(nl['c1']['mean'], nl['c1']['se'], p[4], p[5])}. "
                 f"Per-point sd: NLL0 {fmt(nl['nll0']['sd'], 2)}, C1 {fmt(nl['c1']['sd'], 2)}.")
    return L + [""]


def section_beyond(results: Results) -> list[str]:
    cfg = results["config"]
    L = ["### Beyond the paper: C2, tolerance, entropy", ""]
    rows = []
    for m, r in results["models"].items():
        nl, c2 = r.get("nll"), r.get("c2")
        if not nl:
            continue
        ent = nl.get("entropy")
        rows.append([nice_name(m), pm(c2["c2"]) if c2 else "missing", f"{c2['n']} ({c2['n_failed']} excl.)" if c2 else "-",
                     pm(c2["c1"]) if c2 else "-", pm(nl["nll0_tol_paper"]), pm(ent) if ent else "n/a",
                     fmt(nl.get("excess_nll0"))])
    if not rows:
        return []
    L += table(["model", "C2 (order 2)", "C2 points", "C1 on the C2 points", f"NLL0 at tol {cfg['nll_tol_paper']:g}",
                "data entropy (docs/theory.md section 9)", "excess NLL0 = NLL0 - entropy"], rows)
    rob = {m: r["robust"] for m, r in results["models"].items() if r.get("robust") and r.get("nll")}
    if rob:
        L += _note("c1-tails")
        L += table(["model", "C1 mean ± se", "C1 median", "C1 5%-trimmed mean", "C1 1% / 99% quantiles", "min / max",
                    "NLL0 median", "C2 median", "C2 5%-trimmed mean", "C2 min / max"],
                   [[nice_name(m), pm(results["models"][m]["nll"]["c1"]), fmt(q["median"], 2), fmt(q["trim5"], 2),
                     f"{fmt(q['q01'], 1)} / {fmt(q['q99'], 1)}", f"{fmt(q['min'], 1)} / {fmt(q['max'], 1)}",
                     fmt(q["nll0_median"]), fmt(q["c2_median"], 1), fmt(q["c2_trim5"], 1),
                     f"{fmt(q['c2_min'], 1)} / {fmt(q['c2_max'], 1)}"] for m, q in rob.items()])
        if any(q.get("c2_min") is not None for q in rob.values()):
            L += _note("c2-radius")
    costs = []
    for r in results["models"].values():
        nl, c2 = r.get("nll"), r.get("c2")
        if nl and c2 and nl.get("seconds") and c2.get("seconds") and c2["n"]:
            costs.append((c2["seconds"] / c2["n"]) / (nl["seconds"] / nl["n"]))
    if cfg.get("n_c2"):
        cost = (f"; per point, the order-2 stage took {_join_range(costs, 1)} times the wall time of the order-1 "
                "stage in this run" if costs else "")
        L += [f"C2 is computed on the first {cfg['n_c2']} valid test points only{cost}; the WKB-2 line uses NLL0 and "
              "C1 of all points and C2 of that subset.", ""]
    return L


def section_fp(results: Results) -> list[str]:
    cfg = results["config"]
    rows, scales, unconv = [], [], []
    for m, r in results["models"].items():
        for key in ("fp", "fpfine"):
            fp = r.get(key)
            lab = nice_name(m) + (" (fine grids)" if key == "fpfine" else "")
            if not fp:
                if (key == "fp" and r.get("nll")) or (key == "fpfine" and m in (cfg.get("fp_fine_models") or [])):
                    rows.append([lab, "missing", "", "", "", "", ""])
                continue
            if fp.get("feature_scale") is not None:
                scales.append(fp["feature_scale"])
            bad = [f"{h:g}" for h, c in zip(fp["h"], fp["converged"]) if not c]
            if bad:
                unconv.append(f"{lab}: h = {', '.join(bad)}")
            for i, h in enumerate(fp["h"]):
                rows.append([lab if i == 0 else "", f"{h:g}", fmt(fp["nll"][i], 4), fmt(fp["error"][i], 1),
                             "yes" if fp["converged"][i] else "**no**", fmt(fp["slope_fp"][i], 3),
                             " → ".join(str(c) for c in fp["cells"])])
    if not rows:
        return []
    L = ["### Fokker-Planck NLL(h)", ""]
    fine = ""
    if cfg.get("fp_fine_models"):
        fine = (f" Rows marked 'fine grids' come from a second stage on a fixed ladder of {cfg['fp_fine_grid']} × 2^k "
                f"cells per axis ({cfg['fp_fine_levels']} levels) for the models {list(cfg['fp_fine_models'])}; the "
                "NLL(h) figures and the minimisers use them where present.")
    L += [f"`fokker_planck_nll`, tol {cfg['fp_tol']:g}, at most {cfg['fp_max_levels']} grid levels and "
          f"{cfg['fp_max_cells']} cells, box [-{cfg['fp_box']:g}, {cfg['fp_box']:g}]²; mean over the first "
          f"{cfg['fp_points']} valid test points; 'error' is the solver's discretisation error estimate, 'slope' = "
          f"(NLL_FP(h) - NLL0)/h to compare with C1.{fine}", ""]
    L += table(["model", "h", "NLL_FP(h)", "error est.", "converged", "slope", "cells per axis"], rows)
    if scales:
        L += [f"Feature scale of the learned scores at t_min (reported by the solver): {_join_range(scales, 3)}, on a "
              f"box of width {2 * cfg['fp_box']:g}.", ""]
    if unconv:
        L += ["Not converged: " + "; ".join(unconv) + ".", ""] + _note("fp-sharp")
    for m, r in results["models"].items():
        for key in ("fp", "fpfine"):
            if r.get(key) and r[key]["flags"]:
                lab = nice_name(m) + (" (fine grids)" if key == "fpfine" else "")
                L.append(f"- FP flags for {lab}: " + "; ".join(dict.fromkeys(r[key]["flags"])))
    L.append("")
    for m, r in results["models"].items():
        if _fig(results, f"nll_h/{m}") and not r.get("path"):
            L.append(f"![NLL(h) {m}]({_fig(results, f'nll_h/{m}')})")
    return L + [""]


NLL_H_COLUMNS = ["h", "n_points", "nll0", "wkb1", "wkb2", "pade", "trunc_err_wkb2", "inside_radius_frac", "path_nll",
                 "path_mc_se", "path_disc_error", "path_total_error", "path_converged", "path_steps", "path_paths",
                 "path_observed_order", "fp_nll", "fp_error", "fp_converged", "pade_frac_points_below_pole"]


def nll_h_rows(pth: dict[str, Any]) -> list[list[Any]]:
    """One row per h of a ``path`` stage (columns :data:`NLL_H_COLUMNS`), everything on its points."""
    ser, fp = pth.get("series"), pth.get("fp") or {}
    fpi = {float(h): i for i, h in enumerate(fp.get("h", []))}
    out = []
    for i, r in enumerate(pth["rows"]):
        h = float(r["h"])
        j = fpi.get(h)
        s = [ser["wkb1_at_h"][i], ser["wkb2_at_h"][i], ser["pade_at_h"][i], ser["trunc_err2_at_h"][i],
             ser["frac_inside_at_h"][i]] if ser else [None] * 5
        f = [fp["nll"][j], fp["error"][j], fp["converged"][j]] if j is not None else [None] * 3
        out.append([h, pth["n"], pth["nll0_same_points"][0]] + s + [r["nll"], r["mc_se"], r["disc_error"],
                   r["total_error"], r["converged"], r["steps"], r["n_paths"], r["observed_order"]] + f
                   + [ser["pade_frac_at_h"][i] if ser else None])
    return out



def _path_agreement(pth: dict[str, Any]) -> list[tuple[float, float, float]]:
    """(h, path - FP, combined error) where both the path integral and FP converged on these points."""
    fp = pth.get("fp") or {}
    fpi = {float(h): i for i, h in enumerate(fp.get("h", []))}
    out = []
    for r in pth["rows"]:
        j = fpi.get(float(r["h"]))
        if j is None or not (r["converged"] and fp["converged"][j]) or fp["nll"][j] is None or fp["error"][j] is None:
            continue
        out.append((float(r["h"]), r["nll"] - fp["nll"][j], math.hypot(r["total_error"], fp["error"][j])))
    return out


def section_nll_h(results: Results) -> list[str]:
    """NLL(h) on the path-stage points: the series inside its radius, Pade, converged brute force."""
    models = {m: r["path"] for m, r in results["models"].items() if r.get("path")}
    if not models:
        return []
    cfg = results["config"]
    L = ["### NLL(h): the WKB series inside its radius against converged brute force", ""]
    L += [f"On the first {cfg['path_points']} valid test points (the same points for every column): NLL0 and C1 "
          "(order 1), C2 from the order-2 stage, the WKB lines NLL0 + h C1 (+ h² C2), the [0/1] Pade resummation "
          "NLL0 + h C1 / (1 - h C2/C1) per point and averaged, and the step-converged path-integral NLL(h) of "
          f"`converged_path_nll` (tol {cfg['path_tol']:g} nats on both the Monte Carlo s.e. and the estimated "
          f"discretisation error; ladder {cfg['path_steps0']}, {2 * cfg['path_steps0']}, ... up to "
          f"{cfg['path_max_steps']} steps, {cfg['path_n_paths']} to {cfg['path_max_paths']} paths per point, coupled "
          "levels, control variate). The Fokker-Planck column is the `fp` stage's per-point values averaged over the "
          "same points; its error estimate is the one the solver gave for its mean over all its points.", ""]
    for m, pth in models.items():
        ser = pth.get("series")
        lab = nice_name(m)
        if ser:
            rho = ser["radius_median"]
            L += [f"**{lab}**: per-point radius estimate |C1/C2| of the h-series: median {fmt(rho)} (10 % / 90 % "
                  f"quantiles {fmt(ser['radius_q10'])} / {fmt(ser['radius_q90'])}). The WKB lines of the figure are "
                  f"drawn only for h < {fmt(rho)} (the median radius); 'inside' is the fraction of points with "
                  "h < radius/2; 'trunc. err.' the estimated truncation error of WKB-2 (inf when some point is "
                  "beyond its radius). The Pade value is the mean over the points below their pole (where a point's "
                  "C1 and C2 have the same sign its [0/1] approximant has a pole at h = C1/C2); the share of points "
                  "it covers is given where it is not all of them, and the figure draws that part dashed.", ""]
        else:
            L += [f"**{lab}**: no C2 on these points (n_c2 < path_points): no WKB-2, radius or Pade.", ""]
        rows = []
        for row in nll_h_rows(pth):
            (h, _n, n0, w1, w2, pd, te, fin, pv, pmc, pdisc, ptot, pconv, pst, ppa, _po, fv, fe, fc, pfr) = row
            d = ""
            if pconv and fc and fv is not None and fe is not None:
                comb = math.hypot(ptot, fe)
                d = f"{(pv - fv) / comb:+.1f}"
            pade = fmt(pd, 4) if pfr is None or pfr == 1 else f"{fmt(pd, 4)} ({pfr:.0%} of points)"
            trunc = "inf" if te is not None and math.isinf(te) else fmt(te, 3)
            rows.append([f"{h:g}", fmt(w1, 4), fmt(w2, 4), pade, trunc, fmt(fin, 2),
                         f"{fmt(pv, 4)} ± {fmt(pmc, 4)} ± {fmt(pdisc, 4)}", "yes" if pconv else "**no**",
                         f"{pst} / {ppa}", fmt(fv, 4), fmt(fe, 3), "" if fc is None else ("yes" if fc else "**no**"), d])
        L += [f"NLL0 on these points: {fmt(pth['nll0_same_points'][0], 4)}.", ""]
        L += table(["h", "WKB-1", "WKB-2", "Pade [0/1]", "trunc. err. WKB-2", "inside", "path integral ± MC ± disc.",
                    "path converged", "steps / paths", "FP (same points)", "FP error est.", "FP converged",
                    "(path - FP) / combined error"], rows)
        agree = _path_agreement(pth)
        n_conv = sum(bool(r["converged"]) for r in pth["rows"])
        txt = f"The path integral converged at {n_conv} of {len(pth['rows'])} h values"
        if agree:
            within = sum(abs(dv) <= 2 * e for _, dv, e in agree)
            txt += (f"; where FP also converged ({len(agree)} h: {', '.join(f'{h:g}' for h, _, _ in agree)}) the two "
                    f"agree within 2 combined errors at {within} of them")
        else:
            txt += "; at no h did both the path integral and FP converge, so they are not compared"
        L += [txt + ".", ""]
        lrows = []
        for r, lad in zip(pth["rows"], pth["ladder"]):
            lrows.append([f"{r['h']:g}", "; ".join(f"{lv['steps']}: {fmt(lv['nll'], 4)} (d {fmt(lv['diff'], 4)})"
                                                 for lv in lad), fmt(r["observed_order"], 2),
                          "yes" if r["extrapolated"] else "no", fmt(r.get("khat_max"), 2), fmt(r["seconds"], 0)])
        L += ["Step ladder of the path integral (steps: NLL at that level, d = difference to the previous level on "
              "the same Brownian paths; k-hat: the largest Pareto tail index of the points' importance weights at the "
              "finest level, above 0.5 infinite variance, above 0.7 not trusted; docs/theory.md section 3.10):", ""]
        L += table(["h", "ladder", "observed order", "extrapolated", "k-hat max", "seconds"], lrows)
        if pth.get("flags"):
            L += ["Path-integral flags: " + "; ".join(pth["flags"]), ""]
        if _fig(results, f"nll_h/{m}"):
            L += [f"![NLL(h) {m}]({_fig(results, f'nll_h/{m}')})", ""]
    return L + _note("nll-h-converged")


def section_w2(results: Results) -> list[str]:
    cfg = results["config"]
    L = ["## 3. W2 against h", ""]
    L += [f"Euler-Maruyama with {cfg['w2_steps']} steps, {cfg['w2_n']} samples against {cfg['w2_n']} fresh data points, "
          f"exact EMD (`w2_empirical`, POT); {cfg['w2_trials']} trial(s) per h on the small-h grid (paper: "
          f"{PAPER_W2_TRIALS}) and {cfg['w2_trials_wide']} on the wide grid.", ""] + _note("w2-floor")
    rows = []
    for m, r in results["models"].items():
        for key in ("w2", "w2wide"):
            js = r.get(key)
            if not js:
                continue
            rng = f"[{min(js['h']):g}, {max(js['h']):g}]"
            for i, h in enumerate(js["h"]):
                alls = js.get("w2_all")
                rows.append([nice_name(m) if i == 0 else "", rng, f"{h:g}", pm(js["w2"][i], 4), pm(js["w2_sq"][i], 4),
                             pm(alls[i], 4) if alls else "n/a", sum(js["n_failed"][i]), sum(js["n_outside_bound"][i])])
            rows.append(["", "floor", "", pm(js["floor_w2"], 4), pm(js["floor_w2_sq"], 4), "", "", ""])
    if rows:
        L += [f"W2 and W2 squared use the samples inside [-{cfg['bound']:g}, {cfg['bound']:g}]² (the paper's exclusion "
              "rule; the excluded samples are counted in the last column).", ""]
        L += table(["model", "range", "h", "W2", "W2 squared", "W2 all samples", "non-finite",
                    f"outside [-{cfg['bound']:g},{cfg['bound']:g}]²"], rows)
    srows = []
    for m, r in results["models"].items():
        for key in ("w2", "w2wide"):
            js = r.get(key)
            if js and len(js["h"]) > 1:
                a1, a2 = w2_slope(js["h"], js["w2_trials"]), w2_slope(js["h"], js["w2_sq_trials"])
                srows.append([nice_name(m), f"[{min(js['h']):g}, {max(js['h']):g}]", pm(a1, 4), pm(a2, 4),
                              fmt(js["w2"][0][0], 4), fmt(js["floor_w2"][0], 4)])
    if srows:
        L += ["Linear trend of W2 in h (least squares over all trials and h of the range; negative = noise helps):", ""]
        L += table(["model", "range", "dW2/dh ± se", "d(W2²)/dh ± se", f"W2 at h = {results['config']['w2_h_small'][0]:g}",
                    "W2 floor (data vs data)"], srows)
    figs = [f"![W2 {k}]({_fig(results, f'w2/{k}')}) ![W2sq {k}]({_fig(results, f'w2sq/{k}')})"
            for k in ("w2", "w2wide") if _fig(results, f"w2/{k}")]
    L += figs + [""]
    samples = [f"![samples {m} {k}]({_fig(results, f'samples_{k}/{m}')})" for m in results["models"]
               for k in ("w2", "w2wide") if _fig(results, f"samples_{k}/{m}")]
    if _is_demo(results):
        samples += [f"- [{p.rsplit('/', 1)[-1]}]({p})" for k, p in (results.get("figures") or {}).items()
                    if k.startswith("sample_h")]
    if samples:
        L += ["Samples at several h (first trial):", ""] + samples + [""]
    return L


def section_minimisers(results: Results) -> list[str]:
    L = ["## 4. Which h is best, and did C1 predict it?", ""]
    yes_no = {True: "yes", False: "no"}
    rows = []
    for m, r in results["models"].items():
        mm = r.get("minimisers") or {}
        if not mm:
            continue
        if mm.get("h_star_wkb2") is not None:
            hstar = fmt(mm["h_star_wkb2"])
        elif mm.get("h_star_wkb2_outside_radius") is not None:
            hstar = f"none ({fmt(mm['h_star_wkb2_outside_radius'])} is outside the radius)"
        elif mm.get("h_star_wkb2_unchecked") is not None:
            hstar = f"none ({fmt(mm['h_star_wkb2_unchecked'])}: radius unknown)"
        else:
            hstar = "none"
        bf = f"{fmt(mm['h_min_nll'], 2)} ({mm['h_min_nll_source']})" if "h_min_nll" in mm else "missing"
        fp_min = fmt(mm.get("h_min_nll_fp"), 2) if "h_min_nll_fp" in mm else "none converged"
        rows.append([nice_name(m), fmt(mm.get("c1")), fmt(mm.get("c2")), fmt(mm.get("radius_median")), hstar, bf,
                     fp_min, fmt(mm.get("h_min_w2_small"), 3) if "h_min_w2_small" in mm else "missing",
                     fmt(mm.get("h_min_w2_wide"), 2) if "h_min_w2_wide" in mm else "missing",
                     yes_no.get(mm.get("c1_sign_agrees_with_nll_minimiser"), "-"),
                     yes_no.get(mm.get("c1_sign_agrees_with_w2_minimiser"), "-")])
    if not rows:
        return []
    L += table(["model", "C1", "C2", "median radius", "WKB-2 h* = -C1/(2 C2), inside the radius only",
                "argmin NLL, converged brute force", "argmin NLL_FP (converged FP only)", "argmin W2 (small-h grid)",
                "argmin W2 (wide grid)", "C1 sign ↔ NLL min", "C1 sign ↔ W2 min"], rows)
    for m, r in results["models"].items():
        mm = r.get("minimisers") or {}
        if mm.get("c1") is None:
            continue
        txt = [f"C1 = {fmt(mm['c1'])} predicts that the NLL {'falls' if mm['c1'] < 0 else 'rises'} for small h"]
        if mm.get("h_star_wkb2") is not None and mm["h_star_wkb2"] > 0:
            txt.append(f"the order-2 series has its minimum at h* = {fmt(mm['h_star_wkb2'])} (NLL "
                       f"{fmt(mm.get('nll_min_wkb2'))}), inside the median radius {fmt(mm.get('radius_median'))}")
        elif mm.get("h_star_wkb2_outside_radius") is not None:
            txt.append(f"the order-2 parabola's minimum h* = {fmt(mm['h_star_wkb2_outside_radius'])} lies outside the "
                       f"median radius {fmt(mm.get('radius_median'))} of the series, so it is no prediction")
        if "h_min_nll" in mm:
            t = (f"converged brute force (h = 0 and the converged values of {mm['brute_force_grid'][1:]}) is smallest "
                 f"at h = {fmt(mm['h_min_nll'], 2)} ({mm['h_min_nll_source']}, NLL {fmt(mm['nll_min'], 4)})")
            if mm.get("h_min_nll_ties"):
                t += (f"; within 2 combined errors of it: h = {', '.join(f'{h:g}' for h in mm['h_min_nll_ties'])}, "
                      "so the minimiser is not resolved more finely than that")
            if mm.get("path_n_unconverged"):
                t += f"; {mm['path_n_unconverged']} path-integral value(s) did not converge and are not used"
            txt.append(t)
        if "fp_grid" in mm and mm.get("fp_n_unconverged"):
            txt.append(f"{mm['fp_n_unconverged']} of the {len(mm['fp_grid']) - 1} FP values are not converged and are "
                       "not used for any minimiser")
        if "h_min_w2_small" in mm:
            drop = mm.get("w2_drop_small")
            txt.append(f"W2 is smallest at h = {fmt(mm['h_min_w2_small'])} on the small-h grid"
                       + (f" (lower than at h = 0 by {fmt(drop, 4)}; compare with the per-h se in section 3)" if drop else ""))
        if "h_min_w2_wide" in mm:
            txt.append(f"at h = {fmt(mm['h_min_w2_wide'], 2)} on the wide grid")
        L.append(f"- **{nice_name(m)}**: " + "; ".join(txt) + ".")
    return L + [""] + _note("argmin-grids")


def section_fd(results: Results) -> list[str]:
    cfg = results["config"]
    if not (any(r.get("fd") for r in results["models"].values()) or (not _is_demo(results) and cfg.get("n_fd"))):
        return []
    L = ["## 5. The paper's finite-difference C1 against the exact C1", ""] + _note("fd-method")
    steps = sorted({fd["fd_step"] for r in results["models"].values() if (fd := r.get("fd"))})
    if steps:
        L += [f"Finite-difference step in h: {', '.join(f'{s:g}' for s in steps)}.", ""]
    rows = []
    for m, r in results["models"].items():
        fd = r.get("fd")
        if not fd:
            if cfg.get("n_fd"):
                rows.append([nice_name(m), "missing", "", "", "", "", "", ""])
            continue
        for v in fd["variants"]:
            rows.append([nice_name(m), fd["n"], f"{v['outer_tol']:g} / {v['inner_tol']:g}", pm(fd["c1_exact"]),
                         pm(v["c1_fd"]), fmt(v["rms_diff"]), fmt(v["corr"]), fmt(v["seconds"], 0)])
    L += table(["model", "points", "outer / inner tol", "C1 exact", "C1 finite diff.", "RMS diff per point", "corr",
                "seconds"], rows)
    L += [f"![FD vs exact {m}]({_fig(results, f'fd/{m}')})" for m in results["models"] if _fig(results, f"fd/{m}")]
    return L + [""]


def section_discussion(results: Results) -> list[str]:
    if _is_demo(results):
        return []
    L = ["## 6. Differences from the paper and their reasons", ""]
    cfg = results["config"]
    for m, r in results["models"].items():
        nl, fd, tr, p = r.get("nll"), r.get("fd"), r.get("train"), PAPER_TABLE1.get(m)
        if not nl or not p:
            continue
        n_valid = max(nl["n"] - nl["n_failed"], 1)
        parts = [f"NLL0 differs by {nl['nll0']['mean'] - p[0]:+.3f} nats (paper ± {p[1]:.2f}, our se {nl['nll0']['se']:.3f})"]
        if nl.get("excess_nll0") is not None:
            parts.append(f"our NLL0 is {nl['excess_nll0']:.3f} nats above the data entropy, the paper's "
                         f"{p[0] - nl['entropy'][0]:.3f}")
        parts.append(f"re-solving at the paper's tolerance {cfg['nll_tol_paper']:g} moves NLL0 by "
                     f"{nl['nll0_tol_paper']['mean'] - nl['nll0']['mean']:+.4f}")
        if tr:
            parts.append(f"the model was trained {tr['epochs']} epochs (paper {PAPER_EPOCHS}; held-out DSM loss "
                         f"{pm(tr['test_loss']) if tr.get('test_loss') else 'n/a'})")
        parts.append(f"C1 differs by {nl['c1']['mean'] - p[2]:+.3f} from the paper's tol-1e-3 value (± {p[3]:.2f})")
        parts.append(f"the paper's ± {p[1]:.2f} (NLL0) and {p[3]:.2f} (C1) compare with our per-point sd "
                     f"{fmt(nl['nll0']['sd'], 2)} and {fmt(nl['c1']['sd'], 2)} and our se {fmt(nl['nll0']['se'], 3)} and "
                     f"{fmt(nl['c1']['se'], 3)} over {n_valid} points (the paper used {PAPER_N_TEST})")
        if fd and fd["variants"]:
            v = fd["variants"][0]
            add = v["rms_diff"] / math.sqrt(n_valid) if v["rms_diff"] is not None else None
            parts.append(f"on {fd['n']} points the paper's finite-difference algorithm (outer {v['outer_tol']:g}, inner "
                         f"{v['inner_tol']:g}) deviates from the exact C1 by {fmt(v['rms_diff'])} RMS per point (mean "
                         f"{pm(v['c1_fd'])} vs exact {pm(fd['c1_exact'])}), so its per-point noise alone adds about "
                         f"{fmt(add)} to the standard error of our {n_valid}-point mean, plus any systematic offset")
        L.append(f"- **{nice_name(m)}**: " + "; ".join(parts) + ".")
    L.append(f"- Each model is a single training run (seed {results['seed']}); run-to-run variation of training is not in "
             "any error bar.")
    return L + [""] + _note("paper-pm")


def expected_stages(results: Results) -> list[str]:
    """Every stage the configuration asks for, in run order."""
    cfg = results["config"]
    want = ["gauss1d"] if cfg.get("run_gauss1d") else []
    for m in results["models"]:
        want += [f"train/{m}", f"nll/{m}"]
        if cfg.get("n_c2"):
            want.append(f"c2/{m}")
        want.append(f"w2/{m}")
        if cfg.get("n_fd") and cfg.get("fd_tols"):
            want.append(f"fd/{m}")
        if cfg.get("fp_h"):
            want.append(f"fp/{m}")
            if m in (cfg.get("fp_fine_models") or []):
                want.append(f"fpfine/{m}")
        if cfg.get("path_h") and cfg.get("path_points"):
            want.append(f"path/{m}")
        if cfg.get("w2_h_wide"):
            want.append(f"w2wide/{m}")
    return want


def section_stages(results: Results) -> list[str]:
    L = ["## Stages and wall time", ""]
    L += table(["stage", "minutes"], [[k, fmt(v / 60 if v else None, 2)] for k, v in sorted(results["stage_seconds"].items())])
    done = set(results["stages_finished"])
    missing = [w for w in expected_stages(results) if w not in done]
    if missing:
        L += ["**Missing stages** (not finished when this report was written): " + ", ".join(missing), ""]
    return L


SECTIONS: tuple[Callable[[Results], list[str]], ...] = (
    section_header, section_conventions, section_gauss1d, section_table1, section_table1_lines, section_beyond,
    section_fp, section_nll_h, section_w2, section_minimisers, section_fd, section_discussion, section_stages)


def render_markdown(results: Results, run_notes: str | None = None) -> str:
    """The report: every section of :data:`SECTIONS` in order. ``run_notes`` (the text of an
    optional hand-written ``NOTES.md`` in the results folder) follows the header verbatim."""
    parts = [SECTIONS[0](results)]
    if run_notes and run_notes.strip():
        parts.append(["## Notes on this run (written by hand after the run; all numbers below are generated)", "",
                      run_notes.strip(), ""])
    parts += [s(results) for s in SECTIONS[1:]]
    return "\n".join(line for part in parts for line in part) + "\n"


def table1_rows(results: Results) -> list[dict[str, Any]]:
    """One dict per model with our Table 1 numbers (None where a stage is missing)."""
    rows = []
    for m, r in results["models"].items():
        nl, c2, fp = r.get("nll"), r.get("c2"), r.get("fp")
        row: dict[str, Any] = {"model": m}
        if nl:
            row.update(nll0=nl["nll0"]["mean"], nll0_se=nl["nll0"]["se"], nll0_sd=nl["nll0"]["sd"],
                       c1=nl["c1"]["mean"], c1_se=nl["c1"]["se"], c1_sd=nl["c1"]["sd"], n=nl["n"],
                       n_failed=nl["n_failed"], nll0_tol_paper=nl["nll0_tol_paper"]["mean"],
                       entropy=(nl["entropy"] or [None])[0], excess=nl["excess_nll0"])
        if c2:
            row.update(c2=c2["c2"]["mean"], c2_se=c2["c2"]["se"], c2_n=c2["n"], c2_failed=c2["n_failed"])
        if fp:
            for h, v, e, c in zip(fp["h"], fp["nll"], fp["error"], fp["converged"]):
                row[f"fp_{h:g}"] = v
                row[f"fp_{h:g}_err"] = e
                row[f"fp_{h:g}_conv"] = c
        rows.append(row)
    return rows
