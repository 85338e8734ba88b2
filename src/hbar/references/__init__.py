"""Closed-form and brute-force references: the test oracles of hbar (docs/theory.md sections 2, 7, 8).

Two independent ways to get the negative log-likelihood NLL(h) of the h-family of backward
processes (:class:`hbar.process.HProcess`, docs/theory.md section 2)

    dx = u(x, t) dt + sqrt(h) g(t) dw_bar,   u = f(t) x - (1+h)/2 g(t)^2 s(x, t),

run from t = T (x_T ~ prior pi = N(0, prior_std^2 I)) down to t_min, without any expansion in h:

1. :func:`gaussian_oracle` (:mod:`hbar.references.gaussian`) -- exact for an *affine* score
   s = A(t) x + b(t) in any dimension (docs/theory.md section 7). The marginals are Gaussian;
   their moments obey linear ODEs integrated together with their exact h-derivatives.
2. :func:`fokker_planck_nll` / :func:`fokker_planck_density` (:mod:`hbar.references.fokker_planck`)
   -- any score callable in d = 1, 2 (docs/theory.md section 8): the backward Fokker-Planck
   equation d_t q = -div(u q) - (h g^2 / 2) Lap q (t decreasing) is solved on a box grid with
   automatic grid/time-step refinement and Richardson extrapolation, reporting every level.
"""

from .factorised import factorised_oracle
from .fokker_planck import (
    FokkerPlanckDensity,
    FokkerPlanckLevel,
    FokkerPlanckResult,
    fokker_planck_density,
    fokker_planck_nll,
)
from .gaussian import GaussianOracleResult, gaussian_backward_moments, gaussian_chain_nll, gaussian_oracle

__all__ = [
    "GaussianOracleResult",
    "gaussian_oracle",
    "gaussian_backward_moments",
    "gaussian_chain_nll",
    "factorised_oracle",
    "FokkerPlanckLevel",
    "FokkerPlanckResult",
    "FokkerPlanckDensity",
    "fokker_planck_nll",
    "fokker_planck_density",
]
