"""hbar benchmarks: ratios measured side by side in one run (machines are shared and noisy,
so only ratios taken in the same process are meaningful).

1. Sampler overhead: wall time of hbar.sample / (number of score evaluations x time of one bare
   batched network evaluation). Target <= 1.2.
2. WKB C1 by characteristics vs the paper's finite-difference algorithm on the same trained
   2-D network, same points, same tolerances: speed ratio (target >= 100) and accuracy of each
   against the Fokker–Planck slope (from brute-force NLL(h) at small h, extrapolated to h -> 0
   with the exact NLL0).
3. Cost of order=1 over order=0 likelihood in 2-D (target <= 4).

Usage: python3 benchmarks/run.py [--quick] [--points 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

import hbar  # noqa: E402
from hbar.likelihood import nll  # noqa: E402
from hbar.ode import ODEOptions  # noqa: E402
from hbar.sampling import sample  # noqa: E402
from hbar.series import polynomial_coefficients  # noqa: E402


def best_of(fn, repeats: int = 3) -> float:
    """Minimum wall time over repeats (after one warm-up call that compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def trained_network(epochs: int):
    cfg = hbar.training.TrainConfig.paper("swiss_roll", "simple", epochs=epochs)
    res = hbar.training.train(cfg, None)
    return res.score_fn, res.schedule


def bench_sampler(score, schedule, n: int, steps: int) -> dict:
    x = schedule.prior_sample(jax.random.PRNGKey(0), n, 2)
    net = jax.jit(lambda z, t: score(z, t))
    t_net = best_of(lambda: net(x, 0.5).block_until_ready(), repeats=20)
    key = jax.random.PRNGKey(1)
    res = sample(score, schedule, key, n, 0.5, steps=steps)
    t_sample = best_of(lambda: sample(score, schedule, key, n, 0.5, steps=steps))
    return {"n": n, "steps": steps, "nfe": res.nfe, "t_network_s": t_net, "t_sample_s": t_sample,
            "ratio": t_sample / (res.nfe * t_net)}


def bench_orders(score, schedule, x, options) -> dict:
    t0 = best_of(lambda: nll(score, schedule, x, order=0, options=options, batch_size=len(x)), repeats=2)
    t1 = best_of(lambda: nll(score, schedule, x, order=1, options=options, batch_size=len(x)), repeats=2)
    return {"n": len(x), "t_order0_s": t0, "t_order1_s": t1, "ratio": t1 / t0}


def fp_slope(score, schedule, x, hs, nll0_mean, deg=4):
    """Slope of the brute-force NLL(h) at h -> 0 (hbar.series.polynomial_coefficients through the
    exact NLL0 and the Fokker–Planck values at ``hs``; docs/theory.md section 8)."""
    fp = hbar.references.fokker_planck_nll(score, schedule, x, hs, tol=1e-4, warn=False)
    return float(polynomial_coefficients(hs, fp.nll, nll0_mean, deg)[0]), fp


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller sizes")
    ap.add_argument("--points", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=400)
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--skip-fd", action="store_true")
    args = ap.parse_args()
    n_pts = 40 if args.quick else args.points
    print(f"training a paper network on the swiss roll for {args.epochs} epochs ...", flush=True)
    score, schedule = trained_network(args.epochs)
    results: dict = {}

    s = bench_sampler(score, schedule, n=3000 if not args.quick else 1000, steps=1000 if not args.quick else 200)
    results["sampler"] = s
    print(f"[1] sampler: {s['t_sample_s']:.3f} s for {s['nfe']} score evaluations of {s['n']} points; "
          f"bare network {1e3 * s['t_network_s']:.3f} ms -> ratio {s['ratio']:.3f} (target <= 1.2)", flush=True)

    x = hbar.data.load_dataset("swiss_roll", n_pts, seed=123)
    opts = ODEOptions(rtol=1e-5, atol=1e-5)
    o = bench_orders(score, schedule, x, opts)
    results["order_cost"] = o
    print(f"[3] order=1 / order=0 in 2-D, {o['n']} points: {o['t_order1_s']:.2f} s / {o['t_order0_s']:.2f} s "
          f"= {o['ratio']:.2f} (target <= 4)", flush=True)

    if not args.skip_fd:
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
              f"-> speed ratio {t_fd / t_char:.0f}x (target >= 100)", flush=True)
        print(f"    C1 characteristics {c1_char:.4f} ± {char.c1_mean[1]:.4f}; finite differences "
              f"{c1_fd:.4f} ± {fd.c1_mean[1]:.4f}; max |C1_char - C1_fd| per point "
              f"{results['c1']['max_abs_pointwise_diff']:.2e}")
        print(f"    Fokker–Planck slope (degree-4 fit through the exact NLL0 and FP at h = {fp_hs}; FP "
              f"error estimates {np.round(np.asarray(fp.error), 5).tolist()}): {slope:.4f}; "
              f"|C1 - slope| characteristics {abs(c1_char - slope):.4f}, finite differences {abs(c1_fd - slope):.4f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=lambda o: np.asarray(o).tolist())


if __name__ == "__main__":
    main()
