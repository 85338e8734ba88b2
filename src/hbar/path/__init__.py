"""Path probabilities, path-space KL and a path-integral Monte Carlo likelihood
(docs/theory.md section 3).

Modules
-------
:mod:`hbar.path.densities`  Onsager–Machlup actions and log-densities of discretised forward /
                            backward paths; sampling such paths.
:mod:`hbar.path.kl`         KL(P^h || Q^h) = KL(p_T || pi) + (1+h)^2/(8h) int g^2 E||grad log p_t - s||^2 dt:
                            closed form, Monte Carlo over paths, the DSM-form bound on data, kl_prior.
:mod:`hbar.path.pimc`       Path-integral Monte Carlo estimate of log q^h(x) of the time-discretised
                            h-model (:func:`path_log_likelihood`, :func:`path_nll`) and the
                            step-converged NLL(h) with separate MC / discretisation errors
                            (:func:`converged_path_nll`).

Conventions
-----------
A discretised path is an array ``path`` of shape (steps + 1, n, d) with its time grid ``times``
of shape (steps + 1,); ``path[k]`` holds the n states at ``times[k]``. Forward paths are stored
along increasing times (t_min -> T), backward paths along decreasing times (T -> t_min), as they
are generated; every log-probability function accepts either order, so the same stored path can
be scored under both models (a path density is a density of the path variable, not of its
storage).

Every process is written in forward-time notation, dx = F(x, t) dt + sqrt(h g(t)^2) dw, and all
drifts and variances come from :class:`hbar.process.HProcess`:

* forward h-process  F = ``forward_drift`` = f x - (1-h)/2 g^2 s, travels t_min -> T
  (h = 1: the noising process dx = f x dt + g dw, no score needed);
* backward h-model   F = ``drift`` = u_h = f x - (1+h)/2 g^2 s, travels T -> t_min;
* variance rate      ``diffusion2`` = h g^2.
"""

from hbar.path._checks import CONVENTIONS
from hbar.path.densities import (
    PathSample,
    backward_path_action,
    backward_path_logp,
    forward_h_drift,
    forward_path_action,
    forward_path_logp,
    sample_backward_paths,
    sample_forward_paths,
)
from hbar.path.kl import (
    PathKLBound,
    kl_prior,
    path_kl_bound,
    path_kl_closed_form,
    path_kl_monte_carlo,
    score_error_integral,
)
from hbar.path.pimc import (
    PROPOSALS,
    ConvergedPathNLL,
    PathLikelihoodResult,
    PathNLLResult,
    converged_path_nll,
    path_log_likelihood,
    path_nll,
)

__all__ = [
    "CONVENTIONS",
    "PROPOSALS",
    "forward_h_drift",
    "forward_path_action",
    "forward_path_logp",
    "backward_path_action",
    "backward_path_logp",
    "PathSample",
    "sample_forward_paths",
    "sample_backward_paths",
    "kl_prior",
    "score_error_integral",
    "path_kl_closed_form",
    "path_kl_monte_carlo",
    "PathKLBound",
    "path_kl_bound",
    "PathLikelihoodResult",
    "path_log_likelihood",
    "PathNLLResult",
    "path_nll",
    "ConvergedPathNLL",
    "converged_path_nll",
]
