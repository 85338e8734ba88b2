"""hbar: score-based diffusion in the path-integral picture (Hirono, Tanaka & Fukushima 2024).

The h-family of backward processes dx = [f - (1+h)/2 g^2 s] dt + sqrt(h) g dw_bar
(h = 1 reverse SDE, h = 0 probability-flow ODE) and what the noise does to it:
exact likelihoods, WKB corrections in h, brute-force and closed-form references.
"""

from hbar import adapters, data, metrics, networks, path, references, training  # noqa: E402  (submodules)
from hbar.likelihood import LikelihoodResult, bits_per_dim, nll
from hbar.ode import ODEOptions
from hbar.process import HProcess
from hbar.sampling import SampleResult, sample
from hbar.schedules import (
    CosineSchedule,
    DDPMSchedule,
    EDMSchedule,
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

__version__ = "0.4.0"

__all__ = [
    "HProcess", "sample", "SampleResult", "nll", "LikelihoodResult", "bits_per_dim", "ODEOptions",
    "Schedule", "SimpleSchedule", "CosineSchedule", "VPLinearSchedule", "VESchedule", "OUSchedule",
    "LinearSchedule", "DDPMSchedule", "EDMSchedule", "schedule_from_config",
    "AffineScore", "GaussianMixtureScore", "PerturbedScore", "gaussian_score", "HbarInputError", "enable_x64",
    "adapters", "data", "metrics", "networks", "path", "references", "training",
]


def enable_x64() -> None:
    """Switch JAX to float64 for the whole process (the caller's choice: importing hbar never does
    it, and likelihoods are computed in float64 whatever this setting, see hbar.precision)."""
    import jax

    jax.config.update("jax_enable_x64", True)
