"""hbar image benchmark (issue 10): U-Net training and sampling speed on this machine, and the
sampler's overhead over bare network evaluations. Ratios are measured side by side in one run,
after warm-up on the same shapes (compilation excluded); machines are shared and noisy, so the
absolute images/s are indicative, the ratios are what to compare.

The U-Net (``hbar.networks.network_from_config({"name": "unet", ...})``) and the training
settings are the image preset ``TrainConfig.images(dataset=...)`` (28x28 images);
``--quick`` swaps in a small U-Net (base 8 channels, mults (1, 2)) and small batches. Inputs
are random pixel levels (training: bin centres, dequantised per batch as the loop does) and
prior draws (sampling): timings do not depend on the pixel values, and no data set has to be
installed.

1. Training: one chunk of ``--train-steps`` optimiser steps of the training loop's runner for
   the network (``hbar.training.loop``: one jitted call per step for the U-Net, a lax.scan
   chunk for MLPs; DSM loss, Adam, EMA) on batches of ``--batch`` images -> training images/s
   and seconds per step, and the share of a step spent in the loss gradient alone
   (``jax.value_and_grad`` of ``hbar.training.dsm_loss`` on one batch). ``--compare-scan`` also
   times the same steps inside one lax.scan chunk (on XLA CPU many times slower for conv nets).
2. Sampling: ``hbar.sample`` (Euler, ``--steps`` fixed steps, noise ``--h``) of ``--n`` images ->
   sampling images/s; the sampler overhead = sampler time / time of the same number of bare
   jitted network evaluations of the same (n, d) batch run back to back (measured in
   interleaved rounds, minimum of each side). Target <= 1.2 (as in 2-D, benchmarks/run.py).

Usage: python3 benchmarks/images.py [--quick] [--dataset mnist5k] [--batch 64] [--n 64]
       [--steps 50] [--h 0.5] [--train-steps 2] [--compare-scan] [--x64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small U-Net and small batches (a smoke run)")
    p.add_argument("--dataset", default="mnist5k", help="image preset of TrainConfig.images (mnist5k, fashion_mnist)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default: the preset's, 16 with --quick)")
    p.add_argument("--n", type=int, default=None, help="images per sampling batch (default 64, 16 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 50, 10 with --quick)")
    p.add_argument("--h", type=float, default=0.5, help="noise strength of the sampler (0: probability-flow ODE)")
    p.add_argument("--train-steps", type=int, default=2, help="optimiser steps per timed training chunk")
    p.add_argument("--compare-scan", action="store_true", help="also time the same training steps inside one "
                   "lax.scan chunk (slow for conv nets on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (the minimum is reported)")
    p.add_argument("--x64", action="store_true", help="as the image study: JAX float64 on, sampler state in float64, "
                   "the float32 network evaluated through a float32 cast")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None

import jax  # noqa: E402

if ARGS is not None and ARGS.x64:
    jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from hbar.images.preprocess import to_model_space  # noqa: E402
from hbar.networks import network_from_config, param_count  # noqa: E402
from hbar.sampling import sample  # noqa: E402
from hbar.schedules import schedule_from_config  # noqa: E402
from hbar.training import TrainConfig, dsm_loss  # noqa: E402
from hbar.training.config import optimizer, training_levels  # noqa: E402
from hbar.training.loop import _STEPWISE_NETWORKS, _Hyper, _run_chunk, _run_chunk_stepwise  # noqa: E402  (the loop's own)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import best_of  # noqa: E402

_SIDE = {"mnist5k": 28, "fashion_mnist": 28}
QUICK_NET = {"name": "unet", "base_channels": 8, "channel_mults": [1, 2], "blocks": 1, "groups": 4, "embed_dim": 16}


def zero_output(net):
    """The U-Net with its last convolution zeroed (the usual DDPM initialisation): eps = 0, so the
    untrained score is 0 and sampled trajectories stay finite (an untrained random score blows
    up); the arithmetic is unchanged, the weights are traced arguments, never constants."""
    return eqx.tree_at(lambda m: (m.conv_out.weight, m.conv_out.bias), net, replace_fn=jnp.zeros_like)


def setup(args: argparse.Namespace) -> tuple[TrainConfig, int, dict]:
    """(training config, image side, resolved network config): the image preset of the data set
    (``--quick``: with a small U-Net and batch 16), with ``--batch`` if given."""
    side = _SIDE.get(args.dataset)
    if side is None:
        raise SystemExit(f"unknown --dataset {args.dataset!r}; use one of {sorted(_SIDE)}")
    if args.quick:
        cfg = TrainConfig.images(dataset=args.dataset, network=dict(QUICK_NET), batch_size=16)
    else:
        cfg = TrainConfig.images(dataset=args.dataset)
    if args.batch is not None:
        cfg = cfg.replace(batch_size=args.batch)
    net_cfg = {**cfg.network, "d": side * side, "schedule": cfg.schedule}
    return cfg, side, net_cfg


def bench_training(cfg: TrainConfig, net, schedule, d: int, S: int, repeats: int, compare_scan: bool) -> dict:
    """Training images/s from one chunk of S steps of the training loop's runner for this network
    (hbar.training.loop: one jitted call per step for the U-Net, a lax.scan chunk for MLPs)."""
    B = cfg.batch_size
    params, static = eqx.partition(net, eqx.is_inexact_array)
    opt_state = optimizer(cfg.lr, cfg.grad_clip).init(params)
    levels = training_levels(cfg)
    rng = np.random.default_rng(1)
    if levels is not None:  # image data as the loop holds them: bin centres, dequantised per batch
        data = jnp.asarray(to_model_space(rng.integers(0, levels, (S * B, d)), levels), jnp.float32)
    else:
        data = jnp.asarray(rng.uniform(-1.0, 1.0, (S * B, d)), jnp.float32)
    hp = _Hyper(cfg.lr, cfg.grad_clip, cfg.ema_decay, cfg.weighting, cfg.normalize_by_dim, B, S, levels)
    key = jax.random.PRNGKey(2)
    state = (params, params, opt_state)
    stepwise = cfg.network["name"] in _STEPWISE_NETWORKS
    runner = _run_chunk_stepwise if stepwise else _run_chunk

    def chunk(run):
        out, losses = run(state, data, key, 0, static=static, schedule=schedule, hp=hp, n_epochs=1)
        jax.block_until_ready((out, losses))

    t_step = best_of(lambda: chunk(runner), repeats) / S

    @jax.jit
    def grad_only(p, x0, k):
        return jax.value_and_grad(lambda q: dsm_loss(eqx.combine(q, static), schedule, x0, k, hp.weighting,
                                                     hp.normalize_by_dim))(p)

    t_grad = best_of(lambda: jax.block_until_ready(grad_only(params, data[:B], key)), repeats)
    out = {"batch": B, "steps_per_chunk": S, "runner": "stepwise" if stepwise else "scan", "levels": levels,
           "t_step_s": t_step, "images_per_s": B / t_step, "t_grad_s": t_grad, "grad_share": t_grad / t_step}
    if compare_scan and stepwise:  # the lax.scan chunk the loop uses for MLPs, on the same steps
        out["t_scan_step_s"] = best_of(lambda: chunk(_run_chunk), 1) / S
        out["scan_over_stepwise"] = out["t_scan_step_s"] / t_step
    return out


def bench_sampling(net, schedule, d: int, n: int, steps: int, h: float, x64: bool, repeats: int) -> dict:
    """Sampling images/s and the sampler overhead over bare network evaluations."""
    score = net
    if x64:
        from hbar.studies.paper2024.experiments import Float32Score  # the image study's float32 evaluation

        score = Float32Score(net)
    dtype = jnp.result_type(float)
    x = schedule.prior_sample(jax.random.PRNGKey(0), n, d, dtype=dtype)
    bare = eqx.filter_jit(lambda s, z, t: s(z, t))  # weights as arguments, as the sampler passes them
    t_half = jnp.asarray(0.5, dtype)
    key = jax.random.PRNGKey(3)
    # score = 0 (zeroed output layer): the backward drift f = -beta x / 2 grows x by about
    # exp(int beta / 2) ~ 150 over [t_min, T] for the vp-linear schedule, beyond the default
    # bound, so the bound is switched off; arithmetic is the same as for a trained network.
    run = lambda: sample(score, schedule, key, n, h, steps=steps, d=d, bound=math.inf)  # noqa: E731
    res = run()  # warm-up (compiles)
    bare(score, x, t_half).block_until_ready()

    def network_block():  # nfe bare evaluations back to back: the sampler's network work
        for _ in range(res.nfe):
            out = bare(score, x, t_half)
        out.block_until_ready()

    # interleaved rounds, so both sides see the same load of a shared machine
    t_s, t_n = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run().samples)
        t_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        network_block()
        t_n.append(time.perf_counter() - t0)
    t_sample, t_block = min(t_s), min(t_n)
    return {"n": n, "steps": steps, "h": h, "nfe": res.nfe, "n_failed": res.n_failed, "dtype": str(jnp.dtype(dtype)),
            "t_network_s": t_block / res.nfe, "t_sample_s": t_sample, "images_per_s": n / t_sample,
            "overhead": t_sample / t_block, "overhead_rounds": [a / b for a, b in zip(t_s, t_n)]}


def main(args: argparse.Namespace) -> dict:
    cfg, side, net_cfg = setup(args)
    d = side * side
    schedule = schedule_from_config(cfg.schedule)
    net = zero_output(network_from_config(net_cfg, jax.random.PRNGKey(0)))
    n = args.n or (16 if args.quick else 64)
    steps = args.steps or (10 if args.quick else 50)
    print(f"hbar image benchmark: {side}x{side} images (d={d}), U-Net {param_count(net):,} parameters "
          f"{ {k: v for k, v in net_cfg.items() if k not in ('d', 'schedule')} }, schedule {cfg.schedule}, "
          f"JAX {jax.__version__} on {platform.machine()} ({os.cpu_count()} CPUs), x64={bool(jax.config.jax_enable_x64)}")
    try:
        print(f"load average: {os.getloadavg()[0]:.2f} (other jobs on this machine slow every figure below)")
    except OSError:
        pass
    tr = bench_training(cfg, net, schedule, d, args.train_steps, args.repeats, args.compare_scan)
    print(f"training: batch {tr['batch']}: {tr['t_step_s'] * 1e3:.1f} ms per optimiser step of the training loop "
          f"({tr['runner']} runner; DSM loss + Adam + EMA{', dequantised batches' if tr['levels'] else ''}) "
          f"= {tr['images_per_s']:.1f} images/s; loss gradient alone {tr['t_grad_s'] * 1e3:.1f} ms "
          f"= {100 * tr['grad_share']:.0f} % of a step")
    if "t_scan_step_s" in tr:
        print(f"training: the same steps in one lax.scan chunk: {tr['t_scan_step_s'] * 1e3:.1f} ms per step "
              f"= {tr['scan_over_stepwise']:.1f} x the stepwise runner")
    sp = bench_sampling(net, schedule, d, n, steps, args.h, bool(jax.config.jax_enable_x64), args.repeats)
    print(f"sampling: n = {sp['n']}, Euler {sp['steps']} steps, h = {sp['h']} ({sp['dtype']} state): "
          f"{sp['t_sample_s']:.3f} s = {sp['images_per_s']:.1f} images/s; bare network {sp['t_network_s'] * 1e3:.2f} ms "
          f"per evaluation of the batch, {sp['nfe']} evaluations")
    verdict = "meets" if sp["overhead"] <= 1.2 else "misses"
    print(f"sampler overhead: {sp['overhead']:.3f} x bare network evaluations (target <= 1.2: {verdict}); "
          f"share of sampling time in the network {100 / sp['overhead']:.0f} %; per interleaved round: "
          f"{', '.join(f'{r:.2f}' for r in sp['overhead_rounds'])}")
    out = {"config": {"side": side, "d": d, "network": {k: v for k, v in net_cfg.items() if k != "schedule"},
                      "schedule": cfg.schedule, "params": param_count(net), "quick": args.quick,
                      "x64": bool(jax.config.jax_enable_x64)},
           "training": tr, "sampling": sp,
           "machine": {"cpus": os.cpu_count(), "jax": jax.__version__, "python": sys.version.split()[0]}}
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=2, sort_keys=True)
    return out


if __name__ == "__main__":
    main(ARGS)
