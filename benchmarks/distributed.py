"""Benchmark of the data-parallel path (hbar.distributed, docs/theory.md section 15). One run;
the machine is shared, so the figures are ratios of times taken side by side.

1. Overhead on one device: ``hbar.likelihood.run_batched`` through the sharded path (rows put on
   a one-device mesh with ``shard_rows``, the score replicated, outputs gathered) against the
   plain path, on the same shapes after a warm-up (compilation excluded), the two interleaved,
   best of REPS process-CPU times and wall times; target <= 1.1x.
2. Scaling: points/s of ``hbar.nll`` with 1 process and with 2 local processes joined by
   ``jax.distributed.initialize`` (coordinator on 127.0.0.1; one CPU device each, the default
   mesh = both), after a warm-up call on the same shapes; points/s = n / wall time of the slower
   process. On this 2-core machine the ideal is 2x; other engineers' jobs share the cores.

Workloads (CASES): "toy" = 2-D, paper_mlp 64 x 2, 256 points (latency-bound: the per-step
all-reduce of an adaptive solve dominates across processes); "heavy" = 16-D, 256 x 3, 512 points.

Usage: python3 benchmarks/distributed.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

SINGLE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
os.environ.setdefault("XLA_FLAGS", SINGLE_THREAD)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import equinox as eqx  # noqa: E402
import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402

REPS = 5


class Damped(eqx.Module):
    """An untrained paper_mlp score damped towards -x (finite trajectories, realistic cost)."""

    net: eqx.Module

    def __call__(self, x, t):
        return -x + 0.1 * self.net(x, t)


#: workloads: name -> (d, width, depth, points); "toy" is latency-bound (a few microseconds of work
#: per point and step), "heavy" (16-D, the paper's width 256 x 3 layers) compute-bound
CASES = {"toy": (2, 64, 2, 256), "heavy": (16, 256, 3, 512)}


def model(case: str):
    from hbar.networks import network_from_config
    from hbar.schedules import schedule_from_config

    d, width, depth, _ = CASES[case]
    return Damped(network_from_config({"name": "paper_mlp", "d": d, "width": width, "depth": depth}, 0)), \
        schedule_from_config("simple")


def points(case: str) -> np.ndarray:
    d, _, _, n = CASES[case]
    return np.random.default_rng(0).normal(size=(n, d))


def overhead(case: str, order: int) -> dict:
    """CPU and wall time of run_batched, sharded on a one-device mesh / plain."""
    import jax.numpy as jnp

    from hbar import distributed
    from hbar.likelihood import _batch_characteristics, run_batched
    from hbar.ode import ODEOptions
    from hbar.process import HProcess

    score, sched = model(case)
    proc = HProcess(sched, score)
    x = points(case)
    n = x.shape[0]
    mesh = distributed.make_mesh(1)
    kw = dict(order=order, options=ODEOptions(), bound=jnp.asarray(1e3))

    def run(m):
        with jax.enable_x64(True):
            return run_batched(_batch_characteristics, proc, [x], n, mesh=m, **kw)

    a, b = run(None), run(mesh)  # warm-up (compile) and check
    assert np.array_equal(a["ell0"], b["ell0"]), "the sharded path changed the result"
    best = {"plain": [np.inf, np.inf], "sharded": [np.inf, np.inf]}
    for _ in range(REPS):
        for name, m in (("plain", None), ("sharded", mesh)):
            c0, w0 = time.process_time(), time.perf_counter()
            run(m)
            c, w = time.process_time() - c0, time.perf_counter() - w0
            best[name] = [min(best[name][0], c), min(best[name][1], w)]
    return {"case": case, "order": order, "n": n, "plain_cpu_s": best["plain"][0], "sharded_cpu_s": best["sharded"][0],
            "ratio_cpu": best["sharded"][0] / best["plain"][0], "plain_wall_s": best["plain"][1],
            "sharded_wall_s": best["sharded"][1], "ratio_wall": best["sharded"][1] / best["plain"][1]}


def worker(pid: int, nprocs: int, port: int, case: str, order: int) -> None:
    """One process of the scaling run: prints its wall and CPU time of the timed nll call."""
    import hbar
    from hbar import distributed

    if nprocs > 1:
        distributed.initialize(f"127.0.0.1:{port}", nprocs, pid, initialization_timeout=120)
    score, sched = model(case)
    x = points(case)
    n = x.shape[0]
    hbar.nll(score, sched, x, order=order, batch_size=n)  # warm-up: compile on the same shapes
    t0, c0 = time.perf_counter(), time.process_time()
    res = hbar.nll(score, sched, x, order=order, batch_size=n)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print("RESULT " + json.dumps({"pid": pid, "wall": wall, "cpu": cpu, "devices": jax.device_count(),
                                  "nll0_mean": float(np.mean(res.nll0))}), flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scaling(case: str, order: int, nprocs: int, timeout: float = 900) -> dict:
    port = _free_port()
    env = dict(os.environ, XLA_FLAGS=SINGLE_THREAD, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(pid), str(nprocs), str(port), case,
                               str(order)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(nprocs)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(err[-2000:])
            results.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT ")][-1][7:]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    wall, n = max(r["wall"] for r in results), CASES[case][3]
    return {"case": case, "order": order, "n": n, "processes": nprocs, "wall_s": wall, "points_per_s": n / wall,
            "cpu_s_per_process": [r["cpu"] for r in results], "nll0_mean": results[0]["nll0_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=str, default=None)
    ap.add_argument("--worker", nargs=5, default=None, metavar=("PID", "NPROCS", "PORT", "CASE", "ORDER"))
    args = ap.parse_args()
    if args.worker:
        pid, nprocs, port, case, order = args.worker
        worker(int(pid), int(nprocs), int(port), case, int(order))
        return
    out: dict = {"load_average": os.getloadavg(), "cpu_count": os.cpu_count(), "overhead": [], "scaling": []}
    print(f"load average {out['load_average']} on {out['cpu_count']} cores (shared machine)")
    for case, order in (("toy", 0), ("toy", 1), ("heavy", 0)):
        r = overhead(case, order)
        out["overhead"].append(r)
        print(f"overhead, one device, {case} {CASES[case]}, order {order}: sharded / plain = {r['ratio_cpu']:.3f} (CPU), "
              f"{r['ratio_wall']:.3f} (wall); plain {r['plain_cpu_s']:.3f} s CPU")
    for case, order in (("toy", 0), ("toy", 1), ("heavy", 0)):
        rows = [scaling(case, order, k) for k in (1, 2)]
        out["scaling"] += rows
        assert abs(rows[0]["nll0_mean"] - rows[1]["nll0_mean"]) < 1e-9
        cpu = ", ".join(f"{c:.2f}" for c in rows[1]["cpu_s_per_process"])
        print(f"scaling, {case} {CASES[case]}, order {order}: 1 process {rows[0]['points_per_s']:.1f} points/s "
              f"(CPU {rows[0]['cpu_s_per_process'][0]:.2f} s), 2 processes {rows[1]['points_per_s']:.1f} points/s "
              f"(x{rows[1]['points_per_s'] / rows[0]['points_per_s']:.2f}; CPU {cpu} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
