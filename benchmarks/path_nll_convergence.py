"""Cost of a step-converged path-integral NLL(h) per point, and the grid speed-up.

    python benchmarks/path_nll_convergence.py [--tol 0.005] [--h 1.0] [--points 10]
        [--net-epochs 1200] [--max-paths 16384] [--fp-cells 400] [--grid-tol 0.01]
        [--skip-net] [--skip-gauss] [--skip-grids] [--skip-exact]

The figures of README "Finite h by brute force" and docs/theory.md sections 3.9-3.11 come from
``--skip-exact --skip-grids --skip-gauss --h 0.1 0.5 1.0`` (and ``--net-epochs 300 --h 1.0``),
``--skip-exact --skip-net --gauss-eps 0`` and ``--skip-net --skip-gauss`` (section 3).

Cases 1 and 2 are timed with :func:`hbar.path.converged_path_nll` (default controller settings
except ``max_paths`` = ``--max-paths``; tolerance ``--tol`` on both the Monte Carlo s.e. and the
discretisation error of the mean NLL of ``--points`` points; "cost per point" = wall time /
points at that tolerance on their mean):

1. **2-D trained network**: a swiss-roll model trained with ``hbar.training`` (TrainConfig.paper,
   ``--net-epochs`` epochs, cached in benchmarks/_runs/) on its held-out points; the controller
   ladder at ``--tol`` on the default ("log-snr") grid, then the grid comparison: every grid
   ("uniform", "log-snr", "edm") at ``--grid-tol``; speed-up = wall time of "uniform" / wall time of
   the grid, at equal accuracy (the same tolerance reached). If "uniform" does not converge
   within max_steps the speed-up is a lower bound (printed as ">="). Fokker-Planck on the same
   points at the same h for comparison (tol ``--tol``, up to ``--fp-cells`` cells per axis, with its
   own convergence flag). The default network is the demo's recipe (1200 epochs).
2. **64-D Gaussian** (tests/_cases.py::gaussian_case's data, SIMPLE schedule, affine score scaled by
   1 + eps and shifted by eps * N(0, I), ``--gauss-eps``, default 0 and 0.01): the same ladder, with
   the error against the closed form.
3. **Grids at equal accuracy, exactly** (``--skip-exact`` to leave out; seconds): for affine scores
   the discretised model's density is known in closed form
   (:func:`hbar.references.gaussian_chain_nll`), so the discretisation error of each grid at N
   steps is computed without Monte Carlo against :func:`hbar.references.gaussian_oracle`. Steps
   needed for |error of the mean NLL| <= tol (log-log interpolation on N = 25 * 2^k, up to 102400),
   per grid; speed-up = N(uniform) / N(grid) (same cost per step). Data N(0, diag(1, s^2)) with a
   thin direction s in {1, 0.1, 0.03, 0.01} (the width of a data manifold against sigma(t_min)),
   score 5 % off, SIMPLE and OU schedules, h in {0.1, 1}; and the 2-D / 64-D cases above.

Prints one line per run; the numbers quoted in docs/theory.md section 3.9 come from here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import hbar  # noqa: E402
from _cases import gaussian_case  # noqa: E402
from hbar.path import converged_path_nll, path_log_likelihood  # noqa: E402
from hbar.references import fokker_planck_nll, gaussian_oracle  # noqa: E402


def trained_swiss_roll(epochs: int, seed: int = 0):
    """(score, schedule, held-out points) of a swiss-roll / SIMPLE model trained for ``epochs``."""
    from hbar.training import TrainConfig, load_checkpoint, make_training_data, train

    cfg = TrainConfig.paper("swiss_roll", "simple", seed=seed, epochs=epochs, n_test=200,
                            checkpoint_every=max(1, epochs))
    rd = os.path.join(HERE, "_runs", f"swiss_roll-simple-{epochs}")
    t0 = time.perf_counter()
    train(cfg, rd, resume=True)
    score, sch, _ = load_checkpoint(rd)
    _, x_test = make_training_data(cfg)
    print(f"trained swiss roll / SIMPLE, {epochs} epochs ({time.perf_counter() - t0:.0f} s incl. cache)", flush=True)
    return score, sch, np.asarray(x_test, float)


def _line(tag: str, r, i: int, truth: float | None = None) -> str:
    err = "" if truth is None else f" err_vs_exact={r.nll[i] - truth:+.4f}"
    lad = " -> ".join(f"{lv['steps']}:{lv['nll']:.4f}/{lv['n_paths']}" for lv in r.ladder[i])
    return (f"{tag} h={r.hs[i]:g}: NLL={r.nll[i]:.4f}{err} mc={r.mc_se[i]:.1e} disc={r.disc_error[i]:.1e} "
            f"k-hat<={r.khat_max[i]:.2f} ESS/M>={r.ess_min[i]:.2f} conv={bool(r.converged[i])} steps={r.steps[i]} "
            f"paths={r.n_paths[i]} ladder [{lad}]" + "".join(f" FLAG {f}" for f in r.flags
                                                             if f.startswith(f"h={r.hs[i]:g}:")))


def run(score, sch, x, hs, tol, grid, truth=None, tag="", **kw):
    t0 = time.perf_counter()
    r = converged_path_nll(score, sch, x, hs, jax.random.PRNGKey(0), tol=tol, grid=grid, **kw,
                           progress=lambda h, lev, n: print(f"  {tag} {grid} h={h:g} level {lev} done at "
                                                            f"{time.perf_counter() - t0:.0f} s", flush=True))
    sec = time.perf_counter() - t0
    for i in range(len(hs)):
        print(_line(f"{tag} grid={grid:8s} tol={tol:g}", r, i, None if truth is None else truth[i]), flush=True)
    print(f"{tag} grid={grid:8s} tol={tol:g}: {sec:.1f} s total, {sec / len(x) / len(hs):.2f} s per point and h "
          f"({len(x)} points), all converged: {bool(r.converged.all())}", flush=True)
    return r, sec


def steps_needed(score, sch, x, h: float, grid: str, tol: float, max_steps: int, n_paths: int = 512):
    """The controller's discretisation criterion alone, at a fixed path count: the first
    N = 100 * 2^k whose coupled difference to N/2 steps (common Brownian paths, so its MC noise is
    small) satisfies |d| + 2 s.e. <= tol (order-1 tail |d|/(2-1)). Returns (N or None, d, seconds)."""
    t0 = time.perf_counter()
    key = jax.random.PRNGKey(1)
    N, d = 100, float("nan")
    while N <= max_steps:
        kw = dict(n_paths=n_paths, grid=grid, control_variate=True, keep_weights=True)
        f = path_log_likelihood(score, sch, x, h, key, steps=N, **kw)
        c = path_log_likelihood(score, sch, x, h, key, steps=N // 2, coupling_steps=N, **kw)
        dd = f.nll_corrected - c.nll_corrected
        d, s = float(dd.mean()), float(dd.std(ddof=1) / np.sqrt(len(dd)))
        print(f"  2-D net grid={grid} h={h:g} N={N}: d={d:+.4f} +- {s:.4f} ({time.perf_counter() - t0:.0f} s)",
              flush=True)
        if abs(d) + 2 * s <= tol:
            return N, d, time.perf_counter() - t0
        N *= 2
    return None, d, time.perf_counter() - t0


def steps_for(errs: dict[int, float], tol: float) -> float:
    """Smallest step count with |error| <= tol, log-log interpolated between the ladder's step
    counts (errors of order 1 fall smoothly); inf when the ladder never gets there."""
    ns = sorted(errs)
    for i, n in enumerate(ns):
        if errs[n] <= tol and all(errs[m] <= tol for m in ns[i:]):
            if i == 0:
                return float(n)
            n0, e0, e1 = ns[i - 1], errs[ns[i - 1]], errs[n]
            if e1 <= 0 or e0 <= 0:
                return float(n)
            return float(np.exp(np.log(n0) + (np.log(n) - np.log(n0)) * (np.log(e0 / tol)) / np.log(e0 / e1)))
    return float("inf")


def exact_grid_comparison(tols=(0.005, 0.001)) -> None:
    """Section 3 of the module docstring."""
    from hbar.references import gaussian_chain_nll

    ladder = [25 * 2**k for k in range(13)]
    grids = ("uniform", "log-snr", "edm")
    cases = []
    for sch_name, sch in (("SIMPLE", hbar.SimpleSchedule()), ("OU(beta=1, T=8)", hbar.OUSchedule(beta=1.0, t_min=1e-2,
                                                                                                   T=8.0))):
        for thin in (1.0, 0.1, 0.03, 0.01):
            S0 = np.diag([1.0, thin**2])
            m0 = np.zeros(2)
            score = hbar.gaussian_score(m0, S0, sch, scale_eps=0.05, shift=np.array([0.05, 0.0]))
            x = np.random.default_rng(1).multivariate_normal(m0, S0, size=20)
            cases.append((f"{sch_name} 2-D thin s={thin:g}", sch, score, m0, S0, x))
    sch = hbar.SimpleSchedule()
    for d in (2, 64):
        _, score, m0, S0, _ = gaussian_case(d, 0.1, seed=0, schedule=sch)
        x = np.random.default_rng(1).multivariate_normal(m0, S0, size=10)
        cases.append((f"SIMPLE {d}-D gaussian_case", sch, score, m0, S0, x))
    print("exact discretisation error of the mean NLL (gaussian_chain_nll - gaussian_oracle), steps needed and "
          "speed-up over uniform at equal accuracy", flush=True)
    for name, sch, score, m0, S0, x in cases:
        for h in (0.1, 1.0):
            t0 = time.perf_counter()
            truth = float(gaussian_oracle(score, sch, m0, S0, h, x=x).nll_points[0].mean())
            errs = {g: {n: abs(float(gaussian_chain_nll(score, sch, h, x, steps=n, grid=g).mean()) - truth)
                        for n in ladder} for g in grids}
            for tol in tols:
                need = {g: steps_for(errs[g], tol) for g in grids}
                sp = "  ".join(f"{g} {need['uniform'] / need[g]:.2f}x" for g in grids[1:])
                print(f"{name} h={h:g} tol={tol:g}: steps needed " + ", ".join(f"{g} {need[g]:.0f}" for g in grids)
                      + f"; speed-up over uniform: {sp}  (error at 100 steps: "
                      + ", ".join(f"{g} {errs[g][100]:.1e}" for g in grids) + f"; {time.perf_counter() - t0:.0f} s)",
                      flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tol", type=float, default=0.005)
    ap.add_argument("--grid-tol", type=float, default=0.01)
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--h", type=float, nargs="+", default=[1.0])
    ap.add_argument("--net-epochs", type=int, default=1200)
    ap.add_argument("--max-steps", type=int, default=1600)
    ap.add_argument("--skip-net", action="store_true")
    ap.add_argument("--skip-gauss", action="store_true")
    ap.add_argument("--skip-exact", action="store_true")
    ap.add_argument("--gauss-eps", type=float, nargs="+", default=[0.0, 0.01])
    ap.add_argument("--max-paths", type=int, default=16384)
    ap.add_argument("--fp-cells", type=int, default=400,
                    help="Fokker-Planck: at most this many cells per axis (400: about 8 min; 96 is quick but its "
                         "error estimate was 1.6x too small on the 1200-epoch network)")
    ap.add_argument("--skip-grids", action="store_true")
    ap.add_argument("--skip-main", action="store_true", help="2-D net: only the grid comparison")
    ap.add_argument("--grid-paths", type=int, default=512)
    ap.add_argument("--grid-steps-only", action="store_true",
                    help="grid comparison by the discretisation criterion alone at 128 paths (cheap)")
    a = ap.parse_args()
    if not a.skip_exact:
        exact_grid_comparison()
    if not a.skip_net:
        score, sch, xt = trained_swiss_roll(a.net_epochs)
        x = xt[: a.points]
    if not a.skip_net and not a.skip_main:
        t0 = time.perf_counter()
        fp = fokker_planck_nll(score, sch, x, a.h, tol=a.tol, box=4.5, max_cells=a.fp_cells**2, max_levels=4,
                               warn=False)
        print(f"2-D net FP ({time.perf_counter() - t0:.0f} s): " + "; ".join(
            f"h={h:g}: NLL={fp.nll[i]:.4f} err={fp.error[i]:.1e} conv={bool(fp.converged[i])}"
            for i, h in enumerate(fp.h)), flush=True)
        r, _ = run(score, sch, x, a.h, a.tol, "log-snr", tag="2-D net", max_steps=a.max_steps, max_paths=a.max_paths)
        for i, h in enumerate(a.h):
            comb = float(np.hypot(r.total_error[i], fp.error[i]))
            print(f"2-D net h={h:g}: path - FP = {r.nll[i] - fp.nll[i]:+.4f}, combined error {comb:.4f} "
                  f"(FP converged: {bool(fp.converged[i])}, path converged: {bool(r.converged[i])})", flush=True)
    if not a.skip_net and not a.skip_grids and a.grid_steps_only:
        need = {g: steps_needed(score, sch, x, a.h[0], g, a.grid_tol, a.max_steps, a.grid_paths)
                for g in ("uniform", "log-snr", "edm")}
        nu = need["uniform"][0]
        for g, (n, d, sec) in need.items():
            print(f"2-D net grid={g}: discretisation error <= {a.grid_tol:g} at N = {n} steps (last d {d:+.4f}), "
                  f"{sec:.0f} s", flush=True)
        for g in ("log-snr", "edm"):
            n = need[g][0]
            if n is None:
                print(f"2-D net speed-up {g} over uniform: n/a ({g} not within {a.max_steps} steps)")
            elif nu is None:
                print(f"2-D net speed-up {g} over uniform (steps at equal discretisation error): >= "
                      f"{2 * a.max_steps / n:.0f}x (uniform not within {a.max_steps} steps)")
            else:
                print(f"2-D net speed-up {g} over uniform (steps at equal discretisation error): {nu / n:.1f}x")
    elif not a.skip_net and not a.skip_grids:
        secs = {}
        for grid in ("uniform", "log-snr", "edm"):
            rg, sec = run(score, sch, x, a.h, a.grid_tol, grid, tag="2-D net", max_steps=a.max_steps)
            secs[grid] = (sec, bool(rg.converged.all()))
        tu, cu = secs["uniform"]
        for grid in ("log-snr", "edm"):
            tg, cg = secs[grid]
            rel = ">=" if (cg and not cu) else ("" if cg and cu else "n/a (grid not converged) ")
            print(f"2-D net speed-up {grid} over uniform at tol {a.grid_tol:g}: {rel}{tu / tg:.2f}x "
                  f"(uniform converged: {cu}, {grid} converged: {cg})", flush=True)
    if not a.skip_gauss:
        sch = hbar.SimpleSchedule()
        _, _, m0, S0, _ = gaussian_case(64, 0.1, seed=0, schedule=sch)
        x = np.random.default_rng(1).multivariate_normal(m0, S0, size=a.points)
        for eps in a.gauss_eps:
            shift = eps * np.random.default_rng(2).normal(size=64)
            score = hbar.gaussian_score(m0, S0, sch, scale_eps=eps, shift=shift)
            truth = np.array([gaussian_oracle(score, sch, m0, S0, h, x=x).nll_points.mean() for h in a.h])
            run(score, sch, x, a.h, a.tol, "log-snr", truth=truth, tag=f"64-D Gaussian eps={eps:g}",
                max_steps=a.max_steps, max_paths=a.max_paths)


if __name__ == "__main__":
    main()
