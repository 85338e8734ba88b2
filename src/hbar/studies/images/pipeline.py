"""The driver of the image study (docs/theory.md section 13.7): stage order, results collection
and the refresh of ``out_dir`` (results.json, figures, report.md) after every stage.

float64 is switched on only inside :func:`run_images` (``jax.enable_x64``); importing this
module changes no global state.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import numpy as np

from hbar.locking import run_lock
from hbar.serialization import atomic_write
from hbar.studies.stages import Progress, StageRunner, load_stage, pin_config, utc_now, write_json

from .config import ImageStudyConfig
from .experiments import h_tag, stage_baseline, stage_classifier, stage_nll, stage_paired, stage_samples, stage_train
from .plots import plot_quality_h, plot_wkb_line
from .report import h_answer, render_report

__all__ = ["run_images", "collect_results"]

_FIXED = ("baseline", "train", "classifier", "nll", "paired")


def _stage_names(cfg: ImageStudyConfig) -> list[str]:
    return list(_FIXED) + [f"samples/{h_tag(h)}" for h in cfg.h_values]


def collect_results(out_dir: str, cfg: ImageStudyConfig, seed: int, complete: bool) -> dict[str, Any]:
    """The results dict of every finished stage in ``out_dir`` (plus the h answer)."""
    stages: dict[str, Any] = {}
    for n in _stage_names(cfg):
        js, _ = load_stage(out_dir, n)
        if js is not None and js.get("_complete"):
            stages[n] = js
    samples = {float(h): stages[f"samples/{h_tag(h)}"] for h in cfg.h_values if f"samples/{h_tag(h)}" in stages}
    fixed = {k: stages.get(k) for k in _FIXED}
    stage_seconds = {k: v.get("seconds") for k, v in stages.items()}
    param_count = None
    if fixed["train"]:
        from hbar.networks import param_count as count
        from hbar.training import load_checkpoint

        param_count = count(load_checkpoint(os.path.join(out_dir, fixed["train"]["run_dir"]))[0])
    return {"kind": "images", "config": cfg.to_dict(), "seed": seed, "complete": complete,
            "stages": fixed, "samples": {str(h): v for h, v in samples.items()},
            "answer": h_answer(fixed["nll"], samples), "param_count": param_count,
            "train_seconds_total": stage_seconds.get("train"),
            "stage_seconds": stage_seconds, "stages_missing": [n for n in _stage_names(cfg) if n not in stages],
            "updated_at": utc_now()}


def _figures(out_dir: str, res: dict[str, Any]) -> None:
    nl, base = res["stages"]["nll"], res["stages"]["baseline"]
    figs = os.path.join(out_dir, "figures")
    if nl:
        disc = (nl.get("ladder") or {}).get("disc_error_bpd") or 0.0
        positive = [h for h in res["config"]["h_values"] if h > 0]
        plot_wkb_line(os.path.join(figs, "nll_h.png"), nll0=nl["nll0_bpd"][0], nll0_se=nl["nll0_bpd"][1],
                      c1=nl["c1_bpd"][0], c1_se=float(np.hypot(nl["c1_bpd"][1], disc)),
                      baseline=base["test_bits_per_dim"] if base else None,
                      h_max=min(positive) if positive else 0.1)  # a slope at h = 0: drawn over the smallest h only
    s = {float(k): v for k, v in res["samples"].items()}
    s = {h: v for h, v in s.items() if v.get("quality")}
    if s:
        hs = sorted(s)
        q = [s[h]["quality"] for h in hs]
        plot_quality_h(os.path.join(figs, "quality_h.png"), hs, [x["fd"] for x in q], [x["fd_se"] for x in q],
                       q[0]["fd_floor"], [x["w2_pixels"] for x in q], q[0]["w2_floor"])


def _run(out_dir: str, cfg: ImageStudyConfig, seed: int, progress: Progress) -> dict[str, Any]:
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    pin_config(out_dir, cfg.to_dict(), seed)

    def refresh(final: bool) -> dict[str, Any]:
        res = collect_results(out_dir, cfg, seed, final)
        res["wall_seconds_this_call"] = time.perf_counter() - t_start
        _figures(out_dir, res)
        write_json(os.path.join(out_dir, "results.json"), res)
        atomic_write(os.path.join(out_dir, "report.md"), render_report(res).encode())
        return res

    st = StageRunner(out_dir, progress, on_done=lambda: refresh(False))
    base_js, _ = st.run("baseline", lambda: stage_baseline(out_dir, cfg, seed, st, "baseline"))
    for name, fn in (("train", stage_train), ("classifier", stage_classifier)):
        st.run(name, lambda fn=fn, name=name: fn(out_dir, cfg, seed, st, name))
    _, nll_arr = st.run("nll", lambda: stage_nll(out_dir, cfg, seed, st, "nll"))
    st.run("paired", lambda: stage_paired(out_dir, cfg, seed, st, "paired", base_js, nll_arr))
    for h in cfg.h_values:
        name = f"samples/{h_tag(h)}"
        st.run(name, lambda h=h, name=name: stage_samples(out_dir, cfg, seed, st, name, float(h)))
    return refresh(True)


def run_images(out_dir: str | os.PathLike, dataset: str = "mnist5k", quick: bool = False, seed: int = 0,
               progress: Progress = None, config: ImageStudyConfig | None = None) -> dict[str, Any]:
    """Run the image noise study into ``out_dir`` (resumable; report in ``out_dir/report.md``).

    ``quick``: :meth:`ImageStudyConfig.quick` (8x8 digits, about a minute) instead of
    :meth:`ImageStudyConfig.full` on ``dataset``; ``config`` overrides both. Runs in float64
    (``jax.enable_x64`` context), leaving the caller's JAX configuration unchanged."""
    cfg = config if config is not None else (ImageStudyConfig.quick() if quick else ImageStudyConfig.full(dataset))
    with run_lock(out_dir, "hbar study images"), jax.enable_x64(True):
        return _run(os.fspath(out_dir), cfg, int(seed), progress)
