"""The driver of the paper2024 study (docs/theory.md section 10): stage order, results
collection and the refresh of the results folder after every stage.

JAX float64 is switched on only inside :func:`run_reproduce` / :func:`run_demo`
(``with jax.enable_x64(True)``); importing this module changes no global state.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax

from hbar.locking import run_lock
from hbar.validation import check_seed

from .analysis import minimisers, path_series, robust_summary
from .config import ReproduceConfig, model_name, models_of
from .experiments import stage_c2, stage_fd, stage_fp, stage_nll, stage_path, stage_train, stage_w2
from .gauss1d import stage_gauss1d
from .outputs import write_outputs
from .stages import Progress, StageRunner, load_stage, pin_config, read_json, utc_now, write_json

__all__ = ["run_reproduce", "run_demo", "collect_results"]

_KINDS = ("train", "nll", "c2", "fd", "fp", "fpfine", "path", "w2", "w2wide")


def collect_results(out_dir: str, cfg: ReproduceConfig, seed: int, complete: bool) -> dict[str, Any]:
    """The results dict of every finished stage in ``out_dir`` (plus derived summaries)."""
    stages: dict[str, Any] = {}
    names = (["gauss1d"] if cfg.run_gauss1d else []) + [f"{k}/{model_name(ds, sc)}" for ds, sc in models_of(cfg)
                                                        for k in _KINDS]
    for n in names:
        js, _ = load_stage(out_dir, n)
        if js is not None and js.get("_complete"):
            stages[n] = js
    models = {}
    for ds, sc in models_of(cfg):
        m = model_name(ds, sc)
        g = {k: stages.get(f"{k}/{m}") for k in _KINDS}
        robust = None
        if g["nll"]:
            robust = robust_summary(load_stage(out_dir, f"nll/{m}")[1], load_stage(out_dir, f"c2/{m}")[1] if g["c2"] else None)
        if g["path"] and g["c2"]:
            g["path"] = dict(g["path"], series=path_series(load_stage(out_dir, f"c2/{m}")[1],
                                                           load_stage(out_dir, f"path/{m}")[1]["idx"], g["path"]["h"]))
        models[m] = {"dataset": ds, "schedule": sc, **g, "robust": robust,
                     "minimisers": minimisers(g["nll"], g["c2"], g["fpfine"] or g["fp"], g["w2"], g["w2wide"],
                                              path_js=g["path"])}
    stage_seconds = {k: v.get("seconds") for k, v in stages.items()}
    return {"kind": "demo" if cfg.demo else "reproduce", "config": cfg.to_dict(), "seed": seed, "complete": complete,
            "stages_finished": sorted(stages), "stage_seconds": stage_seconds,
            "total_stage_seconds": float(sum(v for v in stage_seconds.values() if v)),
            "gauss1d": stages.get("gauss1d"), "models": models, "updated_at": utc_now()}


def _previous_history(out_dir: str) -> list[dict[str, Any]]:
    try:
        return read_json(os.path.join(out_dir, "results.json")).get("wall_seconds_history", [])
    except (OSError, ValueError):
        return []


def _run(out_dir: str | os.PathLike, cfg: ReproduceConfig, seed: int, progress: Progress) -> dict[str, Any]:
    """Run the study under a lock on ``out_dir`` (one writer per results folder; docs/theory.md
    section 14.4): a second run into the same folder gets HbarInputError naming the holder."""
    seed = check_seed(seed, "seed")
    with run_lock(out_dir, "hbar demo" if cfg.demo else "hbar reproduce"):
        return _run_locked(os.fspath(out_dir), cfg, seed, progress)


def _run_locked(out_dir: str, cfg: ReproduceConfig, seed: int, progress: Progress) -> dict[str, Any]:
    t_start = time.perf_counter()
    pin_config(out_dir, cfg.to_dict(), seed)
    history = _previous_history(out_dir)

    def refresh(final: bool, history: list[dict[str, Any]]) -> dict[str, Any]:
        results = collect_results(out_dir, cfg, seed, final)
        results.update(stage_log_this_call=st.log, wall_seconds_this_call=time.perf_counter() - t_start,
                       wall_seconds_history=history)
        write_outputs(out_dir, results)
        write_json(os.path.join(out_dir, "results.json"), results)
        return results

    st = StageRunner(out_dir, progress, on_done=lambda: refresh(False, history))
    models = [(ds, sc, model_name(ds, sc)) for ds, sc in models_of(cfg)]
    if cfg.run_gauss1d:
        st.run("gauss1d", lambda: stage_gauss1d(cfg, seed, st))
    for ds, sc, m in models:
        st.run(f"train/{m}", lambda: stage_train(out_dir, cfg, ds, sc, seed, st, f"train/{m}"))
    nll_arrays = {}
    for ds, sc, m in models:
        _, nll_arrays[m] = st.run(f"nll/{m}", lambda: stage_nll(out_dir, cfg, ds, sc, seed, st, f"nll/{m}"))
    if cfg.n_c2 > 0:
        for ds, sc, m in models:
            st.run(f"c2/{m}", lambda: stage_c2(out_dir, cfg, ds, sc, seed, st, f"c2/{m}", nll_arrays[m]))
    for ds, sc, m in models:
        st.run(f"w2/{m}", lambda: stage_w2(out_dir, cfg, ds, sc, seed, st, f"w2/{m}", list(cfg.w2_h_small),
                                           cfg.w2_trials, 1))
    if cfg.n_fd > 0 and cfg.fd_tols:
        for ds, sc, m in models:
            st.run(f"fd/{m}", lambda: stage_fd(out_dir, cfg, ds, sc, seed, st, f"fd/{m}", nll_arrays[m]))
    if cfg.fp_h:
        for ds, sc, m in models:
            st.run(f"fp/{m}", lambda: stage_fp(out_dir, cfg, ds, sc, seed, st, f"fp/{m}", nll_arrays[m]))
        for ds, sc, m in models:
            if m in cfg.fp_fine_models:
                st.run(f"fpfine/{m}", lambda: stage_fp(out_dir, cfg, ds, sc, seed, st, f"fpfine/{m}", nll_arrays[m],
                                                       fine=True))
    if cfg.path_h and cfg.path_points > 0:
        for ds, sc, m in models:
            fp_js, fp_arr = load_stage(out_dir, f"fp/{m}") if cfg.fp_h else (None, None)
            st.run(f"path/{m}", lambda: stage_path(out_dir, cfg, ds, sc, seed, st, f"path/{m}", nll_arrays[m], fp_js,
                                                   fp_arr))
    if cfg.w2_h_wide:
        for ds, sc, m in models:
            st.run(f"w2wide/{m}", lambda: stage_w2(out_dir, cfg, ds, sc, seed, st, f"w2wide/{m}", list(cfg.w2_h_wide),
                                                   cfg.w2_trials_wide, 2))
    recomputed = sorted(k for k, v in st.log.items() if not v["cached"])
    history = history + [{"seconds": time.perf_counter() - t_start, "recomputed": recomputed, "finished_at": utc_now()}]
    return refresh(True, history)


def run_reproduce(out_dir: str | os.PathLike, quick: bool = False, seed: int = 0, progress: Progress = None,
                  config: ReproduceConfig | None = None) -> dict[str, Any]:
    """Reproduce the paper's experiments (docs/theory.md section 10) into ``out_dir``; resumable.

    ``quick``: ReproduceConfig.quick() instead of .full(); ``config`` overrides both.
    ``progress(stage, done, total)`` is called as stages advance. Returns the results dict
    (also written to ``out_dir/results.json``; report in ``out_dir/report.md``). Runs in
    float64 (``jax.enable_x64`` context), leaving the caller's JAX configuration unchanged."""
    cfg = config if config is not None else (ReproduceConfig.quick() if quick else ReproduceConfig.full())
    with jax.enable_x64(True):
        return _run(out_dir, cfg, seed, progress)


def run_demo(out_dir: str | os.PathLike, quick: bool = False, seed: int = 0, progress: Progress = None,
             config: ReproduceConfig | None = None) -> dict[str, Any]:
    """A few-minute demo (swiss roll, SIMPLE): short training, samples at several h (one PNG
    per h), NLL0 / C1 / C2, NLL(h) WKB lines vs Fokker-Planck, W2(h), results JSON/CSV and a
    short markdown summary (``out_dir/report.md``). Resumable like :func:`run_reproduce`."""
    cfg = config if config is not None else ReproduceConfig.demo_config(quick=quick)
    if not cfg.demo:
        cfg = dataclasses.replace(cfg, demo=True)
    with jax.enable_x64(True):
        return _run(out_dir, cfg, seed, progress)
