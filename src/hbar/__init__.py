"""hbar: score-based diffusion in the path-integral picture (Hirono, Tanaka & Fukushima 2024)."""

from hbar.schedules import (
    CosineSchedule,
    LinearSchedule,
    OUSchedule,
    Schedule,
    SimpleSchedule,
    VESchedule,
    VPLinearSchedule,
    schedule_from_config,
)
from hbar.scores import AffineScore, GaussianMixtureScore, PerturbedScore, gaussian_score
from hbar.validation import HbarInputError

__version__ = "0.1.0"


def enable_x64() -> None:
    """Switch JAX to float64 (call before creating arrays; likelihoods want it)."""
    import jax

    jax.config.update("jax_enable_x64", True)
