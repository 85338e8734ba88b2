"""hbar benchmarks: ratios measured side by side in one run (machines are shared and noisy,
so only ratios taken in the same process, after warm-up on the same shapes, are meaningful).

Networks (``benchmarks/models.py``, trained once and cached in ``benchmarks/_runs``): the
paper-sized PaperMLP (3 x 128) on the swiss roll (SIMPLE schedule, ``--epochs`` of the paper's
recipe) and the same architecture on the 64-D digits.

1. Sampler overhead: wall time of hbar.sample / (number of score evaluations x time of one bare
   batched network evaluation). Target <= 1.2.
2. WKB C1 by characteristics vs the paper's finite-difference algorithm on the same trained
   2-D network, same points, same tolerances: speed ratio and accuracy of each against the
   Fokker–Planck slope (``--skip-fd`` skips it).
3. Exact WKB cost in 2-D: order1 / order0 (target <= 10) with the default options, and each
   option against its previous setting with everything else equal -- error control on the
   returned components vs all components, bounded-scan vs while stage loop (each solve), batched vs
   per-point step control, small batches -- plus the previous settings all together.
4. Accuracy: C1 and C2 per point at rtol = atol = 1e-5 against a tight run (1e-9, every
   component controlled) of the same code; order-2 compile time (target <= 20 s).
5. 64-D digits: order-1 seconds per point (target <= 2 s), default vs previous settings, and C1
   per point against a tight run.

Usage: python3 benchmarks/run.py [--quick] [--points 200] [--json out.json] [--skip-fd]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import hbar  # noqa: E402
from hbar.likelihood import nll  # noqa: E402
from hbar.ode import ODEOptions  # noqa: E402
from hbar.sampling import sample  # noqa: E402
from hbar.series import polynomial_coefficients  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from models import trained  # noqa: E402
from timing import best_of  # noqa: E402

TOL = 1e-5
# the defaults: error_on="returned", stage_loop="auto" (scan backward, while forward), batching="auto"
NEW = dict(options=ODEOptions(rtol=TOL, atol=TOL))
OLD_OPTIONS = ODEOptions(rtol=TOL, atol=TOL, error_on="all", stage_loop="while")
OLD = dict(options=OLD_OPTIONS, batching="batch")  # the settings before these options existed
TIGHT = ODEOptions(rtol=1e-9, atol=1e-9, error_on="all")


def bench_sampler(score, schedule, n: int, steps: int) -> dict:
    x = schedule.prior_sample(jax.random.PRNGKey(0), n, 2)
    net = jax.jit(lambda z, t: score(z, t))
    t_net = best_of(lambda: net(x, 0.5).block_until_ready(), repeats=20)
    key = jax.random.PRNGKey(1)
    res = sample(score, schedule, key, n, 0.5, steps=steps)
    t_sample = best_of(lambda: sample(score, schedule, key, n, 0.5, steps=steps))
    return {"n": n, "steps": steps, "nfe": res.nfe, "t_network_s": t_net, "t_sample_s": t_sample,
            "ratio": t_sample / (res.nfe * t_net)}


def fp_slope(score, schedule, x, hs, nll0_mean, deg=4):
    """Slope of the brute-force NLL(h) at h -> 0 (hbar.series.polynomial_coefficients through the
    exact NLL0 and the Fokker–Planck values at ``hs``; docs/theory.md section 8)."""
    fp = hbar.references.fokker_planck_nll(score, schedule, x, hs, tol=1e-4, warn=False)
    return float(polynomial_coefficients(hs, fp.nll, nll0_mean, deg)[0]), fp


def _run(score, schedule, x, order, **kw):
    return nll(score, schedule, x, order=order, batch_size=kw.pop("batch_size", len(x)), **kw)


def bench_costs(score, schedule, x, rounds) -> dict:
    """Section 3: wall times of order 0 and 1 on the same points, option by option. Every
    variant is warmed up, then run once per round, rounds interleaved (so that all variants
    see the same machine load); the minimum over rounds is reported."""
    n = len(x)
    variants = {
        "order0": (0, NEW),
        "order1": (1, NEW),
        "order1 error_on=all": (1, dict(options=ODEOptions(rtol=TOL, atol=TOL, error_on="all"))),
        "order0 stage_loop=scan": (0, dict(options=ODEOptions(rtol=TOL, atol=TOL, stage_loop="scan"))),
        "order1 stage_loop=while": (1, dict(options=ODEOptions(rtol=TOL, atol=TOL, stage_loop="while"))),
        f"order1 batching=per-point ({n})": (1, dict(NEW, batching="per-point")),
        "order1 batch_size=10": (1, dict(NEW, batch_size=10)),
        "order0 previous": (0, OLD),
        "order1 previous": (1, OLD),
    }
    runs = {name: _run(score, schedule, x, order, **dict(kw)) for name, (order, kw) in variants.items()}
    times: dict[str, list] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (order, kw) in variants.items():
            t0 = time.perf_counter()
            _run(score, schedule, x, order, **dict(kw))
            times[name].append(time.perf_counter() - t0)
    out = {}
    for name, r in runs.items():
        t = min(times[name])
        out[name] = {"t_s": t, "times_s": times[name], "evals_forward": r.evals_forward,
                     "evals_backward": r.evals_backward,
                     "evals_backward_per_point_mean": float(np.mean(r.extras.get("evals_backward_per_point", [0])))}
        print(f"    {name:32s} {t:7.3f} s   evals forward {r.evals_forward:6d}, backward {r.evals_backward:6d} "
              f"(per point: backward mean {out[name]['evals_backward_per_point_mean']:.0f})", flush=True)
    return out


def per_point_errors(a, ref):
    err = np.abs(np.asarray(a) - np.asarray(ref))
    rel = err / np.maximum(np.abs(np.asarray(ref)), 1.0)
    return {"median": float(np.median(err)), "max": float(np.max(err)), "max_rel": float(np.max(rel))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--digits-epochs", type=int, default=3000)
    ap.add_argument("--digits-points", type=int, default=8)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--skip-fd", action="store_true")
    ap.add_argument("--skip-sampler", action="store_true")
    ap.add_argument("--sections", type=str, default="1,2,3,4,5",
                    help="comma-separated sections to run: 1 sampler, 2 C1 vs finite differences, 3 costs, "
                         "4 order-2 compile and accuracy, 5 digits")
    args = ap.parse_args()
    sections = {int(v) for v in args.sections.split(",") if v.strip()}
    n_pts = 40 if args.quick else args.points
    print(f"load average (1, 5, 15 min) at start: {os.getloadavg()} on {os.cpu_count()} cores", flush=True)
    reps = 3 if args.quick else 7
    print(f"paper network (3 x 128) on the swiss roll, {args.epochs} epochs (cached in benchmarks/_runs) ...", flush=True)
    score, schedule = trained("swiss_roll", args.epochs)
    results: dict = {}

    if not args.skip_sampler and 1 in sections:
        s = bench_sampler(score, schedule, n=3000 if not args.quick else 1000, steps=1000 if not args.quick else 200)
        results["sampler"] = s
        print(f"[1] sampler: {s['t_sample_s']:.3f} s for {s['nfe']} score evaluations of {s['n']} points; "
              f"bare network {1e3 * s['t_network_s']:.3f} ms -> ratio {s['ratio']:.3f} (target <= 1.2)", flush=True)

    x = hbar.data.load_dataset("swiss_roll", n_pts, seed=123)
    opts = ODEOptions(rtol=TOL, atol=TOL)

    if not args.skip_fd and 2 in sections:
        t_char = best_of(lambda: nll(score, schedule, x, order=1, options=opts, batch_size=n_pts), repeats=1)
        char = nll(score, schedule, x, order=1, options=opts, batch_size=n_pts)
        t0 = time.perf_counter()
        fd = nll(score, schedule, x, order=1, method="finite-difference", options=opts, batch_size=n_pts)
        t_fd = time.perf_counter() - t0  # includes one compilation: the baseline is run once
        c1_char, c1_fd = char.c1_mean[0], fd.c1_mean[0]
        fp_hs = [0.025, 0.05, 0.075, 0.1, 0.15, 0.2]
        slope, fp = fp_slope(score, schedule, x, fp_hs, char.nll0_mean[0])
        results["c1"] = {"n": n_pts, "t_characteristics_s": t_char, "t_finite_difference_s": t_fd,
                         "speed_ratio": t_fd / t_char, "c1_characteristics": char.c1_mean,
                         "c1_finite_difference": fd.c1_mean, "fp_slope": slope,
                         "fp_nll": np.asarray(fp.nll).tolist(), "fp_error": np.asarray(fp.error).tolist(),
                         "max_abs_pointwise_diff": float(np.nanmax(np.abs(char.c1 - fd.c1)))}
        print(f"[2] C1 on {n_pts} points: characteristics {t_char:.2f} s, finite differences {t_fd:.1f} s "
              f"-> speed ratio {t_fd / t_char:.0f}x", flush=True)
        print(f"    C1 characteristics {c1_char:.4f} ± {char.c1_mean[1]:.4f}; finite differences "
              f"{c1_fd:.4f} ± {fd.c1_mean[1]:.4f}; max |C1_char - C1_fd| per point "
              f"{results['c1']['max_abs_pointwise_diff']:.2e}")
        print(f"    Fokker–Planck slope (degree-4 fit through the exact NLL0 and FP at h = {fp_hs}; FP "
              f"error estimates {np.round(np.asarray(fp.error), 5).tolist()}): {slope:.4f}; "
              f"|C1 - slope| characteristics {abs(c1_char - slope):.4f}, finite differences {abs(c1_fd - slope):.4f}",
              flush=True)

    if 3 in sections:
        print(f"[3] exact WKB cost in 2-D, {n_pts} points, rtol = atol = {TOL:g} (minimum over {reps} interleaved "
              f"rounds after warm-up):", flush=True)
        c = bench_costs(score, schedule, x, reps)
        results["costs_2d"] = c
        t0, t1 = c["order0"]["t_s"], c["order1"]["t_s"]
        ratio = t1 / t0
        print(f"    order1 / order0 = {ratio:.2f} (target <= 10); with the previous settings "
              f"{c['order1 previous']['t_s'] / c['order0 previous']['t_s']:.2f}", flush=True)
        scan_ratio = c["order0 stage_loop=scan"]["t_s"] / t0
        print(f"    order0 stage_loop=scan           / order0 default = {scan_ratio:.2f}", flush=True)
        for name in ("order1 error_on=all", "order1 stage_loop=while", f"order1 batching=per-point ({n_pts})",
                     "order1 batch_size=10", "order1 previous"):
            print(f"    {name:32s} / order1 default = {c[name]['t_s'] / t1:.2f}", flush=True)

    if 4 in sections:
        # [4] accuracy against a tight run, and the order-2 compile time
        t_start = time.perf_counter()
        o2 = nll(score, schedule, x, order=2, batch_size=n_pts, **NEW)
        t_first = time.perf_counter() - t_start
        t_run = best_of(lambda: nll(score, schedule, x, order=2, batch_size=n_pts, **NEW), repeats=1)
        o2_all = nll(score, schedule, x, order=2, batch_size=n_pts, options=ODEOptions(rtol=TOL, atol=TOL, error_on="all"))
        tight = nll(score, schedule, x, order=2, batch_size=n_pts, options=TIGHT)
        acc = {"c1_returned": per_point_errors(o2.c1, tight.c1), "c2_returned": per_point_errors(o2.c2, tight.c2),
               "c1_all": per_point_errors(o2_all.c1, tight.c1), "c2_all": per_point_errors(o2_all.c2, tight.c2),
               "nll0_returned": per_point_errors(o2.nll0, tight.nll0),
               "evals_backward_returned": o2.evals_backward, "evals_backward_all": o2_all.evals_backward,
               "order2_first_call_s": t_first, "order2_run_s": t_run, "order2_compile_s": t_first - t_run,
               "c1_range": [float(np.min(tight.c1)), float(np.max(tight.c1))],
               "c2_range": [float(np.min(tight.c2)), float(np.max(tight.c2))]}
        results["accuracy_2d"] = acc
        print(f"[4] order 2, {n_pts} points: first call {t_first:.1f} s, then {t_run:.1f} s -> compile "
              f"{t_first - t_run:.1f} s (target <= 20 s)", flush=True)
        print(f"    per point vs a tight run (rtol = atol = 1e-9, all components), rtol = atol = {TOL:g}:", flush=True)
        for q in ("nll0", "c1", "c2"):
            keys = [f"{q}_returned"] + ([f"{q}_all"] if q != "nll0" else [])
            line = "; ".join(f"error_on={k.split('_')[1]}: median {acc[k]['median']:.1e}, max {acc[k]['max']:.1e} "
                             f"(relative {acc[k]['max_rel']:.1e})" for k in keys)
            print(f"    {q.upper():5s} {line}", flush=True)
        print(f"    (C1 per point in [{acc['c1_range'][0]:.2f}, {acc['c1_range'][1]:.2f}], C2 in "
              f"[{acc['c2_range'][0]:.2f}, {acc['c2_range'][1]:.2f}]; backward evaluations {o2.evals_backward} "
              f"returned vs {o2_all.evals_backward} all)", flush=True)

    if 5 in sections:
        # [5] 64-D digits
        print(f"digits model (3 x 128, 64-D), {args.digits_epochs} epochs ...", flush=True)
        dscore, dsched = trained("digits", args.digits_epochs)
        m = 2 if args.quick else args.digits_points
        xd = hbar.data.load_dataset("digits", m, seed=7, part="test")
        nll(dscore, dsched, xd[:1], order=1, **NEW)  # warm-up: compiles the 1-point chunk of "auto"
        t_start = time.perf_counter()
        rd = nll(dscore, dsched, xd, order=1, batch_size=m, **NEW)
        t_new = (time.perf_counter() - t_start) / m
        k = min(4, m)
        nll(dscore, dsched, xd[:k], order=1, batch_size=k, **OLD)  # warm-up on the same shape
        t_start = time.perf_counter()
        rd_old = nll(dscore, dsched, xd[:k], order=1, batch_size=k, **OLD)
        t_old = (time.perf_counter() - t_start) / k
        kt = min(2, m)
        rd_tight = nll(dscore, dsched, xd[:kt], order=1, batch_size=kt, options=TIGHT)
        dig = {"n": m, "t_per_point_s": t_new, "t_per_point_previous_s": t_old, "n_previous": k,
               "evals_backward_per_point": np.asarray(rd.extras["evals_backward_per_point"]).tolist(),
               "evals_backward_previous": rd_old.evals_backward,
               "c1_vs_tight": per_point_errors(rd.c1[:kt], rd_tight.c1),
               "c1_previous_vs_tight": per_point_errors(rd_old.c1[:kt], rd_tight.c1),
               "c1": np.asarray(rd.c1).tolist(), "nll0": np.asarray(rd.nll0).tolist()}
        results["digits"] = dig
        print(f"[5] digits 64-D, order 1: {t_new:.2f} s per point ({m} points, target <= 2 s); previous settings "
              f"{t_old:.2f} s per point ({k} points in one batch) -> {t_old / t_new:.2f}x", flush=True)
        print(f"    backward evaluations per point {dig['evals_backward_per_point']} (previous: {rd_old.evals_backward} "
              f"for the batch); C1 per point vs a tight run ({kt} points): max {dig['c1_vs_tight']['max']:.1e}, relative "
              f"{dig['c1_vs_tight']['max_rel']:.1e} (previous settings {dig['c1_previous_vs_tight']['max']:.1e}, relative "
              f"{dig['c1_previous_vs_tight']['max_rel']:.1e}); C1 values {np.round(rd.c1, 1).tolist()}",
              flush=True)

    print(f"load average (1, 5, 15 min) at end: {os.getloadavg()}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=lambda o: np.asarray(o).tolist())


if __name__ == "__main__":
    main()
