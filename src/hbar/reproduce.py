"""Reproduction of the paper's experiments (Hirono, Tanaka & Fukushima 2024, sections 5.1-5.2).

Entry points:

* :func:`run_reproduce` -- the 1-D Gaussian study (closed form vs WKB vs samplers vs
  Fokker-Planck) and the 2-D study (swiss roll and 25 Gaussians, SIMPLE and COSINE:
  Table 1 with C2, Fokker-Planck NLL(h), excess NLL over the data entropy, W2(h),
  minimisers, the paper's finite-difference C1 against the exact one).
* :func:`run_demo` -- a few-minute version (swiss roll, SIMPLE) for the README.

Sizes live in :class:`ReproduceConfig` (``.full()`` = the paper's setting where it is
affordable, ``.quick()``, ``.tiny()`` for tests, ``.demo()``).

Caching and resume. Work is split into *stages*. Each finished stage writes
``out_dir/stages/<stage>.json`` (its numbers, wall time and a timestamp) and, where needed,
``<stage>.npz`` (per-point arrays and samples). A later call with the same ``out_dir`` loads
finished stages instead of recomputing them (reported as ``cached`` in ``results.json``), so
an interrupted run resumes where it stopped. Trained models live in
``out_dir/models/<data>-<schedule>/`` and use :func:`hbar.training.train` with ``resume=True``.
``out_dir/config.json`` pins the configuration: a call with a different configuration on the
same directory is refused. After every stage the results folder is refreshed: figures (PNG),
``results.json``, CSV tables and ``report.md`` (so a partial run still has a partial report).

Conventions: NLL in nats, means with standard errors over points (``se``); the sampler is
Euler-Maruyama with the noise amplitude sqrt(h) g (theory.md section 2); W2 is reported both
as the distance W2 and as W2 squared (the paper's code reports W2 squared). Learned networks
are evaluated in float64 for likelihoods and WKB coefficients, and in their own float32 for
sampling (as the paper; about 4x faster on CPU, samples agree to ~1e-7).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from hbar.data import dataset_entropy, load_dataset  # noqa: E402
from hbar.data import gaussian as gaussian_data
from hbar.likelihood import nll as hbar_nll  # noqa: E402
from hbar.metrics import w2_empirical  # noqa: E402
from hbar.ode import ODEOptions  # noqa: E402
from hbar.path import path_nll  # noqa: E402
from hbar.references import fokker_planck_nll, gaussian_oracle  # noqa: E402
from hbar.sampling import sample  # noqa: E402
from hbar.schedules import OUSchedule  # noqa: E402
from hbar.scores import gaussian_score  # noqa: E402
from hbar.serialization import atomic_write, to_jsonable
from hbar.training import TrainConfig, make_training_data, train  # noqa: E402
from hbar.validation import HbarInputError  # noqa: E402

__all__ = ["ReproduceConfig", "run_reproduce", "run_demo", "model_name", "model_train_config",
           "load_stage", "Float32Score", "ScaledScore"]

Progress = Callable[[str, int, int], Any] | None


# ======================================================================================
# configuration
# ======================================================================================

@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """Every size of the reproduction. Tuples are h grids, tolerances or names.

    1-D Gaussian study (paper section 5.1): data N(0, g1_v0), OU schedule with constant
    ``g1_beta`` on [g1_t_min, g1_T], score s = -(1 + eps) x / v_t for eps in ``g1_eps``.
    2-D study (section 5.2): ``datasets`` x ``schedules`` trained with TrainConfig.paper and
    ``epochs`` epochs (paper: 16000), evaluated on ``n_test`` held-out points.
    """

    name: str = "full"
    # ---- 1-D Gaussian study
    run_gauss1d: bool = True
    g1_v0: float = 4.0
    g1_beta: float = 1.0
    g1_t_min: float = 1e-3
    g1_T: float = 3.0
    g1_eps: tuple[float, ...] = (-0.2, -0.1, 0.1, 0.2)
    g1_h_grid: int = 41                      # closed-form curve points on [0, 1]
    g1_n_points: int = 1000                  # data points for WKB, Fokker-Planck, path MC
    g1_h_samples: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    g1_n_samples: int = 3000                 # sampler output and fresh data for W2
    g1_trials: int = 3
    g1_steps: int = 1000
    g1_path_h: tuple[float, ...] = (0.25, 0.5, 1.0)
    g1_path_paths: int = 256
    g1_path_steps: int = 200
    g1_fp_h: tuple[float, ...] = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0)
    g1_fp_tol: float = 1e-4
    # ---- 2-D study
    datasets: tuple[str, ...] = ("swiss_roll", "25gaussians")
    schedules: tuple[str, ...] = ("simple", "cosine")
    epochs: int = 16000
    n_test: int = 1000
    nll_tol: float = 1e-5                    # rtol = atol of the exact likelihood / WKB solves
    nll_tol_paper: float = 1e-3              # second NLL0 evaluation at the paper's outer tolerance
    bound: float = 5.0                       # the paper's [-5, 5]^2 exclusion
    n_c2: int = 100                          # points for the order-2 coefficient (costly)
    n_fd: int = 16                           # points for the paper's finite-difference C1
    fd_tols: tuple[tuple[float, float], ...] = ((1e-3, 1e-5), (1e-3, 1e-3))   # (outer, inner)
    fp_h: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    fp_points: int = 1000
    fp_tol: float = 1e-2
    fp_box: float = 4.5                      # half-width of the FP box (prior mass outside ~1e-5)
    fp_max_cells: int = 160 * 160
    fp_max_levels: int = 3
    fp_fine_models: tuple[str, ...] = ("swiss_roll-simple", "swiss_roll-cosine")   # second, finer FP stage
    fp_fine_grid: int = 80                   # coarsest cells per axis of the fine stage (then x2, x4)
    fp_fine_levels: int = 3
    w2_h_small: tuple[float, ...] = tuple(float(v) for v in np.round(np.linspace(0.0, 0.2, 10), 6))
    w2_trials: int = 2
    w2_h_wide: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
    w2_trials_wide: int = 1
    w2_n: int = 3000
    w2_steps: int = 1000
    sample_plot_h: tuple[float, ...] = (0.0, 0.1, 0.2, 0.5, 1.0)
    demo: bool = False

    # ---- constructors ------------------------------------------------------------------
    @classmethod
    def full(cls, **kw: Any) -> ReproduceConfig:
        """The paper's setting: 16000 epochs, 1000 test points, bound 5, 1000 Euler steps,
        3000 samples vs 3000 data points, 10 h values on [0, 0.2]. Deviation (cost on 2 CPU
        cores): 2 W2 trials per h instead of the paper's 10; C2 on 100 points; the paper's
        finite-difference C1 on 16 points; Fokker-Planck grids up to 160^2 cells."""
        return cls(**kw)

    @classmethod
    def quick(cls, **kw: Any) -> ReproduceConfig:
        """Same pipeline, far smaller: 1500 epochs, 300 test points, 1 W2 trial of 1000 samples."""
        base = dict(
            name="quick", g1_n_points=300, g1_n_samples=1000, g1_trials=2, g1_steps=500, g1_path_paths=128,
            g1_path_steps=100, g1_fp_tol=1e-3, epochs=1500, n_test=300, n_c2=20, n_fd=5,
            fd_tols=((1e-3, 1e-5),), fp_h=(0.1, 0.2, 0.5, 1.0), fp_points=300, fp_max_cells=64 * 64,
            fp_max_levels=3, fp_fine_models=(), w2_h_small=(0.0, 0.05, 0.1, 0.15, 0.2), w2_trials=1,
            w2_h_wide=(0.0, 0.5, 1.0),
            w2_n=1000, w2_steps=500,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def tiny(cls, **kw: Any) -> ReproduceConfig:
        """For tests (seconds): one model, a few epochs, tiny sizes, no 2-D C2 stage (the demo
        covers it; the 1-D study has order 2). Numbers are meaningless."""
        base = dict(
            name="tiny", g1_eps=(-0.2, 0.2), g1_h_grid=5, g1_n_points=40, g1_h_samples=(0.0, 1.0), g1_n_samples=200,
            g1_trials=1, g1_steps=50, g1_path_h=(1.0,), g1_path_paths=16, g1_path_steps=20, g1_fp_h=(0.5, 1.0),
            g1_fp_tol=1e-2, datasets=("swiss_roll",), schedules=("simple",), epochs=5, n_test=24, nll_tol=1e-3,
            bound=1000.0,
            n_c2=0, n_fd=2, fd_tols=((1e-2, 1e-3),), fp_h=(0.5, 1.0), fp_points=24, fp_tol=1e-1,
            fp_max_cells=48 * 48, fp_max_levels=2, fp_fine_models=("swiss_roll-simple",), fp_fine_grid=16,
            fp_fine_levels=2, w2_h_small=(0.0, 0.2), w2_trials=1, w2_h_wide=(0.0, 1.0),
            w2_n=100, w2_steps=20, sample_plot_h=(0.0, 1.0),
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def demo_config(cls, quick: bool = False, **kw: Any) -> ReproduceConfig:
        """The README demo: swiss roll, SIMPLE, a short training run, no 1-D study."""
        base = dict(
            name="demo-quick" if quick else "demo", demo=True, run_gauss1d=False, datasets=("swiss_roll",),
            schedules=("simple",), epochs=400 if quick else 1200, n_test=200 if quick else 300,
            n_c2=10 if quick else 30, n_fd=0, fd_tols=(), fp_h=(0.1, 0.2, 0.5, 1.0), fp_points=200 if quick else 300,
            fp_tol=2e-2, fp_max_cells=48 * 48 if quick else 64 * 64, fp_max_levels=2 if quick else 3, fp_fine_models=(),
            w2_h_small=(0.0, 0.05, 0.1, 0.2), w2_trials=1, w2_h_wide=(0.0, 0.5, 1.0), w2_trials_wide=1,
            w2_n=500 if quick else 1000, w2_steps=300 if quick else 500, sample_plot_h=(0.0, 0.1, 0.5, 1.0),
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def demo_tiny(cls, **kw: Any) -> ReproduceConfig:
        """The demo pipeline at test sizes (seconds); tolerances as :meth:`tiny` so that a test
        process running both reuses the compiled solvers."""
        base = dict(name="demo-tiny", epochs=5, n_test=16, nll_tol=1e-3, bound=1000.0, n_c2=2, fp_h=(0.5, 1.0), fp_points=16,
                    fp_tol=1e-1, fp_max_cells=48 * 48, fp_max_levels=2, w2_h_small=(0.0, 0.2), w2_h_wide=(0.0, 1.0),
                    w2_n=100, w2_steps=20, sample_plot_h=(0.0, 1.0))
        base.update(kw)
        return cls.demo_config(quick=True, **base)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))


def model_name(dataset: str, schedule: str) -> str:
    return f"{dataset}-{schedule}"


def model_train_config(cfg: ReproduceConfig, dataset: str, schedule: str, seed: int) -> TrainConfig:
    """The TrainConfig of one model: the paper's (TrainConfig.paper) with ``epochs`` and
    ``n_test`` from the reproduction config (identical to the paper's in ``.full()``)."""
    return TrainConfig.paper(dataset, schedule, seed=seed, epochs=cfg.epochs, n_test=cfg.n_test,
                             checkpoint_every=max(1, min(1000, cfg.epochs)))


class ScaledScore(eqx.Module):
    """(1 + eps) base(x, t) with eps a traced array, so one compilation serves every eps
    (``AffineScore.scale_eps`` is a static Python float). Same function as
    ``gaussian_score(mean, cov, schedule, scale_eps=eps)``."""

    base: Any
    factor: Any

    def __call__(self, x, t):
        return self.factor * self.base(x, t)

    @property
    def dim(self) -> int:
        return self.base.dim


class Float32Score(eqx.Module):
    """Evaluate a float32 network in float32 and return the input dtype (sampling only)."""

    net: Any

    def __call__(self, x, t):
        return self.net(x.astype(jnp.float32), jnp.asarray(t, jnp.float32)).astype(x.dtype)


# ======================================================================================
# stage cache
# ======================================================================================

def _write_json(path: str, obj: Any) -> None:
    atomic_write(path, (json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n").encode())


def _stage_file(out_dir: str, stage: str, ext: str) -> str:
    return os.path.join(out_dir, "stages", stage.replace("/", "__") + ext)


def load_stage(out_dir: str | os.PathLike, stage: str) -> tuple[dict | None, dict[str, np.ndarray] | None]:
    """(json dict or None, npz arrays or None) of a finished stage."""
    out_dir = os.fspath(out_dir)
    pj, pz = _stage_file(out_dir, stage, ".json"), _stage_file(out_dir, stage, ".npz")
    js = None
    if os.path.exists(pj):
        with open(pj) as fh:
            js = json.load(fh)
    arr = None
    if os.path.exists(pz):
        with np.load(pz) as z:
            arr = {k: z[k] for k in z.files}
    return js, arr


class _Stages:
    """Run-once stages: ``run(name, fn)`` returns the cached (json, arrays) or computes
    ``fn() -> (json dict, arrays dict | None)`` and stores it with its wall time."""

    def __init__(self, out_dir: str, progress: Progress, on_done: Callable[[], None] | None = None):
        self.out_dir = out_dir
        self.progress = progress
        self.on_done = on_done
        self.log: dict[str, dict[str, Any]] = {}

    def report(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, int(done), int(total))

    def run(self, stage: str, fn: Callable[[], tuple[dict, dict | None]]) -> tuple[dict, dict | None]:
        js, arr = load_stage(self.out_dir, stage)
        if js is not None and js.get("_complete"):
            self.log[stage] = {"seconds": js.get("seconds"), "cached": True, "finished_at": js.get("finished_at")}
            self.report(stage, 1, 1)
            return js, arr
        self.report(stage, 0, 1)
        t0 = time.perf_counter()
        js, arr = fn()
        js = dict(js)
        js["seconds"] = time.perf_counter() - t0
        js["finished_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        js["_complete"] = True
        if arr:
            buf = _stage_file(self.out_dir, stage, ".npz")
            os.makedirs(os.path.dirname(buf), exist_ok=True)
            tmp = buf + ".tmp.npz"
            np.savez_compressed(tmp, **{k: np.asarray(v) for k, v in arr.items()})
            os.replace(tmp, buf)
        # the JSON marks completion, so it is written last
        _write_json(_stage_file(self.out_dir, stage, ".json"), js)
        js = json.loads(json.dumps(to_jsonable(js)))
        self.log[stage] = {"seconds": js["seconds"], "cached": False, "finished_at": js["finished_at"]}
        self.report(stage, 1, 1)
        if self.on_done is not None:
            self.on_done()
        return js, arr


def _sub(stages: _Stages, stage: str) -> Callable[[int, int], None]:
    return lambda done, total: stages.report(stage, done, total)


def _mean_se(a: Any) -> tuple[float, float]:
    a = np.asarray(a, float)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return math.nan, math.nan
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan


def _stats(a: Any) -> dict[str, float]:
    a = np.asarray(a, float)
    m, se = _mean_se(a)
    f = a[np.isfinite(a)]
    return {"mean": m, "se": se, "sd": float(f.std(ddof=1)) if f.size > 1 else math.nan, "n": int(f.size)}


# ======================================================================================
# 1-D Gaussian study (paper section 5.1)
# ======================================================================================

def _gauss1d_case(cfg: ReproduceConfig, eps: float, seed: int, stages: _Stages, stage: str) -> tuple[dict, dict]:
    sch = OUSchedule(beta=cfg.g1_beta, t_min=cfg.g1_t_min, T=cfg.g1_T)
    v0 = cfg.g1_v0
    m0, S0 = np.zeros(1), np.array([[v0]])
    score_affine = gaussian_score(m0, S0, sch, scale_eps=eps)
    score = ScaledScore(gaussian_score(m0, S0, sch), jnp.asarray(1.0 + eps))
    ieps = int(round(1000 * eps)) % 100000
    x = gaussian_data(seed * 7919 + 11 + ieps, cfg.g1_n_points, mean=[0.0], cov=[[v0]])
    h_grid = np.linspace(0.0, 1.0, cfg.g1_h_grid)
    h_all = np.unique(np.concatenate([h_grid, cfg.g1_h_samples, cfg.g1_fp_h, cfg.g1_path_h]))
    orc = gaussian_oracle(score_affine, sch, m0, S0, h_all, x=x)
    idx = {float(h): i for i, h in enumerate(h_all)}
    gi = [idx[float(h)] for h in h_grid]
    out: dict[str, Any] = {"eps": eps, "h_grid": h_grid, "nll_oracle_expect": orc.nll[gi],
                           "nll_oracle": orc.nll_points[gi].mean(axis=1), "w2_oracle": orc.w2[gi],
                           "oracle_c1": float(orc.c1[idx[0.0]]), "oracle_c2": float(orc.c2[idx[0.0]]),
                           "oracle_c1_points": float(orc.c1_points[idx[0.0]].mean()),
                           "oracle_c2_points": float(orc.c2_points[idx[0.0]].mean()),
                           "oracle_nll0": float(orc.nll[idx[0.0]]),
                           "oracle_nll0_points": float(orc.nll_points[idx[0.0]].mean()),
                           "oracle_var": orc.cov[gi, 0, 0]}
    # WKB to second order on the data points
    stages.report(stage, 0, 4)
    opts = ODEOptions(rtol=1e-8, atol=1e-8)
    r = hbar_nll(score, sch, x, order=2, options=opts)
    out["wkb"] = {"nll0": r.nll0_mean, "c1": r.c1_mean, "c2": r.c2_mean, "n_failed": r.n_failed,
                  "max_abs_diff_vs_oracle": {
                      "nll0": float(np.max(np.abs(r.nll0 - orc.nll_points[idx[0.0]]))),
                      "c1": float(np.max(np.abs(r.c1 - orc.c1_points[idx[0.0]]))),
                      "c2": float(np.max(np.abs(r.c2 - orc.c2_points[idx[0.0]])))}}
    # samplers: W2 and Gaussian-fit NLL on the same points
    stages.report(stage, 1, 4)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 + ieps)
    w2s, w2sq, fit, var, floor = [], [], [], [], []
    for ih, h in enumerate(cfg.g1_h_samples):
        row_w, row_w2, row_f, row_v = [], [], [], []
        for k in range(cfg.g1_trials):
            kk = jax.random.fold_in(key, 100 * ih + k)
            sr = sample(score, sch, kk, cfg.g1_n_samples, float(h), steps=cfg.g1_steps, d=1)
            s = sr.valid_samples
            y = gaussian_data(seed * 104729 + 31 * ih + k + 5 + ieps, cfg.g1_n_samples, mean=[0.0], cov=[[v0]])
            d2 = w2_empirical(s, y, squared=True)
            row_w2.append(d2)
            row_w.append(math.sqrt(max(d2, 0.0)))
            mu, c = float(s.mean()), float(s.var(ddof=1))
            row_f.append(float(np.mean(0.5 * np.log(2 * np.pi * c) + (x[:, 0] - mu) ** 2 / (2 * c))))
            row_v.append(c)
        w2s.append(row_w)
        w2sq.append(row_w2)
        fit.append(row_f)
        var.append(row_v)
    for k in range(cfg.g1_trials):
        ya = gaussian_data(seed * 15485863 + 2 * k + 1, cfg.g1_n_samples, mean=[0.0], cov=[[v0]])
        yb = gaussian_data(seed * 15485863 + 2 * k + 2, cfg.g1_n_samples, mean=[0.0], cov=[[v0]])
        floor.append(w2_empirical(ya, yb))
    hs = np.asarray(cfg.g1_h_samples, float)
    out["samples"] = {
        "h": hs, "n": cfg.g1_n_samples, "trials": cfg.g1_trials, "steps": cfg.g1_steps,
        "w2": [_mean_se(r) for r in w2s], "w2_sq": [_mean_se(r) for r in w2sq],
        "nll_gauss_fit": [_mean_se(r) for r in fit], "var": [_mean_se(r) for r in var],
        "oracle_w2": orc.w2[[idx[float(h)] for h in hs]], "oracle_var": orc.cov[[idx[float(h)] for h in hs], 0, 0],
        "oracle_nll": orc.nll_points[[idx[float(h)] for h in hs]].mean(axis=1),
        "w2_floor": _mean_se(floor),
    }
    # path-integral Monte Carlo likelihood
    stages.report(stage, 2, 4)
    pr = path_nll(score, sch, x, list(cfg.g1_path_h), jax.random.fold_in(key, 7), n_paths=cfg.g1_path_paths,
                  steps=cfg.g1_path_steps)
    out["path"] = {"h": pr.hs, "nll": pr.nll, "se": pr.se, "mc_se": pr.mc_se, "bias": pr.bias,
                   "ess_median": pr.ess_median, "n_paths": pr.n_paths, "steps": pr.steps,
                   "oracle_nll": orc.nll_points[[idx[float(h)] for h in pr.hs]].mean(axis=1)}
    # 1-D Fokker-Planck brute force
    stages.report(stage, 3, 4)
    fp = fokker_planck_nll(score, sch, x, list(cfg.g1_fp_h), tol=cfg.g1_fp_tol, warn=False)
    out["fp"] = {"h": fp.h, "nll": fp.nll, "error": fp.error, "stderr": fp.stderr, "converged": fp.converged,
                 "cells": fp.cells, "flags": list(fp.flags),
                 "oracle_nll": orc.nll_points[[idx[float(h)] for h in fp.h]].mean(axis=1)}
    stages.report(stage, 4, 4)
    return out, {"x": x}


def _stage_gauss1d(cfg: ReproduceConfig, seed: int, stages: _Stages) -> tuple[dict, dict]:
    cases, arrays = [], {}
    for eps in cfg.g1_eps:
        c, a = _gauss1d_case(cfg, float(eps), seed, stages, "gauss1d")
        cases.append(c)
        arrays[f"x_eps{eps:+g}"] = a["x"]
    falls = [c["eps"] for c in cases if c["nll_oracle_expect"][-1] < c["nll_oracle_expect"][0]]
    rises = [c["eps"] for c in cases if c["nll_oracle_expect"][-1] > c["nll_oracle_expect"][0]]
    js = {"setting": {"v0": cfg.g1_v0, "schedule": OUSchedule(beta=cfg.g1_beta, t_min=cfg.g1_t_min,
                                                              T=cfg.g1_T).to_config(),
                      "score": "s = -(1 + eps) x / v_t, v_t = alpha^2 v0 + sigma^2"},
          "cases": cases, "nll_falls_with_h": falls, "nll_rises_with_h": rises}
    return js, arrays


# ======================================================================================
# 2-D study (paper section 5.2)
# ======================================================================================

def _load_model(out_dir: str, cfg: ReproduceConfig, ds: str, sch: str, seed: int):
    from hbar.training import load_checkpoint

    score, schedule, tcfg = load_checkpoint(os.path.join(out_dir, "models", model_name(ds, sch)))
    return score, schedule, tcfg


def _stage_train(out_dir: str, cfg: ReproduceConfig, ds: str, sch: str, seed: int, stages: _Stages,
                 stage: str) -> tuple[dict, None]:
    tcfg = model_train_config(cfg, ds, sch, seed)
    rd = os.path.join(out_dir, "models", model_name(ds, sch))
    res = train(tcfg, rd, resume=True, progress=lambda s, tot, loss: stages.report(stage, s, tot))
    return {"dataset": ds, "schedule": sch, "run_dir": os.path.relpath(rd, out_dir), "epochs": res.epochs_done,
            "steps": res.steps_done, "final_epoch_loss": float(res.losses[-1]) if len(res.losses) else None,
            "test_loss": res.test_loss, "train_seconds_this_call": res.seconds,
            "config": tcfg.to_dict()}, None


def _test_points(cfg: ReproduceConfig, ds: str, sch: str, seed: int) -> np.ndarray:
    _, xt = make_training_data(model_train_config(cfg, ds, sch, seed))
    return xt


def _stage_nll(out_dir, cfg, ds, sch, seed, stages, stage):
    score, schedule, _ = _load_model(out_dir, cfg, ds, sch, seed)
    x = _test_points(cfg, ds, sch, seed)
    opts = ODEOptions(rtol=cfg.nll_tol, atol=cfg.nll_tol)
    r = hbar_nll(score, schedule, x, order=1, bound=cfg.bound, options=opts, progress=_sub(stages, stage))
    rp = hbar_nll(score, schedule, x, order=0, bound=cfg.bound,
                  options=ODEOptions(rtol=cfg.nll_tol_paper, atol=cfg.nll_tol_paper))
    ent = dataset_entropy(ds)
    v = r.valid
    js = {"n": int(x.shape[0]), "n_failed": r.n_failed, "bound": cfg.bound, "tol": cfg.nll_tol,
          "nll0": _stats(np.where(v, r.nll0, np.nan)), "c1": _stats(np.where(v, r.c1, np.nan)),
          "nll0_tol_paper": _stats(np.where(rp.valid, rp.nll0, np.nan)), "tol_paper": cfg.nll_tol_paper,
          "n_failed_tol_paper": rp.n_failed,
          "entropy": ent, "excess_nll0": (r.nll0_mean[0] - ent[0]) if ent else None,
          "return_error_max": r.extras.get("return_error_max"),
          "evals_forward": r.evals_forward, "evals_backward": r.evals_backward}
    return js, {"x": x, "nll0": r.nll0, "c1": r.c1, "valid": r.valid, "nll0_tol_paper": rp.nll0,
                "valid_tol_paper": rp.valid}


def _stage_c2(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr):
    score, schedule, _ = _load_model(out_dir, cfg, ds, sch, seed)
    idx = np.nonzero(nll_arr["valid"])[0][: cfg.n_c2]
    x = nll_arr["x"][idx]
    opts = ODEOptions(rtol=cfg.nll_tol, atol=cfg.nll_tol)
    r = hbar_nll(score, schedule, x, order=2, bound=cfg.bound, options=opts, batch_size=64,
                 progress=_sub(stages, stage))
    v = r.valid
    js = {"n": int(len(idx)), "n_failed": r.n_failed, "tol": cfg.nll_tol,
          "nll0": _stats(np.where(v, r.nll0, np.nan)), "c1": _stats(np.where(v, r.c1, np.nan)),
          "c2": _stats(np.where(v, r.c2, np.nan)),
          "c1_same_points_order1": _stats(nll_arr["c1"][idx][v]),
          "max_abs_c1_diff_order1_vs_order2": float(np.max(np.abs(nll_arr["c1"][idx][v] - r.c1[v])))
          if v.any() else None}
    return js, {"idx": idx, "nll0": r.nll0, "c1": r.c1, "c2": r.c2, "valid": r.valid}


def _stage_fd(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr):
    score, schedule, _ = _load_model(out_dir, cfg, ds, sch, seed)
    idx = np.nonzero(nll_arr["valid"])[0][: cfg.n_fd]
    x = nll_arr["x"][idx]
    c1e = nll_arr["c1"][idx]
    js: dict[str, Any] = {"n": int(len(idx)), "fd_step": 0.01, "c1_exact": _stats(c1e), "variants": []}
    arrays: dict[str, np.ndarray] = {"idx": idx, "c1_exact": c1e}
    for k, (outer, inner) in enumerate(cfg.fd_tols):
        t0 = time.perf_counter()
        r = hbar_nll(score, schedule, x, order=1, method="finite-difference", bound=cfg.bound,
                     options=ODEOptions(rtol=outer, atol=outer), inner_options=ODEOptions(rtol=inner, atol=inner),
                     batch_size=max(1, len(idx)), progress=_sub(stages, stage))
        c1f = np.where(r.valid, r.c1, np.nan)
        diff = c1f - c1e
        ok = np.isfinite(diff)
        js["variants"].append({
            "outer_tol": outer, "inner_tol": inner, "n_failed": r.n_failed, "c1_fd": _stats(c1f),
            "diff": _stats(diff), "rms_diff": float(np.sqrt(np.mean(diff[ok] ** 2))) if ok.any() else None,
            "max_abs_diff": float(np.max(np.abs(diff[ok]))) if ok.any() else None,
            "corr": float(np.corrcoef(c1f[ok], c1e[ok])[0, 1]) if ok.sum() > 2 else None,
            "nll0_fd_max_abs_diff": float(np.nanmax(np.abs(np.where(r.valid, r.nll0, np.nan) - nll_arr["nll0"][idx])))
            if r.valid.any() else None,
            "seconds": time.perf_counter() - t0})
        arrays[f"c1_fd_{k}"] = c1f
    return js, arrays


def _stage_fp(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr, fine=False):
    score, schedule, _ = _load_model(out_dir, cfg, ds, sch, seed)
    idx = np.nonzero(nll_arr["valid"])[0][: cfg.fp_points]
    x = nll_arr["x"][idx]
    if fine:
        # fixed ladder fp_fine_grid * (1, 2, 4, ...): the finest grid the time budget allows
        top = cfg.fp_fine_grid * 2 ** (cfg.fp_fine_levels - 1)
        kw = dict(tol=cfg.fp_tol, box=cfg.fp_box, grid=cfg.fp_fine_grid, levels=cfg.fp_fine_levels,
                  max_cells=top * top, warn=False)
    else:
        kw = dict(tol=cfg.fp_tol, box=cfg.fp_box, max_cells=cfg.fp_max_cells, max_levels=cfg.fp_max_levels,
                  min_levels=min(3, cfg.fp_max_levels), warn=False)
    try:
        fp = fokker_planck_nll(score, schedule, x, list(cfg.fp_h), **kw)
        parts = [fp]
    except RuntimeError:
        # some h had no usable grid: solve the h one by one and keep those that work
        parts = []
        for h in cfg.fp_h:
            try:
                parts.append(fokker_planck_nll(score, schedule, x, [h], **kw))
            except RuntimeError as err:
                parts.append(str(err))
    nll0 = nll_arr["nll0"][idx]
    if len(parts) == 1 and not isinstance(parts[0], str):
        return _fp_json(parts[0], idx, nll0, nll_arr, cfg)
    return _fp_json_merged(parts, idx, nll0, nll_arr, cfg)


def _fp_json(fp, idx, nll0, nll_arr, cfg):
    c1 = nll_arr["c1"][idx]
    js = {"n": int(len(idx)), "h": fp.h, "nll": fp.nll, "error": fp.error, "stderr": fp.stderr,
          "max_cells_used": int(max(fp.cells)) ** 2 if fp.cells else None,
          "converged": fp.converged, "observed_order": fp.observed_order, "cells": fp.cells,
          "n_steps": fp.n_steps, "level_seconds": [lv.seconds for lv in fp.levels], "flags": list(fp.flags),
          "tol": cfg.fp_tol, "max_cells": cfg.fp_max_cells, "feature_scale": fp.feature_scale,
          "nll0_same_points": _mean_se(nll0), "c1_same_points": _mean_se(c1),
          "slope_fp": [(float(fp.nll[i]) - float(nll0.mean())) / float(h) for i, h in enumerate(fp.h)],
          "report": fp.report()}
    return js, {"idx": idx, "nll_points": fp.nll_points, "nll_levels": fp.nll_levels}


def _fp_json_merged(parts, idx, nll0, nll_arr, cfg):
    """Per-h solves (after a failure of the joint solve): failed h are NaN and flagged."""
    nan = math.nan
    hs, nll, err, se, conv, order, flags, reports, cells, steps, secs = [], [], [], [], [], [], [], [], [], [], []
    pts = []
    for h, p in zip(cfg.fp_h, parts):
        hs.append(float(h))
        if isinstance(p, str):
            nll.append(nan); err.append(nan); se.append(nan); conv.append(False); order.append(nan)
            flags.append(f"h={h:g}: no usable grid ({p.splitlines()[0]})")
            reports.append(p)
            pts.append(np.full(len(idx), nan))
            continue
        nll.append(float(p.nll[0])); err.append(float(p.error[0])); se.append(float(p.stderr[0]))
        conv.append(bool(p.converged[0])); order.append(float(p.observed_order[0]))
        flags += list(p.flags); reports.append(p.report()); pts.append(p.nll_points[0])
        cells.append(p.cells); steps.append(p.n_steps); secs.append([lv.seconds for lv in p.levels])
    c1 = nll_arr["c1"][idx]
    js = {"n": int(len(idx)), "h": hs, "nll": nll, "error": err, "stderr": se, "converged": conv,
          "observed_order": order, "cells": cells[0] if cells else [], "cells_per_h": cells, "n_steps": steps,
          "level_seconds": secs, "flags": flags, "tol": cfg.fp_tol, "max_cells": cfg.fp_max_cells,
          "nll0_same_points": _mean_se(nll0), "c1_same_points": _mean_se(c1),
          "slope_fp": [(v - float(nll0.mean())) / h for v, h in zip(nll, hs)], "report": "\n\n".join(reports)}
    return js, {"idx": idx, "nll_points": np.array(pts)}


def _stage_w2(out_dir, cfg, ds, sch, seed, stages, stage, hs, trials, salt):
    score, schedule, _ = _load_model(out_dir, cfg, ds, sch, seed)
    s32 = Float32Score(score)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), salt)
    w2, w2sq, w2all, w2sqall, nfail, nout = [], [], [], [], [], []
    first: dict[str, np.ndarray] = {}
    total = len(hs) * trials
    for ih, h in enumerate(hs):
        rw, rw2, ra, ra2, rf, ro = [], [], [], [], [], []
        for k in range(trials):
            kk = jax.random.fold_in(key, 1000 * ih + k)
            sr = sample(s32, schedule, kk, cfg.w2_n, float(h), steps=cfg.w2_steps, d=2)
            inb = sr.valid & np.all(np.abs(np.nan_to_num(sr.samples, nan=np.inf)) <= cfg.bound, axis=1)
            y = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 500000 + salt * 100 + k)
            # headline: the paper's exclusion rule (samples outside [-bound, bound]^2 dropped and counted)
            d2 = w2_empirical(sr.samples[inb], y, squared=True) if inb.any() else math.nan
            d2a = d2 if inb.sum() == sr.valid.sum() else (
                w2_empirical(sr.valid_samples, y, squared=True) if sr.valid.any() else math.nan)
            rw2.append(d2)
            rw.append(math.sqrt(max(d2, 0.0)) if math.isfinite(d2) else math.nan)
            ra2.append(d2a)
            ra.append(math.sqrt(max(d2a, 0.0)) if math.isfinite(d2a) else math.nan)
            rf.append(sr.n_failed)
            ro.append(int(sr.valid.sum() - inb.sum()))
            if k == 0:
                first[f"samples_h{ih}"] = sr.samples
                first[f"valid_h{ih}"] = sr.valid
                first[f"inbound_h{ih}"] = inb
                first["fresh0"] = y
            stages.report(stage, ih * trials + k + 1, total)
        w2.append(rw)
        w2sq.append(rw2)
        w2all.append(ra)
        w2sqall.append(ra2)
        nfail.append(rf)
        nout.append(ro)
    fl, fl2 = [], []
    for k in range(trials):
        ya = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 700000 + salt * 100 + 2 * k)
        yb = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 700000 + salt * 100 + 2 * k + 1)
        d2 = w2_empirical(ya, yb, squared=True)
        fl2.append(d2)
        fl.append(math.sqrt(d2))
    w2m = [_mean_se(r) for r in w2]
    w2sqm = [_mean_se(r) for r in w2sq]
    means = np.array([m for m, _ in w2m], float)
    imin = int(np.nanargmin(means)) if np.isfinite(means).any() else 0
    js = {"h": list(hs), "trials": trials, "n": cfg.w2_n, "steps": cfg.w2_steps, "method": "euler",
          "bound": cfg.bound, "w2": w2m, "w2_sq": w2sqm, "w2_trials": w2, "w2_sq_trials": w2sq,
          "w2_all": [_mean_se(r) for r in w2all], "w2_sq_all": [_mean_se(r) for r in w2sqall],
          "w2_all_trials": w2all, "w2_sq_all_trials": w2sqall, "n_failed": nfail,
          "n_outside_bound": nout, "floor_w2": _mean_se(fl), "floor_w2_sq": _mean_se(fl2),
          "h_min_w2": float(hs[imin]), "w2_at_min": w2m[imin], "w2_at_0": w2m[0] if hs[0] == 0 else None}
    arrays = dict(first)
    arrays["h"] = np.asarray(hs, float)
    arrays["data"] = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 900000).astype(np.float32)
    return js, arrays


def _minimisers(nll_js, c2_js, fp_js, w2_js, w2w_js) -> dict[str, Any]:
    """Where the brute-force NLL and W2 are smallest, and what the WKB coefficients predicted."""
    out: dict[str, Any] = {}
    if nll_js is None:
        return out
    c1 = nll_js["c1"]["mean"]
    c2 = c2_js["c2"]["mean"] if c2_js else None
    out["c1"] = c1
    out["c2"] = c2
    out["wkb1_predicts"] = "NLL falls for small h" if c1 < 0 else "NLL rises for small h"
    if c2 is not None and c2 > 0 and c1 < 0:
        out["h_star_wkb2"] = -c1 / (2 * c2)
        out["nll_min_wkb2"] = nll_js["nll0"]["mean"] - c1 * c1 / (4 * c2)
    elif c2 is not None:
        out["h_star_wkb2"] = None if c1 < 0 else 0.0
    if fp_js is not None:
        hs = [0.0] + [float(h) for h in fp_js["h"]]
        vals = [fp_js["nll0_same_points"][0]] + [math.nan if v is None else float(v) for v in fp_js["nll"]]
        conv = [True] + [bool(c) for c in fp_js["converged"]]
        arr = np.array(vals, float)
        if np.isfinite(arr).any():
            i = int(np.nanargmin(arr))
            out["h_min_nll_fp"] = hs[i]
            out["nll_min_fp"] = vals[i]
            out["h_min_nll_fp_converged"] = conv[i]
            out["fp_grid"] = hs
            out["fp_n_unconverged"] = int(sum(not c for c in conv))
    for key, js in (("small", w2_js), ("wide", w2w_js)):
        if js is not None:
            out[f"h_min_w2_{key}"] = js["h_min_w2"]
            a0, amin = js["w2"][0][0], js["w2_at_min"][0]
            out[f"w2_drop_{key}"] = (a0 - amin) if js["h"][0] == 0 and a0 is not None and amin is not None else None
    if "h_min_nll_fp" in out:
        agree_sign = (c1 < 0) == (out["h_min_nll_fp"] > 0)
        out["c1_sign_agrees_with_fp_minimiser"] = bool(agree_sign)
    if "h_min_w2_small" in out:
        out["c1_sign_agrees_with_w2_minimiser"] = bool((c1 < 0) == (out["h_min_w2_small"] > 0))
    return out


# ======================================================================================
# driver
# ======================================================================================

def _models(cfg: ReproduceConfig) -> list[tuple[str, str]]:
    return [(ds, sc) for ds in cfg.datasets for sc in cfg.schedules]


def _collect(out_dir: str, cfg: ReproduceConfig) -> dict[str, Any]:
    """All finished stage results (JSON parts), keyed by stage."""
    res: dict[str, Any] = {}
    names = ["gauss1d"] if cfg.run_gauss1d else []
    for ds, sc in _models(cfg):
        m = model_name(ds, sc)
        names += [f"train/{m}", f"nll/{m}", f"c2/{m}", f"fd/{m}", f"fp/{m}", f"fpfine/{m}", f"w2/{m}",
                  f"w2wide/{m}"]
    for n in names:
        js, _ = load_stage(out_dir, n)
        if js is not None and js.get("_complete"):
            res[n] = js
    return res


def _refresh_outputs(out_dir: str, cfg: ReproduceConfig, seed: int, log: dict, t_start: float,
                     final: bool) -> dict[str, Any]:
    from hbar import report as rep

    stages = _collect(out_dir, cfg)
    models = {}
    for ds, sc in _models(cfg):
        m = model_name(ds, sc)
        g = lambda k: stages.get(f"{k}/{m}")  # noqa: E731
        fp_best = g("fpfine") or g("fp")
        models[m] = {"dataset": ds, "schedule": sc, "train": g("train"), "nll": g("nll"), "c2": g("c2"),
                     "fd": g("fd"), "fp": g("fp"), "fpfine": g("fpfine"), "w2": g("w2"), "w2wide": g("w2wide"),
                     "minimisers": _minimisers(g("nll"), g("c2"), fp_best, g("w2"), g("w2wide"))}
    stage_seconds = {k: v.get("seconds") for k, v in stages.items()}
    results = {"kind": "demo" if cfg.demo else "reproduce", "config": cfg.to_dict(), "seed": seed,
               "complete": final, "stages_finished": sorted(stages), "stage_seconds": stage_seconds,
               "stage_log_this_call": log, "wall_seconds_this_call": time.perf_counter() - t_start,
               "total_stage_seconds": float(sum(v for v in stage_seconds.values() if v)),
               "gauss1d": stages.get("gauss1d"), "models": models,
               "updated_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    prev = os.path.join(out_dir, "results.json")
    if os.path.exists(prev):
        try:
            with open(prev) as fh:
                old = json.load(fh)
            results["wall_seconds_history"] = old.get("wall_seconds_history", [])
        except (OSError, ValueError):
            results["wall_seconds_history"] = []
    else:
        results["wall_seconds_history"] = []
    rep.write_outputs(out_dir, results)
    _write_json(prev, results)
    return results


def _run(out_dir: str | os.PathLike, cfg: ReproduceConfig, seed: int, progress: Progress) -> dict[str, Any]:
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    cpath = os.path.join(out_dir, "config.json")
    want = {"config": cfg.to_dict(), "seed": seed}
    if os.path.exists(cpath):
        with open(cpath) as fh:
            have = json.load(fh)
        want_js = json.loads(json.dumps(to_jsonable(want)))
        if have != want_js:
            # forward compatibility: fields added to ReproduceConfig after a run started only
            # control new stages; every stored field must still match
            old, new = have.get("config", {}), want_js["config"]
            same = have.get("seed") == seed and all(k in new and new[k] == v for k, v in old.items())
            if not same:
                raise HbarInputError(f"{out_dir} holds results of a different configuration ({cpath}); "
                                     "use another out_dir or delete it")
            want_js["added_fields"] = sorted(set(have.get("added_fields", [])) | (set(new) - set(old)))
            _write_json(cpath, want_js)
    else:
        _write_json(cpath, want)

    def refresh(final: bool = False) -> dict[str, Any]:
        return _refresh_outputs(out_dir, cfg, seed, st.log, t_start, final)

    st = _Stages(out_dir, progress, on_done=lambda: refresh(False))
    models = _models(cfg)
    if cfg.run_gauss1d:
        st.run("gauss1d", lambda: _stage_gauss1d(cfg, seed, st))
    for ds, sc in models:
        m = model_name(ds, sc)
        st.run(f"train/{m}", lambda: _stage_train(out_dir, cfg, ds, sc, seed, st, f"train/{m}"))
    nll_arrays = {}
    for ds, sc in models:
        m = model_name(ds, sc)
        _, nll_arrays[m] = st.run(f"nll/{m}", lambda: _stage_nll(out_dir, cfg, ds, sc, seed, st, f"nll/{m}"))
    for ds, sc in models:
        m = model_name(ds, sc)
        if cfg.n_c2 > 0:
            st.run(f"c2/{m}", lambda: _stage_c2(out_dir, cfg, ds, sc, seed, st, f"c2/{m}", nll_arrays[m]))
    for ds, sc in models:
        m = model_name(ds, sc)
        st.run(f"w2/{m}", lambda: _stage_w2(out_dir, cfg, ds, sc, seed, st, f"w2/{m}", list(cfg.w2_h_small),
                                            cfg.w2_trials, 1))
    for ds, sc in models:
        m = model_name(ds, sc)
        if cfg.n_fd > 0 and cfg.fd_tols:
            st.run(f"fd/{m}", lambda: _stage_fd(out_dir, cfg, ds, sc, seed, st, f"fd/{m}", nll_arrays[m]))
    for ds, sc in models:
        m = model_name(ds, sc)
        if cfg.fp_h:
            st.run(f"fp/{m}", lambda: _stage_fp(out_dir, cfg, ds, sc, seed, st, f"fp/{m}", nll_arrays[m]))
    for ds, sc in models:
        m = model_name(ds, sc)
        if cfg.fp_h and m in cfg.fp_fine_models:
            st.run(f"fpfine/{m}", lambda: _stage_fp(out_dir, cfg, ds, sc, seed, st, f"fpfine/{m}", nll_arrays[m],
                                                    fine=True))
    for ds, sc in models:
        m = model_name(ds, sc)
        if cfg.w2_h_wide:
            st.run(f"w2wide/{m}", lambda: _stage_w2(out_dir, cfg, ds, sc, seed, st, f"w2wide/{m}",
                                                    list(cfg.w2_h_wide), cfg.w2_trials_wide, 2))
    results = refresh(True)
    hist = results.get("wall_seconds_history", []) + [{"seconds": time.perf_counter() - t_start,
                                                         "recomputed": sorted(k for k, v in st.log.items()
                                                                              if not v["cached"]),
                                                         "finished_at": results["updated_at"]}]
    results["wall_seconds_history"] = hist
    results["wall_seconds_this_call"] = time.perf_counter() - t_start
    from hbar import report as rep

    rep.write_outputs(out_dir, results)
    _write_json(os.path.join(out_dir, "results.json"), results)
    return results


def run_reproduce(out_dir: str | os.PathLike, quick: bool = False, seed: int = 0, progress: Progress = None,
                  config: ReproduceConfig | None = None) -> dict[str, Any]:
    """Reproduce the paper's experiments into ``out_dir`` (resumable; see the module docstring).

    ``quick``: ReproduceConfig.quick() instead of .full(); ``config`` overrides both.
    ``progress(stage, done, total)`` is called as stages advance. Returns the results dict
    (also written to ``out_dir/results.json``; report in ``out_dir/report.md``)."""
    cfg = config if config is not None else (ReproduceConfig.quick() if quick else ReproduceConfig.full())
    return _run(out_dir, cfg, int(seed), progress)


def run_demo(out_dir: str | os.PathLike, quick: bool = False, seed: int = 0, progress: Progress = None,
             config: ReproduceConfig | None = None) -> dict[str, Any]:
    """A few-minute demo (swiss roll, SIMPLE): short training, samples at several h (one PNG
    per h), NLL0 / C1 / C2, NLL(h) WKB lines vs Fokker-Planck, W2(h), results JSON/CSV and a
    short markdown summary (``out_dir/report.md``). Resumable like :func:`run_reproduce`."""
    cfg = config if config is not None else ReproduceConfig.demo_config(quick=quick)
    if not cfg.demo:
        cfg = dataclasses.replace(cfg, demo=True)
    return _run(out_dir, cfg, int(seed), progress)
