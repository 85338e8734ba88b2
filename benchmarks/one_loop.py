"""Benchmark of the one-loop C1 estimator (hbar.one_loop, docs/theory.md section 5.7). One run,
ratios only (the machine is shared; only times taken side by side in one process compare).

1. Cost ratio: time of one one-loop C1 sample per point (adjoint + fluctuation passes) over
   an order-0 Hutchinson NLL of the same point at the same steps (fixed grid, the same Heun
   scheme: 2 stages x steps, one jvp each), for paper_mlp width 64 (depth 2) and the authors'
   width 128 (depth 3) at d = 16, 64, 784, 3072; target <= 10. Also the growth with d at fixed
   width: exponent of the log-log fit of the time per sample (target <= 1.2). Times are the
   process CPU time (all threads; best of 5 after a warm-up), the two functions interleaved:
   on a shared machine the wall time measures the neighbours, the CPU time the work.
2. The exact characteristics' time per point for d = 2 ... 64 (its exponent) and the
   crossover with the one-loop at the default 16 probes: the switch dimension of
   method="auto".
3. Probes for a 1 % standard error of C1 per point on the trained 64-D digits model
   (tests/_one_loop_models.py), and the cost per point.

Usage: python3 benchmarks/one_loop.py [--json out.json] [--ratio-only]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import hbar  # noqa: E402
from hbar.networks import network_from_config  # noqa: E402
from hbar.one_loop import fluctuation_grid, one_loop_samples  # noqa: E402
from hbar.probability_flow import velocity_field  # noqa: E402

STEPS = 128


def _timeit(fn, *args, reps=3):
    jax.block_until_ready(fn(*args))  # compile
    best = np.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def _cpu_side_by_side(calls, reps=5):
    """Best process CPU time of each (fn, *args), the calls interleaved, warm-up excluded."""
    for fn, *a in calls:
        jax.block_until_ready(fn(*a))
    best = [np.inf] * len(calls)
    for _ in range(reps):
        for i, (fn, *a) in enumerate(calls):
            t0 = time.process_time()
            jax.block_until_ready(fn(*a))
            best[i] = min(best[i], time.process_time() - t0)
    return best


def _hutchinson_heun(proc, x, probe, grid):
    """Order-0 Hutchinson log-likelihood on the fixed grid with Heun (the reference cost)."""
    field = velocity_field(proc, probe)

    def step(carry, k):
        X, dl = carry
        ta, tb = grid[k], grid[k + 1]
        dt = tb - ta
        va, da = field(ta, (X, dl))
        vb, db = field(tb, (X + dt * va, dl))
        return (X + 0.5 * dt * (va + vb), dl + 0.5 * dt * (da + db)), None

    (X, dl), _ = jax.lax.scan(step, (x, jnp.zeros(x.shape[0], x.dtype)), jnp.arange(grid.shape[0] - 1))
    return proc.prior_logp(X) + dl


def _net(d, width, seed=0, depth=2):
    return network_from_config({"name": "paper_mlp", "d": d, "width": width, "depth": depth, "dtype": "float64"}, seed)


def _one_loop_and_hutchinson(score, schedule, d, rows, steps):
    """Jitted (one-loop sample, order-0 Hutchinson) functions with their arguments, same rows and grid."""
    proc = hbar.HProcess(schedule, score)
    x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (rows, d)))
    grid = jnp.asarray(fluctuation_grid(schedule, steps))
    keys = jax.random.split(jax.random.PRNGKey(0), rows)
    probe = jax.random.rademacher(jax.random.PRNGKey(1), (rows, d), dtype=x.dtype)
    ol = jax.jit(lambda a, k, g: one_loop_samples(proc, a, a, k, g)["ell1"])
    hu = jax.jit(lambda a, p, g: _hutchinson_heun(proc, a, p, g))
    return (ol, x, keys, grid), (hu, x, probe, grid)


def cost_ratio(score, schedule, d, rows=32, steps=STEPS):
    """(one-loop sample, order-0 Hutchinson NLL) CPU seconds per point, side by side."""
    t_ol, t_hu = _cpu_side_by_side(list(_one_loop_and_hutchinson(score, schedule, d, rows, steps)))
    return t_ol / rows, t_hu / rows


def one_loop_time(score, schedule, d, rows=64, steps=STEPS):
    (ol, *a_ol), (hu, *a_hu) = _one_loop_and_hutchinson(score, schedule, d, rows, steps)
    return _timeit(ol, *a_ol) / rows, _timeit(hu, *a_hu) / rows


def exact_time(score, schedule, d, n=8):
    x = np.random.default_rng(0).uniform(-1, 1, (n, d))
    hbar.nll(score, schedule, x, order=1)  # compile
    t0 = time.perf_counter()
    r = hbar.nll(score, schedule, x, order=1)
    return (time.perf_counter() - t0) / n, r


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--ratio-only", action="store_true", help="section 1 only")
    args = ap.parse_args(argv)
    sched = hbar.SimpleSchedule()
    out = {"steps": STEPS}

    # 1. cost ratio and growth with d, widths 64 (depth 2) and 128 (depth 3, the authors')
    ds = [16, 64, 784, 3072]
    for width, depth in ((64, 2), (128, 3)):
        rows = []
        for d in ds:
            t_ol, t_hu = cost_ratio(_net(d, width, depth=depth), sched, d)
            rows.append((d, t_ol, t_hu))
            print(f"[1] width {width:3d} depth {depth} d={d:5d}: one-loop sample {t_ol * 1e3:8.2f} ms/point, "
                  f"order-0 Hutchinson {t_hu * 1e3:7.2f} ms/point, ratio {t_ol / t_hu:5.2f} (target <= 10)",
                  flush=True)
        slope = float(np.polyfit(np.log(ds), np.log([r[1] for r in rows]), 1)[0])
        out[f"width{width}"] = {"d": ds, "depth": depth, "one_loop_s": [r[1] for r in rows],
                                "hutchinson_s": [r[2] for r in rows], "ratio": [r[1] / r[2] for r in rows],
                                "exponent": slope}
        print(f"[1] width {width}: one-loop cost ~ d^{slope:.2f} at fixed width (target <= 1.2); "
              f"max ratio {max(r[1] / r[2] for r in rows):.2f}", flush=True)
    if args.ratio_only:
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1, default=float)
        return

    dex = [2, 4, 8, 16, 32, 64]
    ex = []
    for d in dex:
        net = _net(d, 64)
        te, _ = exact_time(net, sched, d)
        t_ol, _ = one_loop_time(net, sched, d, rows=64)
        ex.append((d, te, 16 * t_ol))
        print(f"[2] d={d:3d}: exact characteristics {te * 1e3:9.2f} ms/point, one-loop x16 probes "
              f"{16 * t_ol * 1e3:8.2f} ms/point")
    ex_slope = float(np.polyfit(np.log(dex[2:]), np.log([e[1] for e in ex[2:]]), 1)[0])
    switch = next((d for d, te, to in ex if to < te), None)
    out["exact"] = {"d": dex, "exact_s": [e[1] for e in ex], "one_loop16_s": [e[2] for e in ex],
                    "exponent_d8_64": ex_slope, "first_d_one_loop_cheaper": switch}
    print(f"[2] exact cost ~ d^{ex_slope:.2f} (d = 8..64); one-loop (16 probes) cheaper from d = {switch}")

    # 3. probes for 1 % s.e. on the trained digits model
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from _one_loop_models import trained_model

    score, schedule, x = trained_model(64)
    K = 64
    res = hbar.nll(score, schedule, x[:50], order=1, method="one-loop", key=jax.random.PRNGKey(3), probes=K)
    sd = res.c1_se * np.sqrt(K)
    need = (sd / (0.01 * np.abs(res.c1))) ** 2
    t_ol, _ = one_loop_time(score, schedule, 64, rows=64)
    med = float(np.median(need))
    out["digits"] = {"c1_mean": res.c1_mean, "sample_sd_median": float(np.median(sd)),
                     "probes_for_1pct_median": med, "probes_for_1pct_p90": float(np.percentile(need, 90)),
                     "seconds_per_sample": t_ol, "seconds_per_point_at_1pct": med * t_ol}
    print(f"[3] digits (d=64): C1 = {res.c1_mean[0]:.2f} +- {res.c1_mean[1]:.2f} over points; per-sample sd "
          f"(median) {np.median(sd):.2f}; probes for 1 % s.e. per point: median {med:.0f}, 90th pct "
          f"{np.percentile(need, 90):.0f}; {t_ol * 1e3:.2f} ms per sample -> {med * t_ol:.2f} s per point")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=float)


if __name__ == "__main__":
    main()
