"""The 1-D Gaussian study (paper section 5.1; docs/theory.md section 10).

Data N(0, v0), OU schedule, score s = -(1 + eps) x / v_t (the exact score scaled by 1 + eps,
:class:`hbar.PerturbedScore`). For every eps: closed form (``gaussian_oracle``), WKB to order 2
(``hbar.nll``), samplers (W2 and a Gaussian fit), path-integral Monte Carlo and 1-D
Fokker-Planck, all on the same data points.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np

from hbar import PerturbedScore, gaussian_score, nll, sample
from hbar.data import gaussian as gaussian_data
from hbar.metrics import w2_empirical
from hbar.ode import ODEOptions
from hbar.path import path_nll
from hbar.references import fokker_planck_nll, gaussian_oracle
from hbar.schedules import OUSchedule

from ._util import mse
from .config import ReproduceConfig
from .stages import StageRunner

__all__ = ["stage_gauss1d"]


def _case(cfg: ReproduceConfig, eps: float, seed: int, stages: StageRunner, stage: str) -> tuple[dict, dict]:
    sch = OUSchedule(beta=cfg.g1_beta, t_min=cfg.g1_t_min, T=cfg.g1_T)
    v0 = cfg.g1_v0
    m0, S0 = np.zeros(1), np.array([[v0]])
    score_affine = gaussian_score(m0, S0, sch, scale_eps=eps)
    score = PerturbedScore(gaussian_score(m0, S0, sch), eps)
    ieps = int(round(1000 * eps)) % 100000
    x = gaussian_data(seed * 7919 + 11 + ieps, cfg.g1_n_points, mean=[0.0], cov=[[v0]])
    h_grid = np.linspace(0.0, 1.0, cfg.g1_h_grid)
    h_all = np.unique(np.concatenate([h_grid, cfg.g1_h_samples, cfg.g1_fp_h, cfg.g1_path_h]))
    orc = gaussian_oracle(score_affine, sch, m0, S0, h_all, x=x)
    idx = {float(h): i for i, h in enumerate(h_all)}
    at = lambda hs: [idx[float(h)] for h in hs]  # noqa: E731
    gi, i0 = at(h_grid), idx[0.0]
    out: dict[str, Any] = {"eps": eps, "h_grid": h_grid, "nll_oracle_expect": orc.nll[gi],
                           "nll_oracle": orc.nll_points[gi].mean(axis=1), "w2_oracle": orc.w2[gi],
                           "oracle_c1": float(orc.c1[i0]), "oracle_c2": float(orc.c2[i0]),
                           "oracle_c1_points": float(orc.c1_points[i0].mean()),
                           "oracle_c2_points": float(orc.c2_points[i0].mean()),
                           "oracle_nll0": float(orc.nll[i0]), "oracle_nll0_points": float(orc.nll_points[i0].mean()),
                           "oracle_var": orc.cov[gi, 0, 0]}
    # WKB to second order on the data points
    stages.report(stage, 0, 4)
    r = nll(score, sch, x, order=2, options=ODEOptions(rtol=1e-8, atol=1e-8))
    out["wkb"] = {"nll0": r.nll0_mean, "c1": r.c1_mean, "c2": r.c2_mean, "n_failed": r.n_failed,
                  "max_abs_diff_vs_oracle": {
                      "nll0": float(np.max(np.abs(r.nll0 - orc.nll_points[i0]))),
                      "c1": float(np.max(np.abs(r.c1 - orc.c1_points[i0]))),
                      "c2": float(np.max(np.abs(r.c2 - orc.c2_points[i0])))}}
    # samplers: W2 and Gaussian-fit NLL on the same points
    stages.report(stage, 1, 4)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 1000 + ieps)
    w2s, w2sq, fit, var, floor = [], [], [], [], []
    for ih, h in enumerate(cfg.g1_h_samples):
        row_w, row_w2, row_f, row_v = [], [], [], []
        for k in range(cfg.g1_trials):
            sr = sample(score, sch, jax.random.fold_in(key, 100 * ih + k), cfg.g1_n_samples, float(h),
                        steps=cfg.g1_steps, d=1)
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
        "w2": [mse(r) for r in w2s], "w2_sq": [mse(r) for r in w2sq],
        "nll_gauss_fit": [mse(r) for r in fit], "var": [mse(r) for r in var],
        "oracle_w2": orc.w2[at(hs)], "oracle_var": orc.cov[at(hs), 0, 0],
        "oracle_nll": orc.nll_points[at(hs)].mean(axis=1), "w2_floor": mse(floor),
    }
    # path-integral Monte Carlo likelihood
    stages.report(stage, 2, 4)
    pr = path_nll(score, sch, x, list(cfg.g1_path_h), jax.random.fold_in(key, 7), n_paths=cfg.g1_path_paths,
                  steps=cfg.g1_path_steps)
    out["path"] = {"h": pr.hs, "nll": pr.nll, "se": pr.se, "mc_se": pr.mc_se, "bias": pr.bias,
                   "ess_median": pr.ess_median, "n_paths": pr.n_paths, "steps": pr.steps,
                   "oracle_nll": orc.nll_points[at(pr.hs)].mean(axis=1)}
    # 1-D Fokker-Planck brute force
    stages.report(stage, 3, 4)
    fp = fokker_planck_nll(score, sch, x, list(cfg.g1_fp_h), tol=cfg.g1_fp_tol, warn=False)
    out["fp"] = {"h": fp.h, "nll": fp.nll, "error": fp.error, "stderr": fp.stderr, "converged": fp.converged,
                 "cells": fp.cells, "flags": list(fp.flags), "oracle_nll": orc.nll_points[at(fp.h)].mean(axis=1)}
    stages.report(stage, 4, 4)
    return out, {"x": x}


def stage_gauss1d(cfg: ReproduceConfig, seed: int, stages: StageRunner) -> tuple[dict, dict]:
    """The ``gauss1d`` stage: one case per eps in ``cfg.g1_eps``."""
    cases, arrays = [], {}
    for eps in cfg.g1_eps:
        c, a = _case(cfg, float(eps), seed, stages, "gauss1d")
        cases.append(c)
        arrays[f"x_eps{eps:+g}"] = a["x"]
    falls = [c["eps"] for c in cases if c["nll_oracle_expect"][-1] < c["nll_oracle_expect"][0]]
    rises = [c["eps"] for c in cases if c["nll_oracle_expect"][-1] > c["nll_oracle_expect"][0]]
    schedule = OUSchedule(beta=cfg.g1_beta, t_min=cfg.g1_t_min, T=cfg.g1_T)
    js = {"setting": {"v0": cfg.g1_v0, "schedule": schedule.to_config(),
                      "score": "s = -(1 + eps) x / v_t, v_t = alpha^2 v0 + sigma^2"},
          "cases": cases, "nll_falls_with_h": falls, "nll_rises_with_h": rises}
    return js, arrays
