"""Sizes of the paper2024 study (docs/theory.md section 10) and the per-model training setup."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from hbar.serialization import to_jsonable
from hbar.training import TrainConfig

__all__ = ["ReproduceConfig", "model_name", "model_train_config", "models_of"]


@dataclasses.dataclass(frozen=True)
class ReproduceConfig:
    """Every size of the reproduction. Tuples are h grids, tolerances or names.

    1-D Gaussian study (paper section 5.1, docs/theory.md section 10): data N(0, g1_v0), OU
    schedule with constant ``g1_beta`` on [g1_t_min, g1_T], score s = -(1 + eps) x / v_t for eps
    in ``g1_eps``. 2-D study (section 5.2): ``datasets`` x ``schedules`` (docs/theory.md
    section 9) trained with TrainConfig.paper and ``epochs`` epochs (paper: 16000), evaluated
    on ``n_test`` held-out points.
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
    # ---- step-converged path-integral NLL(h) (hbar.path.converged_path_nll) on the C2 points
    path_h: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5, 1.0)
    path_points: int = 30                    # first valid test points (WKB-2 / Pade need n_c2 >= path_points)
    path_tol: float = 1e-2                   # on both the MC s.e. and the discretisation error (nats)
    path_steps0: int = 100
    path_max_steps: int = 1600
    path_n_paths: int = 128
    path_max_paths: int = 2048
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
            w2_n=1000, w2_steps=500, path_points=20,
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
            w2_n=100, w2_steps=20, sample_plot_h=(0.0, 1.0), path_h=(1.0,), path_points=2,
            path_tol=0.2, path_steps0=10, path_max_steps=20, path_n_paths=32, path_max_paths=32,
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
            path_h=(0.1, 0.2, 0.5, 1.0), path_points=10 if quick else 20, path_tol=3e-2 if quick else 1.5e-2,
            path_max_steps=400 if quick else 800,
        )
        base.update(kw)
        return cls(**base)

    @classmethod
    def demo_tiny(cls, **kw: Any) -> ReproduceConfig:
        """The demo pipeline at test sizes (seconds); tolerances as :meth:`tiny` so that a test
        process running both reuses the compiled solvers."""
        base = dict(name="demo-tiny", epochs=5, n_test=16, nll_tol=1e-3, bound=1000.0, n_c2=2, fp_h=(0.5, 1.0), fp_points=16,
                    fp_tol=1e-1, fp_max_cells=48 * 48, fp_max_levels=2, w2_h_small=(0.0, 0.2), w2_h_wide=(0.0, 1.0),
                    w2_n=100, w2_steps=20, sample_plot_h=(0.0, 1.0), path_h=(0.5, 1.0), path_points=2,
                    path_tol=0.2, path_steps0=10, path_max_steps=40, path_n_paths=32, path_max_paths=64)
        base.update(kw)
        return cls.demo_config(quick=True, **base)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))


def model_name(dataset: str, schedule: str) -> str:
    return f"{dataset}-{schedule}"


def models_of(cfg: ReproduceConfig) -> list[tuple[str, str]]:
    """(dataset, schedule) of every 2-D model, in run order."""
    return [(ds, sc) for ds in cfg.datasets for sc in cfg.schedules]


def model_train_config(cfg: ReproduceConfig, dataset: str, schedule: str, seed: int) -> TrainConfig:
    """The TrainConfig of one model: the paper's (TrainConfig.paper) with ``epochs`` and
    ``n_test`` from the reproduction config (identical to the paper's in ``.full()``)."""
    return TrainConfig.paper(dataset, schedule, seed=seed, epochs=cfg.epochs, n_test=cfg.n_test,
                             checkpoint_every=max(1, min(1000, cfg.epochs)))
