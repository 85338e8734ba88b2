"""The stages of the image noise study (docs/theory.md section 13.7).

One function per stage, each ``(out_dir, cfg, seed, stages, stage, ...) -> (json dict, arrays
dict | None)``: ``baseline`` (the closed-form Gaussian/PCA bits/dim), ``train`` (the U-Net score),
``classifier`` (the feature network of the sample-quality metric, cached), ``nll`` (NLL0 in
bits/dim and the one-loop C1 with its standard error on test images) and ``samples`` (images at
one h, their grid PNG, feature Frechet distance, class histogram and pixel W2).

Likelihoods run in float64 around a float32 network (its input is cast down and its output up,
as the 2-D study does for sampling; the solver, the divergence accumulation and the one-loop
fluctuation run in float64); sampling runs in float32.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import jax
import numpy as np

from hbar import nll, sample
from hbar.images.classifier import load_or_train_classifier
from hbar.images.datasets import dataset_info, load_images
from hbar.images.gaussian_baseline import image_baseline
from hbar.images.grid import save_image_grid
from hbar.images.preprocess import bits_per_dim, to_model_space
from hbar.images.quality import sample_quality
from hbar.ode import ODEOptions
from hbar.stats import mean_se
from hbar.studies.paper2024.experiments import Float32Score
from hbar.studies.stages import StageRunner
from hbar.training import TrainConfig, load_checkpoint, train

from .config import ImageStudyConfig

__all__ = ["stage_baseline", "stage_train", "stage_classifier", "stage_nll", "stage_paired", "stage_samples", "train_config",
           "model_dir", "h_tag"]


def h_tag(h: float) -> str:
    """Stage / file tag of a noise strength, e.g. ``h=0.25``."""
    return f"h={h:g}"


def model_dir(out_dir: str, cfg: ImageStudyConfig) -> str:
    """The training run directory of the study's model, ``out_dir/models/<dataset>``."""
    return os.path.join(out_dir, "models", cfg.dataset)


def train_config(cfg: ImageStudyConfig, seed: int) -> TrainConfig:
    """The data set's image preset (:meth:`TrainConfig.images`) with ``cfg.train`` overrides."""
    base = TrainConfig.images(dataset=cfg.dataset, seed=seed)
    if not cfg.train:
        return base
    return base.replace(**cfg.train)  # a 'network' entry replaces the preset's network as a whole


def _load_model(out_dir: str, cfg: ImageStudyConfig):
    score, schedule, _ = load_checkpoint(model_dir(out_dir, cfg))
    return score, schedule


def _test_points(cfg: ImageStudyConfig, seed: int, n: int) -> tuple[np.ndarray, Any]:
    """The first ``n`` test images of a seeded permutation, dequantised once with ``default_rng(seed + 1)``."""
    test = load_images(cfg.dataset, "test", n=n, seed=seed)
    return to_model_space(test.images, test.levels, np.random.default_rng(seed + 1)), test


def stage_baseline(out_dir: str, cfg: ImageStudyConfig, seed: int, stages: StageRunner, stage: str):
    """The closed-form Gaussian (PPCA) bits/dim on all test images (docs/theory.md section 13.3)."""
    b = image_baseline(cfg.dataset, k=cfg.baseline_components, seed=seed)
    return {**b, "info": dataset_info(cfg.dataset)}, None


def stage_train(out_dir: str, cfg: ImageStudyConfig, seed: int, stages: StageRunner, stage: str):
    """Train (or resume) the U-Net of :func:`train_config` into :func:`model_dir`."""
    tcfg = train_config(cfg, seed)
    rd = model_dir(out_dir, cfg)
    res = train(tcfg, rd, resume=True, progress=lambda s, tot, loss: stages.report(stage, s, tot))
    n_img = res.steps_done * tcfg.batch_size
    return {"dataset": cfg.dataset, "run_dir": os.path.relpath(rd, out_dir), "epochs": res.epochs_done,
            "steps": res.steps_done, "batch_size": tcfg.batch_size, "images_seen": n_img,
            "final_epoch_loss": float(res.losses[-1]) if len(res.losses) else None, "test_loss": res.test_loss,
            "train_seconds_this_call": res.seconds,
            "images_per_second_this_call": (n_img / res.seconds) if res.seconds else None,
            "config": tcfg.to_dict()}, None


def stage_classifier(out_dir: str, cfg: ImageStudyConfig, seed: int, stages: StageRunner, stage: str):
    """The feature classifier of the sample-quality metric, trained once and cached (section 13.6)."""
    _, record = load_or_train_classifier(os.path.join(out_dir, "classifier"), cfg.dataset, seed=seed,
                                         epochs=cfg.classifier_epochs)
    return {"record": record}, None


def stage_nll(out_dir: str, cfg: ImageStudyConfig, seed: int, stages: StageRunner, stage: str):
    """NLL0 and the one-loop C1 per test image (docs/theory.md sections 4, 5.7), in nats and bits/dim."""
    score, schedule = _load_model(out_dir, cfg)
    x, test = _test_points(cfg, seed, cfg.n_nll)
    d = x.shape[1]
    t0 = time.perf_counter()
    r = nll(Float32Score(score), schedule, x, order=1, method="one-loop", key=jax.random.PRNGKey(seed + 2),
            probes=cfg.probes, steps=list(cfg.ol_steps), options=ODEOptions(rtol=cfg.nll_tol, atol=cfg.nll_tol),
            batch_size=max(cfg.probes, 8), progress=stages.sub(stage))
    secs = time.perf_counter() - t0
    v = np.asarray(r.valid)
    to_bits = 1.0 / (d * math.log(2.0))
    nll0_bpd = np.asarray(bits_per_dim(r.nll0, d, test.levels))
    c1 = np.asarray(r.c1)
    c1_se = np.asarray(r.c1_se) if r.c1_se is not None else np.full_like(c1, np.nan)
    m0, s0 = mean_se(nll0_bpd[v])
    m1, s1 = mean_se(c1[v] * to_bits)
    js = {"n": int(x.shape[0]), "n_failed": int(r.n_failed), "d": d, "levels": test.levels, "tol": cfg.nll_tol,
          "probes": cfg.probes, "ol_steps": cfg.ol_steps, "divergence": r.divergence,
          "nll0_bpd": [m0, s0], "c1_bpd": [m1, s1],
          "c1_estimator_se_bpd": (r.c1_estimator_se * to_bits) if r.c1_estimator_se is not None else None,
          "c1_negative_fraction": float(np.mean(c1[v] < 0)) if v.any() else None,
          "ladder": _ladder_bits(r.extras.get("ladder"), to_bits),
          "seconds": secs, "seconds_per_image": secs / max(1, x.shape[0])}
    return js, {"nll0_nats": np.asarray(r.nll0), "nll0_bpd": nll0_bpd, "c1_nats": c1, "c1_se_nats": c1_se,
                "valid": v}


def stage_paired(out_dir: str, cfg: ImageStudyConfig, seed: int, stages: StageRunner, stage: str,
                 base_js: dict, nll_arr: dict):
    """The Gaussian baseline on exactly the images (and dequantisation draw) of the ``nll`` stage:
    the paired difference baseline - model in bits/dim per image, its mean and s.e. The baseline
    is refitted as in the ``baseline`` stage (same seed, its k and floor: the same fit)."""
    from hbar.images.gaussian_baseline import GaussianBaseline

    train_set = load_images(cfg.dataset, "train", seed=seed)
    model = GaussianBaseline.fit(to_model_space(train_set.images, train_set.levels, np.random.default_rng(seed)),
                                 k=int(base_js["k"]), floor=float(base_js["floor"]))
    x, test = _test_points(cfg, seed, cfg.n_nll)
    base_bpd = np.asarray(bits_per_dim(model.nll(x), x.shape[1], test.levels))
    v = np.asarray(nll_arr["valid"], dtype=bool)
    gap = base_bpd - np.asarray(nll_arr["nll0_bpd"])
    m, se = mean_se(gap[v])
    return {"n": int(v.sum()), "gap_bpd": [m, se], "baseline_bpd_same_images": list(mean_se(base_bpd[v]))}, \
        {"baseline_bpd": base_bpd, "gap_bpd": gap}


def _ladder_bits(ladder: dict | None, to_bits: float) -> dict | None:
    """The step-ladder summary of the one-loop C1 (docs/theory.md section 5.7) in bits/dim."""
    if not ladder:
        return None
    return {"steps": ladder["steps"], "level_means_bpd": [m * to_bits for m in ladder["mean"]],
            "observed_order": ladder["observed_order"], "extrapolated": ladder["extrapolated"],
            "disc_error_bpd": ladder["disc_error"] * to_bits, "mc_se_bpd": ladder["mc_se"] * to_bits,
            "total_error_bpd": ladder["total_error"] * to_bits}


def stage_samples(out_dir: str, cfg: ImageStudyConfig, seed: int, stages: StageRunner, stage: str, h: float):
    """``cfg.n_samples`` images at noise strength h, scored against the test split."""
    score, schedule = _load_model(out_dir, cfg)
    clf, _ = load_or_train_classifier(os.path.join(out_dir, "classifier"), cfg.dataset, seed=seed,
                                      epochs=cfg.classifier_epochs)
    test = load_images(cfg.dataset, "test", n=cfg.n_fd_reference, seed=seed + 3)
    ref = to_model_space(test.images, test.levels)
    t0 = time.perf_counter()
    res = sample(Float32Score(score), schedule, jax.random.PRNGKey(seed + 10), cfg.n_samples, h,
                 steps=cfg.sample_steps, d=test.d, batch_size=cfg.sample_batch, progress=stages.sub(stage))
    secs = time.perf_counter() - t0
    xs = np.asarray(res.samples, dtype=np.float64)
    ok = np.asarray(res.valid)
    n_ok = int(ok.sum())
    quality = None
    grid_png = None
    if n_ok >= 2:  # the scores need two valid samples; failed rows are counted, never scored
        q = sample_quality(xs[ok], ref, clf, reference_labels=test.labels, n_w2=min(cfg.n_w2, n_ok), seed=seed)
        quality = q.to_dict()
        grid_png = os.path.join(out_dir, "figures", f"samples_{h_tag(h)}.png")
        save_image_grid(grid_png, xs[ok][: cfg.grid_images], test.shape, test.levels,
                        scale=4 if test.shape[0] <= 8 else 2)
    js = {"h": h, "n": cfg.n_samples, "n_failed": int(res.n_failed), "steps": cfg.sample_steps, "method": res.method,
          "seconds": secs, "images_per_second": cfg.n_samples / secs if secs > 0 else None,
          "quality": quality, "grid": None if grid_png is None else os.path.relpath(grid_png, out_dir)}
    return js, {"samples_uint8": _to_uint8(xs, test)}


def _to_uint8(xs: np.ndarray, test: Any) -> np.ndarray:
    from hbar.images.preprocess import from_model_space

    return from_model_space(np.nan_to_num(xs, nan=-1.0, posinf=1.0, neginf=-1.0), test.shape, test.levels)
