"""The 2-D stages of the paper2024 study (paper section 5.2; docs/theory.md sections 9-10).

One function per stage kind, each ``(out_dir, cfg, dataset, schedule, seed, stages, stage, ...)
-> (json dict, arrays dict | None)``: ``train``, ``nll`` (NLL0 and C1 on the held-out points,
Table 1), ``c2`` (order-2 coefficient on a subset), ``path`` (step-converged path-integral NLL(h) with
the WKB series, its radius and Pade resummation on the same points), ``fd`` (the paper's finite-difference C1
against the exact one), ``fp`` / ``fpfine`` (Fokker-Planck NLL(h)) and ``w2`` / ``w2wide``
(W2 of samples against fresh data). Learned networks are evaluated in float64 for likelihoods
and WKB coefficients and in their own float32 for sampling (as the paper).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from hbar import nll, sample
from hbar.data import dataset_entropy, load_dataset
from hbar.metrics import w2_empirical
from hbar.ode import ODEOptions
from hbar.path import converged_path_nll
from hbar.references import fokker_planck_nll
from hbar.training import load_checkpoint, make_training_data, train

from ._util import mse, summary
from .config import ReproduceConfig, model_name, model_train_config
from .stages import StageRunner

__all__ = ["Float32Score", "stage_train", "stage_nll", "stage_c2", "stage_fd", "stage_fp", "stage_w2", "stage_path",
           "FD_STEP"]

FD_STEP = 0.01  # the step of the paper's central differences in h (method="finite-difference")


class Float32Score(eqx.Module):
    """Evaluate a float32 network in float32 and return the input dtype (sampling only)."""

    net: Any

    def __call__(self, x, t):
        return self.net(x.astype(jnp.float32), jnp.asarray(t, jnp.float32)).astype(x.dtype)


def _load_model(out_dir: str, ds: str, sch: str):
    score, schedule, _ = load_checkpoint(os.path.join(out_dir, "models", model_name(ds, sch)))
    return score, schedule


def stage_train(out_dir: str, cfg: ReproduceConfig, ds: str, sch: str, seed: int, stages: StageRunner,
                stage: str) -> tuple[dict, None]:
    tcfg = model_train_config(cfg, ds, sch, seed)
    rd = os.path.join(out_dir, "models", model_name(ds, sch))
    res = train(tcfg, rd, resume=True, progress=lambda s, tot, loss: stages.report(stage, s, tot))
    return {"dataset": ds, "schedule": sch, "run_dir": os.path.relpath(rd, out_dir), "epochs": res.epochs_done,
            "steps": res.steps_done, "final_epoch_loss": float(res.losses[-1]) if len(res.losses) else None,
            "test_loss": res.test_loss, "train_seconds_this_call": res.seconds, "config": tcfg.to_dict()}, None


def stage_nll(out_dir, cfg, ds, sch, seed, stages, stage):
    score, schedule = _load_model(out_dir, ds, sch)
    _, x = make_training_data(model_train_config(cfg, ds, sch, seed))
    r = nll(score, schedule, x, order=1, bound=cfg.bound, options=ODEOptions(rtol=cfg.nll_tol, atol=cfg.nll_tol),
            progress=stages.sub(stage))
    rp = nll(score, schedule, x, order=0, bound=cfg.bound,
             options=ODEOptions(rtol=cfg.nll_tol_paper, atol=cfg.nll_tol_paper))
    ent = dataset_entropy(ds)
    v = r.valid
    js = {"n": int(x.shape[0]), "n_failed": r.n_failed, "bound": cfg.bound, "tol": cfg.nll_tol,
          "nll0": summary(np.where(v, r.nll0, np.nan)), "c1": summary(np.where(v, r.c1, np.nan)),
          "nll0_tol_paper": summary(np.where(rp.valid, rp.nll0, np.nan)), "tol_paper": cfg.nll_tol_paper,
          "n_failed_tol_paper": rp.n_failed,
          "entropy": ent, "excess_nll0": (r.nll0_mean[0] - ent[0]) if ent else None,
          "return_error_max": r.extras.get("return_error_max"),
          "evals_forward": r.evals_forward, "evals_backward": r.evals_backward}
    return js, {"x": x, "nll0": r.nll0, "c1": r.c1, "valid": r.valid, "nll0_tol_paper": rp.nll0,
                "valid_tol_paper": rp.valid}


def stage_c2(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr):
    score, schedule = _load_model(out_dir, ds, sch)
    idx = np.nonzero(nll_arr["valid"])[0][: cfg.n_c2]
    r = nll(score, schedule, nll_arr["x"][idx], order=2, bound=cfg.bound,
            options=ODEOptions(rtol=cfg.nll_tol, atol=cfg.nll_tol), batch_size=64, progress=stages.sub(stage))
    v = r.valid
    c1_o1 = nll_arr["c1"][idx]
    js = {"n": int(len(idx)), "n_failed": r.n_failed, "tol": cfg.nll_tol,
          "nll0": summary(np.where(v, r.nll0, np.nan)), "c1": summary(np.where(v, r.c1, np.nan)),
          "c2": summary(np.where(v, r.c2, np.nan)), "c1_same_points_order1": summary(c1_o1[v]),
          "max_abs_c1_diff_order1_vs_order2": float(np.max(np.abs(c1_o1[v] - r.c1[v]))) if v.any() else None}
    return js, {"idx": idx, "nll0": r.nll0, "c1": r.c1, "c2": r.c2, "valid": r.valid}


def stage_fd(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr):
    score, schedule = _load_model(out_dir, ds, sch)
    idx = np.nonzero(nll_arr["valid"])[0][: cfg.n_fd]
    x = nll_arr["x"][idx]
    c1e = nll_arr["c1"][idx]
    js: dict[str, Any] = {"n": int(len(idx)), "fd_step": FD_STEP, "c1_exact": summary(c1e), "variants": []}
    arrays: dict[str, np.ndarray] = {"idx": idx, "c1_exact": c1e}
    for k, (outer, inner) in enumerate(cfg.fd_tols):
        t0 = time.perf_counter()
        r = nll(score, schedule, x, order=1, method="finite-difference", bound=cfg.bound,
                options=ODEOptions(rtol=outer, atol=outer), inner_options=ODEOptions(rtol=inner, atol=inner),
                batch_size=max(1, len(idx)), progress=stages.sub(stage))
        c1f = np.where(r.valid, r.c1, np.nan)
        diff = c1f - c1e
        ok = np.isfinite(diff)
        nll0_diff = np.abs(np.where(r.valid, r.nll0, np.nan) - nll_arr["nll0"][idx])
        js["variants"].append({
            "outer_tol": outer, "inner_tol": inner, "n_failed": r.n_failed, "c1_fd": summary(c1f),
            "diff": summary(diff), "rms_diff": float(np.sqrt(np.mean(diff[ok] ** 2))) if ok.any() else None,
            "max_abs_diff": float(np.max(np.abs(diff[ok]))) if ok.any() else None,
            "corr": float(np.corrcoef(c1f[ok], c1e[ok])[0, 1]) if ok.sum() > 2 else None,
            "nll0_fd_max_abs_diff": float(np.nanmax(nll0_diff)) if r.valid.any() else None,
            "seconds": time.perf_counter() - t0})
        arrays[f"c1_fd_{k}"] = c1f
    return js, arrays


def stage_fp(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr, fine=False):
    score, schedule = _load_model(out_dir, ds, sch)
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
        parts: list[Any] = [fokker_planck_nll(score, schedule, x, list(cfg.fp_h), **kw)]
    except RuntimeError:
        # some h had no usable grid: solve the h one by one and keep those that work
        parts = []
        for h in cfg.fp_h:
            try:
                parts.append(fokker_planck_nll(score, schedule, x, [h], **kw))
            except RuntimeError as err:
                parts.append(str(err))
    nll0, c1 = nll_arr["nll0"][idx], nll_arr["c1"][idx]
    if len(parts) == 1 and not isinstance(parts[0], str):
        fp = parts[0]
        js = {"n": int(len(idx)), "h": fp.h, "nll": fp.nll, "error": fp.error, "stderr": fp.stderr,
              "converged": fp.converged, "observed_order": fp.observed_order, "cells": fp.cells,
              "n_steps": fp.n_steps, "level_seconds": [lv.seconds for lv in fp.levels], "flags": list(fp.flags),
              "tol": cfg.fp_tol, "max_cells": cfg.fp_max_cells, "box": cfg.fp_box, "feature_scale": fp.feature_scale,
              "nll0_same_points": mse(nll0), "c1_same_points": mse(c1),
              "slope_fp": [(float(fp.nll[i]) - float(nll0.mean())) / float(h) for i, h in enumerate(fp.h)],
              "report": fp.report()}
        return js, {"idx": idx, "nll_points": fp.nll_points, "nll_levels": fp.nll_levels}
    return _fp_merged(parts, idx, nll0, c1, cfg)


def _fp_merged(parts, idx, nll0, c1, cfg):
    """Per-h solves (after a failure of the joint solve): failed h are NaN and flagged."""
    nan = math.nan
    hs, vals, err, se, conv, order, flags, reports, cells, steps, secs, pts, scales = ([] for _ in range(13))
    for h, p in zip(cfg.fp_h, parts):
        hs.append(float(h))
        if isinstance(p, str):
            vals.append(nan), err.append(nan), se.append(nan), conv.append(False), order.append(nan)
            flags.append(f"h={h:g}: no usable grid ({p.splitlines()[0]})")
            reports.append(p)
            pts.append(np.full(len(idx), nan))
            continue
        vals.append(float(p.nll[0])), err.append(float(p.error[0])), se.append(float(p.stderr[0]))
        conv.append(bool(p.converged[0])), order.append(float(p.observed_order[0]))
        flags += list(p.flags)
        reports.append(p.report())
        pts.append(p.nll_points[0])
        cells.append(p.cells), steps.append(p.n_steps), secs.append([lv.seconds for lv in p.levels])
        scales.append(p.feature_scale)
    js = {"n": int(len(idx)), "h": hs, "nll": vals, "error": err, "stderr": se, "converged": conv,
          "observed_order": order, "cells": cells[0] if cells else [], "cells_per_h": cells, "n_steps": steps,
          "level_seconds": secs, "flags": flags, "tol": cfg.fp_tol, "max_cells": cfg.fp_max_cells, "box": cfg.fp_box,
          "feature_scale": scales[0] if scales else None, "nll0_same_points": mse(nll0), "c1_same_points": mse(c1),
          "slope_fp": [(v - float(nll0.mean())) / h for v, h in zip(vals, hs)], "report": "\n\n".join(reports)}
    return js, {"idx": idx, "nll_points": np.array(pts)}


def stage_w2(out_dir, cfg, ds, sch, seed, stages, stage, hs, trials, salt):
    score, schedule = _load_model(out_dir, ds, sch)
    s32 = Float32Score(score)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), salt)
    w2, w2sq, w2all, w2sqall, nfail, nout = [], [], [], [], [], []
    first: dict[str, np.ndarray] = {}
    total = len(hs) * trials
    for ih, h in enumerate(hs):
        rw, rw2, ra, ra2, rf, ro = [], [], [], [], [], []
        for k in range(trials):
            sr = sample(s32, schedule, jax.random.fold_in(key, 1000 * ih + k), cfg.w2_n, float(h),
                        steps=cfg.w2_steps, d=2)
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
        w2.append(rw), w2sq.append(rw2), w2all.append(ra), w2sqall.append(ra2), nfail.append(rf), nout.append(ro)
    fl, fl2 = [], []
    for k in range(trials):
        ya = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 700000 + salt * 100 + 2 * k)
        yb = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 700000 + salt * 100 + 2 * k + 1)
        d2 = w2_empirical(ya, yb, squared=True)
        fl2.append(d2)
        fl.append(math.sqrt(d2))
    w2m = [mse(r) for r in w2]
    means = np.array([m for m, _ in w2m], float)
    imin = int(np.nanargmin(means)) if np.isfinite(means).any() else 0
    js = {"h": list(hs), "trials": trials, "n": cfg.w2_n, "steps": cfg.w2_steps, "method": "euler",
          "bound": cfg.bound, "w2": w2m, "w2_sq": [mse(r) for r in w2sq], "w2_trials": w2, "w2_sq_trials": w2sq,
          "w2_all": [mse(r) for r in w2all], "w2_sq_all": [mse(r) for r in w2sqall],
          "w2_all_trials": w2all, "w2_sq_all_trials": w2sqall, "n_failed": nfail,
          "n_outside_bound": nout, "floor_w2": mse(fl), "floor_w2_sq": mse(fl2),
          "h_min_w2": float(hs[imin]), "w2_at_min": w2m[imin], "w2_at_0": w2m[0] if hs[0] == 0 else None}
    arrays = dict(first)
    arrays["h"] = np.asarray(hs, float)
    arrays["data"] = load_dataset(ds, cfg.w2_n, seed=seed * 1000 + 900000).astype(np.float32)
    return js, arrays


def stage_path(out_dir, cfg, ds, sch, seed, stages, stage, nll_arr, fp_js=None, fp_arr=None):
    """Step-converged path-integral NLL(h) (:func:`hbar.path.converged_path_nll`) on the first
    ``path_points`` valid test points, and on the same points: NLL0, C1 and the Fokker-Planck
    values of the ``fp`` stage restricted to them (with that stage's error estimate and flag).
    The WKB-2 series on these points (radius, Pade) is derived from the ``c2`` stage by
    :func:`.analysis.path_series` when the results are collected."""
    score, schedule = _load_model(out_dir, ds, sch)
    idx = np.nonzero(nll_arr["valid"])[0][: cfg.path_points]
    x = nll_arr["x"][idx]
    hs = [float(h) for h in cfg.path_h]
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 31)
    n_lev = int(math.floor(math.log2(cfg.path_max_steps / cfg.path_steps0))) + 1
    done = {"i": 0}

    def prog(h, lev, tot):
        done["i"] += 1
        stages.report(stage, done["i"], len(hs) * n_lev)

    r = converged_path_nll(score, schedule, x, hs, key, tol=cfg.path_tol, steps0=cfg.path_steps0,
                           max_steps=cfg.path_max_steps, n_paths=cfg.path_n_paths, max_paths=cfg.path_max_paths,
                           progress=prog)
    nll0, c1 = nll_arr["nll0"][idx], nll_arr["c1"][idx]
    js: dict[str, Any] = {"n": int(len(idx)), "h": hs, "tol": cfg.path_tol, "grid": r.grid,
                          "rows": r.rows(), "ladder": r.ladder, "flags": list(r.flags), "report": r.report(),
                          "nll0_same_points": mse(nll0), "c1_same_points": mse(c1), "fp": None}
    arrays: dict[str, np.ndarray] = {"idx": idx, "nll_points": r.nll_points}
    # Fokker-Planck on the same points (its error estimate is that of its mean over all its points)
    if fp_js is not None and fp_arr is not None:
        pos = {int(i): k for k, i in enumerate(fp_arr["idx"])}
        if all(int(i) in pos for i in idx):
            k = np.array([pos[int(i)] for i in idx])
            fh = [float(h) for h in fp_js["h"]]
            pts = np.asarray(fp_arr["nll_points"], float)
            js["fp"] = {"h": fh, "nll": [float(np.mean(pts[j][k])) if pts.ndim == 2 else math.nan
                                         for j in range(len(fh))],
                        "error": fp_js["error"], "converged": fp_js["converged"], "n_fp": fp_js["n"]}
    return js, arrays
