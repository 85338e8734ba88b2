"""Path probabilities, path-space KL and a path-integral Monte Carlo likelihood (theory.md section 3).

Conventions
-----------
A discretised path is an array ``path`` of shape (steps + 1, n, d) together with its time grid
``times`` of shape (steps + 1,); ``path[k]`` holds the n states at ``times[k]``. Forward paths
are stored along increasing times (t_min -> T), backward paths along decreasing times
(T -> t_min), as they are generated; every log-probability function below accepts either order
and reorders internally, so the *same* stored path can be scored under both the forward and
the backward model (a path density is a density of the path variable, not of its storage).

Every process here is written in forward-time notation, dx = F(x, t) dt + sqrt(h g(t)^2) dw, and
travels along its grid; one step goes from (x_a, t_a) to (x_b, t_b) with dt = t_b - t_a
(negative for a backward process) and D = |dt|:

* forward h-process   F = v_h = f x - (1-h)/2 g^2 s,   diffusion sqrt(h) g, travels t_min -> T
  (h = 1: the noising process dx = f x dt + g dw, no score needed);
* backward h-model    F = u_h = f x - (1+h)/2 g^2 s,   diffusion sqrt(h) g, travels T -> t_min
  (:func:`hbar.sampling.backward_drift`).

Transition densities and the Onsager–Machlup action (theory.md section 3). With a residual
r_k = x_b - x_a - F(x*, t*) dt and variance V_k = h g(t*)^2 D,

* Ito (alpha = 0):      (x*, t*) = (x_a, t_a), no Jacobian term. This is exactly the
  Euler–Maruyama transition N(x_b; x_a + F dt, V I) that :func:`hbar.sampling.sample` uses.
* midpoint (alpha = 1/2): (x*, t*) = ((x_a + x_b)/2, (t_a + t_b)/2), Jacobian term
  J_k = (dt/2) div F(x*, t*). It is the first-order expansion of the log-Jacobian
  -log det(I - dt/2 dF/dx) of the implicit midpoint transition, exact up to O(D^2) per step.
  For the forward process J = 1/2 int div f dt (= d f D / 2 per step); for the backward model,
  which travels with dt < 0, J_k = -(D/2) div u_h = -(D/2) [d f - (1+h)/2 g^2 div s], i.e.
  1/2 int div(-u_h) dtau in its own time tau = -t.

    A[x]    = sum_k ||r_k||^2 / (2 V_k) + sum_k J_k                     (the action)
    log P[x] = log p_start(x_0) - A[x] - sum_k (d/2) log(2 pi V_k)       (the path log-density)

p_start is the data density for forward paths (optional; without it the density is
conditional on the initial point) and the prior pi for backward paths. With the Ito
convention this is exactly the sum of the Gaussian transition log-densities.

Path-space KL (theory.md section 3). For h > 0 the KL between path measures is finite only
between processes with the same diffusion sqrt(h) g. The data process with diffusion sqrt(h) g
whose time reversal is the h-backward process with the *true* score is the forward h-process
P^h (drift f x - (1-h)/2 g^2 grad log p_t, started from p_data; P^1 is the noising process).
Girsanov gives

    KL(P^h || Q^h) = KL(p_T || pi) + (1+h)^2/(8h) int g^2 E_{p_t} ||grad log p_t - s||^2 dt,

and by the data-processing inequality it bounds KL(p_data || q^h_{t_min}). For h != 1 and the
plain noising process P^1 the KL is infinite (different diffusion coefficients), which is why
the Monte Carlo check samples P^h with the true score.

Path-integral Monte Carlo likelihood: see :func:`path_log_likelihood`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.derivatives import divergence
from hbar.sampling import backward_drift, sample, simulate_path, time_grid
from hbar.schedules import Schedule
from hbar.scores import AffineScore, GaussianMixtureScore
from hbar.validation import HbarInputError, check_h, check_points, check_positive_int

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
]

CONVENTIONS = ("ito", "midpoint")
PROPOSALS = ("reverse", "forward")


# ----------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------
def _check_h_positive(h: Any, name: str = "h") -> np.ndarray:
    arr = check_h(h, name)
    if np.any(arr <= 0):
        raise HbarInputError(f"{name} must be > 0 here (a path density / path KL needs noise; "
                             f"h = 0 is the deterministic probability-flow limit), got {h}")
    return arr


def _check_convention(convention: str) -> str:
    if convention not in CONVENTIONS:
        raise HbarInputError(f"unknown convention {convention!r}; choose from {CONVENTIONS}")
    return convention


def _orient(schedule: Schedule, path: Any, times: Any, increasing: bool) -> tuple[Array, Array]:
    """Validate a (steps + 1, n, d) path and its (steps + 1,) grid; return them ordered along
    increasing (forward) or decreasing (backward) times."""
    try:
        ts = np.asarray(times, dtype=float)
    except Exception as err:  # traced or unreadable
        raise HbarInputError(f"times must be a concrete 1-D array: {err}") from err
    if ts.ndim != 1 or ts.size < 2:
        raise HbarInputError(f"times must have shape (steps + 1,) with steps >= 1, got {ts.shape}")
    schedule.check_time(ts, "path times")
    diffs = np.diff(ts)
    if not (np.all(diffs > 0) or np.all(diffs < 0)):
        raise HbarInputError("times must be strictly increasing or strictly decreasing")
    p = jnp.asarray(path, dtype=jnp.result_type(float))
    if p.ndim != 3 or p.shape[0] != ts.size:
        raise HbarInputError(f"path must have shape (steps + 1 = {ts.size}, n, d), got {p.shape}")
    if not bool(jnp.all(jnp.isfinite(p))):
        raise HbarInputError("path contains NaN or inf")
    if (diffs[0] > 0) != increasing:
        p, ts = p[::-1], ts[::-1]
    return p, jnp.asarray(ts.copy(), dtype=p.dtype)


def _score_dim_check(score: Callable, d: int) -> None:
    dim = getattr(score, "dim", None)
    if dim is not None and int(dim) != d:
        raise HbarInputError(f"points have dimension {d}, but the score has dimension {int(dim)}")


# ----------------------------------------------------------------------------------------------
# drifts and the generic chain density
# ----------------------------------------------------------------------------------------------
def forward_h_drift(score: Callable | None, schedule: Schedule, h: float | Array) -> Callable[[Array, Array], Array]:
    """v_h(x, t) = f(t) x - (1-h)/2 g(t)^2 s(x, t): drift of the forward h-process, the time
    reversal of the h-backward model when s is the true score. For h = 1 the score is not used
    (``score`` may be None). Shapes (n, d) -> (n, d)."""
    if score is None:
        if not (isinstance(h, (int, float)) and float(h) == 1.0):
            raise HbarInputError("the forward h-process with h != 1 needs a score (the true score for P^h)")
        return lambda x, t: schedule.f(t) * x

    def v(x: Array, t: Array) -> Array:
        return schedule.f(t) * x - 0.5 * (1.0 - h) * schedule.g2(t) * score(x, t)

    return v


def _log_normal(resid: Array, var: Array) -> Array:
    """log N(resid; 0, var I) per row; resid (..., d), var broadcastable to resid[..., 0]."""
    d = resid.shape[-1]
    return -0.5 * jnp.sum(resid**2, axis=-1) / var - 0.5 * d * jnp.log(2 * jnp.pi * var)


def _chain_terms(drift: Callable, g2: Callable, h: Array, path: Array, times: Array,
                 convention: str) -> tuple[Array, Array, Array]:
    """Per-path sums over the steps of a path ordered along ``times`` (either direction).

    Returns (quadratic, jacobian, normalisation), each (n,):
    sum ||r_k||^2 / (2 V_k), sum J_k and sum (d/2) log(2 pi V_k) (see the module docstring)."""
    d = path.shape[-1]

    def one(xa, xb, ta, tb):
        dt = tb - ta
        if convention == "ito":
            xs, ts = xa, ta
            F = drift(xs, ts)
            jac = jnp.zeros(xa.shape[0], xa.dtype)
        else:
            xs, ts = 0.5 * (xa + xb), 0.5 * (ta + tb)
            F, div = divergence(lambda z: drift(z, ts), xs)
            jac = 0.5 * dt * div
        var = h * g2(ts) * jnp.abs(dt)
        r = xb - xa - F * dt
        quad = 0.5 * jnp.sum(r**2, axis=-1) / var
        norm = 0.5 * d * jnp.log(2 * jnp.pi * var) * jnp.ones_like(quad)
        return quad, jac, norm

    q, j, nrm = jax.vmap(one)(path[:-1], path[1:], times[:-1], times[1:])
    return q.sum(0), j.sum(0), nrm.sum(0)


@eqx.filter_jit
def _forward_terms(score, schedule, h, path, times, convention):
    drift = forward_h_drift(score, schedule, h) if score is not None else (lambda x, t: schedule.f(t) * x)
    return _chain_terms(drift, schedule.g2, h, path, times, convention)


@eqx.filter_jit
def _backward_terms(score, schedule, h, path, times, convention):
    return _chain_terms(backward_drift(score, schedule, h), schedule.g2, h, path, times, convention)


def _forward_setup(schedule, path, times, h, score, convention):
    _check_convention(convention)
    hv = float(_check_h_positive(h)[0])
    if hv != 1.0 and score is None:
        raise HbarInputError("the forward h-process with h != 1 needs a score (the true score for P^h)")
    p, ts = _orient(schedule, path, times, increasing=True)
    if score is not None:
        _score_dim_check(score, p.shape[-1])
    return p, ts, hv


def forward_path_action(schedule: Schedule, path: Any, times: Any, *, h: float = 1.0,
                        score: Callable | None = None, convention: str = "ito") -> Array:
    """Onsager–Machlup action A[x] of discretised paths under the forward h-process
    dx = [f x - (1-h)/2 g^2 s] dt + sqrt(h) g dw (h = 1, score None: the noising process
    dx = f x dt + g dw), theory.md section 3:

        A = sum_k ||x_{k+1} - x_k - F(x*, t*) D_k||^2 / (2 h g(t*)^2 D_k) + J,

    Ito: (x*, t*) = start of the step, J = 0; midpoint: midpoint, J = sum_k (D_k/2) div F(x*, t*)
    (= 1/2 int div f dt for the noising process). path (steps + 1, n, d), times (steps + 1,)
    in either order. Returns (n,)."""
    p, ts, hv = _forward_setup(schedule, path, times, h, score, convention)
    q, j, _ = _forward_terms(score if hv != 1.0 else None, schedule, jnp.asarray(hv, p.dtype), p, ts, convention)
    return q + j


def forward_path_logp(schedule: Schedule, path: Any, times: Any, *, h: float = 1.0,
                      score: Callable | None = None, log_p0: Callable[[Array], Array] | None = None,
                      convention: str = "ito") -> Array:
    """Log-density of discretised forward paths (theory.md section 3):

        log P[x] = log p0(x_{t_min}) - A[x] - sum_k (d/2) log(2 pi h g(t*)^2 D_k),

    with A from :func:`forward_path_action`. For the Ito convention this is exactly
    log p0 + sum_k log N(x_{k+1}; x_k + F(x_k, t_k) D_k, h g(t_k)^2 D_k I). ``log_p0``
    (callable (n, d) -> (n,)) is the data log-density; None gives the density conditional on
    the initial point. Returns (n,)."""
    p, ts, hv = _forward_setup(schedule, path, times, h, score, convention)
    q, j, nrm = _forward_terms(score if hv != 1.0 else None, schedule, jnp.asarray(hv, p.dtype), p, ts, convention)
    out = -(q + j) - nrm
    if log_p0 is not None:
        out = out + log_p0(p[0])
    return out


def _backward_setup(score, schedule, h, path, times, convention):
    _check_convention(convention)
    hv = float(_check_h_positive(h)[0])
    p, ts = _orient(schedule, path, times, increasing=False)
    _score_dim_check(score, p.shape[-1])
    return p, ts, hv


def backward_path_action(score: Callable, schedule: Schedule, h: float, path: Any, times: Any, *,
                         convention: str = "ito") -> Array:
    """Action of discretised paths under the h-backward model (theory.md section 3),
    L^h = ||xdot - f x + (1+h)/2 g^2 s||^2 / (2 h g^2):

        A = sum_k ||x_{k+1} - x_k + u_h(x*, t*) D_k||^2 / (2 h g(t*)^2 D_k) + J,
        u_h = f x - (1+h)/2 g^2 s,

    along the decreasing grid T -> t_min (D_k = t_k - t_{k+1} > 0). Ito: (x*, t*) = (x_k, t_k),
    J = 0. Midpoint: J = -sum_k (D_k/2) div u_h(x*, t*) = -sum_k (D_k/2)[d f - (1+h)/2 g^2 div s]
    (exact divergence, d jvps). h > 0. Returns (n,)."""
    p, ts, hv = _backward_setup(score, schedule, h, path, times, convention)
    q, j, _ = _backward_terms(score, schedule, jnp.asarray(hv, p.dtype), p, ts, convention)
    return q + j


def backward_path_logp(score: Callable, schedule: Schedule, h: float, path: Any, times: Any, *,
                       convention: str = "ito", include_prior: bool = True) -> Array:
    """Log-density of discretised paths under the h-backward model started from the prior:

        log Q^h[x] = log pi(x_T) - A^h[x] - sum_k (d/2) log(2 pi h g(t*)^2 D_k).

    With the Ito convention this equals log pi(x_T) + sum_k log N(x_{k+1}; x_k - u_h(x_k, t_k) D_k,
    h g(t_k)^2 D_k I), the exact density of the Euler–Maruyama chain of
    :func:`hbar.sampling.sample`. ``include_prior=False`` drops log pi (density conditional on
    x_T). path (steps + 1, n, d), times (steps + 1,) in either order. Returns (n,)."""
    p, ts, hv = _backward_setup(score, schedule, h, path, times, convention)
    q, j, nrm = _backward_terms(score, schedule, jnp.asarray(hv, p.dtype), p, ts, convention)
    out = -(q + j) - nrm
    if include_prior:
        out = out + schedule.prior_logp(p[0])
    return out


# ----------------------------------------------------------------------------------------------
# sampling paths
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PathSample:
    """Sampled discretised paths and their log-densities.

    path: (steps + 1, n, d) ordered along ``times`` (increasing for forward paths, decreasing
    for backward ones); times: (steps + 1,); logp: (n,) path log-density (Ito convention unless
    stated; forward paths: including log p0 if it was given, else conditional on x_{t_min});
    h: noise strength; direction: "forward" | "backward"."""

    path: np.ndarray
    times: np.ndarray
    logp: np.ndarray
    h: float
    direction: str
    convention: str = "ito"


def sample_forward_paths(schedule: Schedule, x0: Any, key: Array, steps: int, *, h: float = 1.0,
                         score: Callable | None = None, log_p0: Callable[[Array], Array] | None = None,
                         convention: str = "ito") -> PathSample:
    """Euler–Maruyama paths of the forward h-process from data points x0 (n, d) at t_min up to T
    on the uniform grid of ``steps`` steps (h = 1, score None: the noising process dx = f x dt
    + g dw; h != 1 needs the score, the true one for P^h). Uses :func:`hbar.sampling.simulate_path`.
    Returns a :class:`PathSample` with path (steps + 1, n, d) along increasing times and
    logp (n,) from :func:`forward_path_logp`."""
    xs = check_points(x0, "x0")
    steps = check_positive_int(steps, "steps")
    hv = float(_check_h_positive(h)[0])
    x = jnp.asarray(xs, dtype=jnp.result_type(float))
    if score is not None:
        _score_dim_check(score, x.shape[1])
    ts = np.asarray(time_grid(schedule, steps, t_start=schedule.t_min, t_end=schedule.T))
    drift = forward_h_drift(score if hv != 1.0 else None, schedule, hv)
    path = jax.jit(lambda xx, kk: simulate_path(drift, schedule.g2, xx, ts, kk, h=hv))(x, key)
    logp = forward_path_logp(schedule, path, ts, h=hv, score=score, log_p0=log_p0, convention=convention)
    return PathSample(np.asarray(path), ts, np.asarray(logp), hv, "forward", convention)


def sample_backward_paths(score: Callable, schedule: Schedule, key: Array, n: int, h: float, steps: int, *,
                          d: int | None = None, convention: str = "ito") -> PathSample:
    """Euler–Maruyama paths of the h-backward model from the prior (via
    :func:`hbar.sampling.sample` with ``return_path=True``), with their log-densities from
    :func:`backward_path_logp` (including log pi). h > 0. Returns a :class:`PathSample` with path
    (steps + 1, n, d) along decreasing times T -> t_min."""
    hv = float(_check_h_positive(h)[0])
    res = sample(score, schedule, key, n, hv, steps=steps, method="euler", d=d, return_path=True)
    logp = backward_path_logp(score, schedule, hv, res.path, res.times, convention=convention)
    return PathSample(res.path, res.times, np.asarray(logp), hv, "backward", convention)


# ----------------------------------------------------------------------------------------------
# ground truth helpers (Gaussian / Gaussian-mixture data)
# ----------------------------------------------------------------------------------------------
class _Truth:
    """The data distribution behind an exact analytic score: AffineScore (Gaussian data, must be
    unperturbed) or GaussianMixtureScore. Provides score, sampling, log p_t and Gaussian moments."""

    def __init__(self, truth: Any, schedule: Schedule):
        if isinstance(truth, AffineScore):
            if truth.scale_eps != 0.0 or bool(jnp.any(truth.shift != 0)):
                raise HbarInputError("truth must be the exact score (AffineScore with scale_eps = 0 and no shift)")
            self.gaussian = True
            self.mean, self.cov = truth.mean, truth.cov
        elif isinstance(truth, GaussianMixtureScore):
            self.gaussian = False
        else:
            raise HbarInputError("truth must be an exact AffineScore (Gaussian data) or a GaussianMixtureScore")
        if truth.schedule != schedule:
            raise HbarInputError("truth was built for a different schedule than the one given")
        self.score = truth
        self.schedule = schedule
        self.dim = truth.dim

    def moments(self, t):
        a, s2 = self.schedule.alpha(t), self.schedule.sigma2(t)
        return a * self.mean, a**2 * self.cov + s2 * jnp.eye(self.dim, dtype=self.cov.dtype)

    def log_density(self, x: Array, t) -> Array:
        if not self.gaussian:
            return self.score.log_density(x, t)
        m, C = self.moments(t)
        L = jnp.linalg.cholesky(C)
        y = jax.scipy.linalg.solve_triangular(L, (x - m).T, lower=True)
        return (-0.5 * jnp.sum(y**2, axis=0) - jnp.sum(jnp.log(jnp.diag(L)))
                - 0.5 * self.dim * jnp.log(2 * jnp.pi))

    def log_p0(self, x: Array) -> Array:
        return self.log_density(x, 0.0)

    def sample_data(self, key: Array, n: int) -> Array:
        if not self.gaussian:
            return self.score.sample_data(key, n)
        z = jax.random.normal(key, (n, self.dim), dtype=self.mean.dtype)
        return self.mean + z @ jnp.linalg.cholesky(self.cov).T


def _gauss_kl_to_prior(m: Array, C: Array, prior_var: float) -> float:
    d = m.shape[0]
    sign, logdet = np.linalg.slogdet(np.asarray(C))
    return float(0.5 * (np.trace(np.asarray(C)) / prior_var + float(m @ m) / prior_var - d
                        + d * math.log(prior_var) - logdet))


def kl_prior(schedule: Schedule, *, truth: Any = None, data: Any = None, key: Array | None = None,
             n_samples: int = 2000) -> dict[str, Any]:
    """KL(p_T || pi), the prior-mismatch term of the path KL.

    * truth = exact AffineScore (Gaussian data): closed form between N(alpha m0, alpha^2 S0 +
      sigma^2 I) and pi (se = 0, method "exact").
    * truth = GaussianMixtureScore: Monte Carlo E_{p_T}[log p_T - log pi] with exact log p_T.
    * data only: Monte Carlo for the *diffused empirical* distribution p_T = (1/n) sum_i
      N(alpha(T) x_i, sigma(T)^2 I) (the true p_T of the data distribution is unknown; the two
      agree when alpha(T) is small or n is large).

    Returns dict(value, se, method)."""
    T = schedule.T
    if truth is not None:
        tr = _Truth(truth, schedule)
        if tr.gaussian:
            m, C = tr.moments(T)
            return dict(value=_gauss_kl_to_prior(m, C, schedule.prior_std**2), se=0.0, method="exact")
        if key is None:
            raise HbarInputError("kl_prior: Monte Carlo needs a PRNG key")
        k1, k2 = jax.random.split(key)
        x0 = tr.sample_data(k1, n_samples)
        xT, _ = schedule.marginal_sample(k2, x0, jnp.full((n_samples,), T))
        vals = np.asarray(tr.log_density(xT, T) - schedule.prior_logp(xT))
        return dict(value=float(vals.mean()), se=float(vals.std(ddof=1) / math.sqrt(n_samples)),
                    method="monte-carlo (exact log p_T)")
    if data is None:
        raise HbarInputError("kl_prior needs truth=... or data=...")
    if key is None:
        raise HbarInputError("kl_prior: Monte Carlo needs a PRNG key")
    xd = jnp.asarray(check_points(data, "data"), dtype=jnp.result_type(float))
    n, d = xd.shape
    a, s2 = schedule.alpha(T), schedule.sigma2(T)
    k1, k2 = jax.random.split(key)
    idx = jax.random.randint(k1, (n_samples,), 0, n)
    xT = a * xd[idx] + jnp.sqrt(s2) * jax.random.normal(k2, (n_samples, d), dtype=xd.dtype)

    @jax.jit
    def log_pT(x):
        def one(xi):
            r = jnp.sum((xi[None] - a * xd) ** 2, axis=-1)
            return jax.nn.logsumexp(-0.5 * r / s2) - math.log(n) - 0.5 * d * jnp.log(2 * jnp.pi * s2)
        return jax.lax.map(one, x, batch_size=64)

    vals = np.asarray(log_pT(xT) - schedule.prior_logp(xT))
    return dict(value=float(vals.mean()), se=float(vals.std(ddof=1) / math.sqrt(n_samples)),
                method="monte-carlo (diffused empirical p_T)")


# ----------------------------------------------------------------------------------------------
# the score-error integral
# ----------------------------------------------------------------------------------------------
def _quadrature(schedule: Schedule, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Legendre nodes/weights for int_{t_min}^T ... dt, in u = log t when t_min > 0
    (resolves the 1/t behaviour of g^2/sigma^2 near t_min), else in t."""
    u, w = np.polynomial.legendre.leggauss(n_nodes)
    if schedule.t_min > 0:
        a, b = math.log(schedule.t_min), math.log(schedule.T)
        lt = 0.5 * (b - a) * u + 0.5 * (b + a)
        t = np.exp(lt)
        return t, 0.5 * (b - a) * w * t
    t = 0.5 * (schedule.T - schedule.t_min) * u + 0.5 * (schedule.T + schedule.t_min)
    return t, 0.5 * (schedule.T - schedule.t_min) * w


def score_error_integral(score: Callable, schedule: Schedule, key: Array | None = None, *,
                         truth: Any = None, data: Any = None, n_samples: int = 1000,
                         quad_nodes: int = 48) -> dict[str, Any]:
    """I[s] = int_{t_min}^T g^2 E ||target - s||^2 dt (theory.md section 3), by Gauss–Legendre
    quadrature in log t (``quad_nodes`` nodes) and, where needed, Monte Carlo over the marginal.

    * truth given (exact AffineScore or GaussianMixtureScore): target = grad log p_t, the exact
      score error. Closed form when the truth is Gaussian and the model has ``.affine``
      (E||D x + e||^2 = tr(D S_t D^T) + ||D m_t + e||^2, method "exact"); otherwise Monte
      Carlo with x_t ~ p_t.
    * data only: the denoising form E_{x0, z} ||s(alpha x0 + sigma z, t) + z/sigma||^2 (DSM).
      By the denoising identity it equals the score error plus the s-independent constant
      int g^2 E||z/sigma + grad log p_t||^2 dt (= int g^2 [d/sigma^2 - E||grad log p_t||^2] dt).

    The Monte Carlo standard error is over the n_samples data draws (each carries its own
    noise at every node); the quadrature error is not included. Returns dict(value, se, kind,
    method) with kind "score-error" or "dsm"."""
    t_nodes, w_nodes = _quadrature(schedule, check_positive_int(quad_nodes, "quad_nodes"))
    dtype = jnp.result_type(float)
    if truth is not None:
        tr = _Truth(truth, schedule)
        _score_dim_check(score, tr.dim)
        if tr.gaussian and hasattr(score, "affine"):
            def node(t):
                A_s, b_s = tr.score.affine(t)
                A_m, b_m = score.affine(t)
                D, e = A_s - A_m, b_s - b_m
                m, C = tr.moments(t)
                return schedule.g2(t) * (jnp.trace(D @ C @ D.T) + jnp.sum((D @ m + e) ** 2))
            vals = jax.jit(jax.vmap(node))(jnp.asarray(t_nodes, dtype))
            return dict(value=float(np.sum(w_nodes * np.asarray(vals))), se=0.0, kind="score-error",
                        method="exact")
        if key is None:
            raise HbarInputError("score_error_integral: Monte Carlo needs a PRNG key")
        k0, kz = jax.random.split(key)
        x0 = tr.sample_data(k0, n_samples)
        target = tr.score
        kind = "score-error"
    else:
        if data is None:
            raise HbarInputError("score_error_integral needs truth=... or data=...")
        if key is None:
            raise HbarInputError("score_error_integral: Monte Carlo needs a PRNG key")
        xd = jnp.asarray(check_points(data, "data"), dtype=dtype)
        _score_dim_check(score, xd.shape[1])
        k0, kz = jax.random.split(key)
        x0 = xd[jax.random.randint(k0, (n_samples,), 0, xd.shape[0])] if n_samples != xd.shape[0] else xd
        target = None
        kind = "dsm"

    @jax.jit
    def per_sample(x0, kz):
        def node(carry, inp):
            j, t, w = inp
            a, sig = schedule.alpha(t), schedule.sigma(t)
            z = jax.random.normal(jax.random.fold_in(kz, j), x0.shape, dtype=x0.dtype)
            xt = a * x0 + sig * z
            ref = -z / sig if target is None else target(xt, t)
            return carry + w * schedule.g2(t) * jnp.sum((ref - score(xt, t)) ** 2, axis=-1), None

        idx = jnp.arange(len(t_nodes))
        out, _ = jax.lax.scan(node, jnp.zeros(x0.shape[0], x0.dtype),
                              (idx, jnp.asarray(t_nodes, dtype), jnp.asarray(w_nodes, dtype)))
        return out

    vals = np.asarray(per_sample(x0, kz))
    return dict(value=float(vals.mean()), se=float(vals.std(ddof=1) / math.sqrt(vals.size)), kind=kind,
                method="monte-carlo")


def _kl_factor(h: np.ndarray) -> np.ndarray:
    return (1.0 + h) ** 2 / (8.0 * h)


def path_kl_closed_form(score: Callable, schedule: Schedule, h: float | Sequence[float], truth: Any,
                        key: Array | None = None, *, n_samples: int = 2000, quad_nodes: int = 64) -> dict[str, Any]:
    """KL(P^h || Q^h) = KL(p_T || pi) + (1+h)^2/(8h) int g^2 E_{p_t}||grad log p_t - s||^2 dt
    (theory.md section 3) for a known truth (exact AffineScore or GaussianMixtureScore) and any
    model score; h > 0 (scalar or list). Exact (up to quadrature) for Gaussian truth with an affine
    model, Monte Carlo otherwise. Returns dict(h (m,), kl (m,), se (m,), kl_prior, score_error)."""
    hs = _check_h_positive(h)
    kp = kl_prior(schedule, truth=truth, key=key, n_samples=n_samples)
    k2 = None if key is None else jax.random.fold_in(key, 1)
    se_int = score_error_integral(score, schedule, k2, truth=truth, n_samples=n_samples, quad_nodes=quad_nodes)
    fac = _kl_factor(hs)
    kl = kp["value"] + fac * se_int["value"]
    se = np.sqrt(kp["se"] ** 2 + (fac * se_int["se"]) ** 2)
    return dict(h=hs, kl=kl, se=se, kl_prior=kp, score_error=se_int)


def path_kl_monte_carlo(score: Callable, schedule: Schedule, h: float, truth: Any, key: Array, *,
                        n_paths: int = 1000, steps: int = 200, convention: str = "ito") -> dict[str, Any]:
    """Direct Monte Carlo of the path KL of the *time-discretised* processes,
    E_{P^h}[log P^h_disc(x) - log Q^h_disc(x)], from sampled paths.

    Paths x are drawn from the Euler–Maruyama chain of the forward h-process P^h (drift
    f x - (1-h)/2 g^2 grad log p_t with the true score, diffusion sqrt(h) g), started from the
    true marginal p_{t_min} (the analytic truths put the data at t = 0; the process on
    [t_min, T] starts from their diffused version, whose score is grad log p_{t_min}), and
    on the uniform grid of ``steps`` steps; log P^h_disc = log p_{t_min}(x_{t_min}) + sum of its
    forward Euler transition log-densities, log Q^h_disc = log pi(x_T) + sum of the backward
    Euler transition log-densities of the model (the chain :func:`hbar.sampling.sample` runs)
    on the same grid, both evaluated on the same path variable. This is the exact KL between the
    two discrete chains; it converges to the closed form as steps -> infinity (O(dt); with a
    time-varying g the forward and backward Euler variances differ at each step, which adds an
    O(dt) term that is largest near t_min). Returns dict(value, se, n_paths, steps)."""
    hv = float(_check_h_positive(h)[0])
    tr = _Truth(truth, schedule)
    _score_dim_check(score, tr.dim)
    n_paths = check_positive_int(n_paths, "n_paths")
    k1, k2, k3 = jax.random.split(key, 3)
    x0, _ = schedule.marginal_sample(k3, tr.sample_data(k1, n_paths), jnp.full((n_paths,), schedule.t_min))
    ps = sample_forward_paths(schedule, x0, k2, steps, h=hv, score=tr.score,
                              log_p0=lambda z: tr.log_density(z, schedule.t_min), convention=convention)
    logq = np.asarray(backward_path_logp(score, schedule, hv, ps.path, ps.times, convention=convention))
    lr = ps.logp - logq
    return dict(value=float(lr.mean()), se=float(lr.std(ddof=1) / math.sqrt(n_paths)), n_paths=n_paths,
                steps=int(steps))


@dataclasses.dataclass
class PathKLBound:
    """Path-space KL between the forward h-data process P^h and the h-model Q^h per h.

    hs (m,); factor (m,) = (1+h)^2/(8h); kl_prior: dict(value, se, method) for KL(p_T || pi);
    dsm: dict(value, se) of the DSM integral int g^2 E||s + z/sigma||^2 dt on the data;
    kl_up_to_constant (m,) = KL(p_T||pi) + factor * DSM, which equals the path KL plus the
    s-independent constant factor * int g^2 E||z/sigma + grad log p_t||^2 dt (so it ranks
    scores correctly at every h, but is not the KL itself); kl_up_to_constant_se (m,).
    When a truth was given: score_error (exact int g^2 E||grad log p_t - s||^2 dt),
    kl (m,) and kl_se (m,) are the exact path KL (an upper bound on KL(p_data || q^h_{t_min})
    by data processing); otherwise they are None.
    """

    hs: np.ndarray
    factor: np.ndarray
    kl_prior: dict[str, Any]
    dsm: dict[str, Any]
    kl_up_to_constant: np.ndarray
    kl_up_to_constant_se: np.ndarray
    score_error: dict[str, Any] | None = None
    kl: np.ndarray | None = None
    kl_se: np.ndarray | None = None

    def rows(self) -> list[dict[str, Any]]:
        """One dict per h, for tables / JSON."""
        out = []
        for i, h in enumerate(self.hs):
            row = {"h": float(h), "factor": float(self.factor[i]),
                   "kl_up_to_constant": float(self.kl_up_to_constant[i]),
                   "kl_up_to_constant_se": float(self.kl_up_to_constant_se[i])}
            if self.kl is not None:
                row.update(kl=float(self.kl[i]), kl_se=float(self.kl_se[i]))
            out.append(row)
        return out

    def summary(self) -> dict[str, Any]:
        return {"kl_prior": self.kl_prior, "dsm": self.dsm, "score_error": self.score_error, "rows": self.rows()}


def path_kl_bound(score: Callable, schedule: Schedule, data: Any, hs: float | Sequence[float], key: Array, *,
                  truth: Any = None, n_samples: int = 1000, quad_nodes: int = 48) -> PathKLBound:
    """The path-KL bound KL(P^h || Q^h) = KL(p_T||pi) + (1+h)^2/(8h) int g^2 E||grad log p_t - s||^2 dt
    for a list of h > 0, for any (e.g. trained) score on data (theory.md section 3).

    On data the true score is unknown, so the integral is estimated in its denoising form
    (:func:`score_error_integral`, kind "dsm"): the reported ``kl_up_to_constant`` is the KL
    plus an s-independent constant, and KL(p_T || pi) is the diffused-empirical Monte Carlo
    value (:func:`kl_prior`). If ``truth`` (exact AffineScore / GaussianMixtureScore) is given,
    the exact KL is reported as well (``kl``). data: (n, d); hs: h > 0. The time integral is
    computed once; only the factor (1+h)^2/(8h) depends on h (it diverges like 1/(8h) as h -> 0).
    """
    xs = check_points(data, "data")
    _score_dim_check(score, xs.shape[1])
    hv = _check_h_positive(hs, "hs")
    k1, k2, k3, k4 = jax.random.split(key, 4)
    fac = _kl_factor(hv)
    dsm = score_error_integral(score, schedule, k1, data=xs, n_samples=n_samples, quad_nodes=quad_nodes)
    if truth is not None:
        kp = kl_prior(schedule, truth=truth, key=k2, n_samples=n_samples)
        se_int = score_error_integral(score, schedule, k3, truth=truth, n_samples=n_samples, quad_nodes=quad_nodes)
        kl = kp["value"] + fac * se_int["value"]
        kl_se = np.sqrt(kp["se"] ** 2 + (fac * se_int["se"]) ** 2)
    else:
        kp = kl_prior(schedule, data=xs, key=k2, n_samples=n_samples)
        se_int, kl, kl_se = None, None, None
    kuc = kp["value"] + fac * dsm["value"]
    kuc_se = np.sqrt(kp["se"] ** 2 + (fac * dsm["se"]) ** 2)
    return PathKLBound(hs=hv, factor=fac, kl_prior=kp, dsm=dsm, kl_up_to_constant=kuc,
                       kl_up_to_constant_se=kuc_se, score_error=se_int, kl=kl, kl_se=kl_se)


# ----------------------------------------------------------------------------------------------
# path-integral Monte Carlo likelihood
# ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class PathLikelihoodResult:
    """Path-integral Monte Carlo estimate of log q^h(x) of the time-discretised h-model, per point.

    log_q (n,): log-mean-exp of the importance weights (biased low at finite M);
    se (n,): delta-method standard error sqrt(Var(w) / (M mean(w)^2));
    bias (n,): leading bias estimate -Var(w) / (2 M mean(w)^2) = -se^2/2 (<= 0; log_q - bias
    is the first-order bias-corrected value); ess (n,): (sum w)^2 / sum w^2, between 1 and M;
    n_paths: M; log_weights: (n, M) when requested, else None.
    """

    log_q: np.ndarray
    se: np.ndarray
    bias: np.ndarray
    ess: np.ndarray
    n_paths: int
    h: float
    steps: int
    proposal: str
    log_weights: np.ndarray | None = None

    @property
    def nll(self) -> np.ndarray:
        return -self.log_q


def _weight_stats(lw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """log-mean-exp, delta-method se, leading bias and ESS per row of log-weights (n, M)."""
    M = lw.shape[1]
    mx = np.max(lw, axis=1, keepdims=True)
    w = np.exp(lw - mx)
    mean = w.mean(axis=1)
    var = w.var(axis=1, ddof=1) if M > 1 else np.full(lw.shape[0], np.nan)
    log_q = np.log(mean) + mx[:, 0]
    rel = var / (M * mean**2)
    ess = w.sum(axis=1) ** 2 / np.sum(w**2, axis=1)
    return log_q, np.sqrt(rel), -0.5 * rel, ess


@eqx.filter_jit
def _pimc_chunk(score, schedule, h, x, key, ts, m, prop_c, prop_var):
    """Log importance weights (nb, m) for the points x (nb, d): proposal paths from x at
    t_min to T along ts (decreasing grid, read backwards), fused with the weight computation
    (one score evaluation per step and path)."""
    nb, d = x.shape
    y0 = jnp.repeat(x, m, axis=0)  # (nb * m, d), row i * m + j = path j of point i
    c_back = 0.5 * (1.0 + h)
    t_rev = ts[::-1]  # increasing: t_min = t_rev[0] -> T
    s0 = score(y0, t_rev[0])

    def step(carry, inp):
        y, s_y, lw = carry
        k, ta, tb = inp  # proposal travels ta -> tb (forward in time); target travels tb -> ta
        dt = tb - ta
        g2a, g2b = schedule.g2(ta), schedule.g2(tb)
        v = schedule.f(ta) * y + prop_c * g2a * s_y
        var_p = prop_var * g2b * dt  # variance at the target step's start time tb
        z = jax.random.normal(jax.random.fold_in(key, k), y.shape, dtype=y.dtype)
        y_new = y + v * dt + jnp.sqrt(var_p) * z
        s_new = score(y_new, tb)
        u_new = schedule.f(tb) * y_new - c_back * g2b * s_new
        log_target = _log_normal(y - y_new + u_new * dt, h * g2b * dt)
        log_prop = -0.5 * jnp.sum(z**2, axis=-1) - 0.5 * d * jnp.log(2 * jnp.pi * var_p)
        return (y_new, s_new, lw + log_target - log_prop), None

    ks = jnp.arange(ts.shape[0] - 1)
    (yT, _, lw), _ = jax.lax.scan(step, (y0, s0, jnp.zeros(nb * m, x.dtype)), (ks, t_rev[:-1], t_rev[1:]))
    lw = lw + schedule.prior_logp(yT)
    return lw.reshape(nb, m)


def path_log_likelihood(score: Callable, schedule: Schedule, x: Any, h: float, key: Array, *,
                        n_paths: int = 256, steps: int = 100, proposal: str = "reverse",
                        times: Any = None, chunk_rows: int = 65536, keep_weights: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> PathLikelihoodResult:
    """Path-integral Monte Carlo estimate of log q^h(x), h > 0, any d.

    Target: the density at t_min of the *time-discretised* h-backward model, i.e. the
    Euler–Maruyama chain of :func:`hbar.sampling.sample` on the grid T = t_0 > ... > t_N = t_min
    (uniform with ``steps`` steps, or ``times``) started from pi:

        q^h(x) = int pi(y_0) prod_k N(y_{k+1}; y_k - u_h(y_k, t_k) D_k, h g(t_k)^2 D_k I) dy_0..dy_{N-1},
        y_N = x, u_h = f y - (1+h)/2 g^2 s.

    It converges to the continuous-time model density as steps -> infinity (Euler: error O(dt)).
    Importance sampling over the paths that end at x: M = n_paths proposal paths R are run
    *forward in time* from y_N = x at t_min up to T, and

        log q^h(x) ~ log (1/M) sum_m w_m,   w = Q^h[y] / R[y | y_N = x].

    Proposal ``"reverse"`` (default): the time reversal of the h-backward model. The reversal of
    dx = u_h dt + sqrt(h) g dw_bar with marginals q_t is dx = [u_h + h g^2 grad log q_t] dt +
    sqrt(h) g dw; with grad log q_t replaced by the model score s this is the forward h-process

        dx = [f x - (1-h)/2 g^2 s] dt + sqrt(h) g dw       (h = 1: the noising process),

    and its law started at x is the backward model's path law conditioned on ending at x when s
    is exact and pi = p_T (then the weights are constant up to discretisation). Its Euler step
    t_{k+1} -> t_k uses the drift at the start t_{k+1} and the variance h g(t_k)^2 D_k of the
    target transition it inverts, so that no variance mismatch enters the weights.
    Proposal ``"forward"``: the plain noising process dx = f x dt + g dw, Euler step with the
    variance g(t_k)^2 D_k (a baseline; its noise does not shrink with h, so its ESS collapses
    for h != 1; at h = 1 it coincides with ``"reverse"``).

    Measured (SIMPLE schedule, 1024 paths, 100 steps, Gaussian data): ESS/M ~ 0.98 in d = 2 and
    0.80-0.87 in d = 16 with the exact score for h in {0.1, 0.5, 1}; with a score 10 % too
    large 0.78-0.84 (d = 2) and 0.06-0.26 (d = 16, smallest at h = 0.1), where the mismatch
    between s and grad log q^h_t, not the discretisation, limits the ESS. The forward proposal
    gives ESS/M ~ 0.001-0.002 at h = 0.1 and 0.5.

    Estimator properties: log-mean-exp is biased low at finite M; the leading bias is
    -Var(w) / (2 M mean(w)^2), reported per point (``bias``), as is the delta-method standard
    error sqrt(Var(w) / (M mean(w)^2)) and the ESS (sum w)^2 / sum w^2. Both are themselves
    estimated from the weights and are unreliable when the ESS is small.

    Batched over points and paths, chunked over paths (at most ``chunk_rows`` = points x paths
    rows per jitted call), one score evaluation per step and path. x: (n, d). Returns a
    :class:`PathLikelihoodResult`.
    """
    hv = float(_check_h_positive(h)[0])
    if proposal not in PROPOSALS:
        raise HbarInputError(f"unknown proposal {proposal!r}; choose from {PROPOSALS}")
    dim = getattr(score, "dim", None)
    xs = check_points(x, "x", d=None if dim is None else int(dim))
    n, d = xs.shape
    M = check_positive_int(n_paths, "n_paths")
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    dtype = jnp.result_type(float)
    if times is None:
        steps = check_positive_int(steps, "steps")
        ts = np.asarray(time_grid(schedule, steps))
    else:
        ts = np.asarray(times, dtype=float)
        if ts.ndim != 1 or ts.size < 2 or not np.all(np.diff(ts) < 0):
            raise HbarInputError("times must be a strictly decreasing grid from T to t_min")
        if not (np.isclose(ts[0], schedule.T) and np.isclose(ts[-1], schedule.t_min)):
            raise HbarInputError(f"times must run from T={schedule.T} to t_min={schedule.t_min}")
        schedule.check_time(ts, "times")
        steps = ts.size - 1
    ts_j = jnp.asarray(ts, dtype)
    if proposal == "reverse":
        prop_c, prop_var = -0.5 * (1.0 - hv), hv
    else:
        prop_c, prop_var = 0.0, 1.0
    # chunking: whole point blocks x path blocks with at most chunk_rows rows
    mb = min(M, chunk_rows)
    nb = max(1, min(n, chunk_rows // mb))
    hj = jnp.asarray(hv, dtype)
    lw = np.empty((n, M))
    xs_j = jnp.asarray(xs, dtype)
    done = 0
    for i0 in range(0, n, nb):
        xb = xs_j[i0:i0 + nb]
        real = xb.shape[0]
        if real < nb:
            xb = jnp.concatenate([xb, jnp.repeat(xb[-1:], nb - real, axis=0)])
        for j0 in range(0, M, mb):
            kk = jax.random.fold_in(jax.random.fold_in(key, i0), j0)
            out = _pimc_chunk(score, schedule, hj, xb, kk, ts_j, mb, jnp.asarray(prop_c, dtype),
                              jnp.asarray(prop_var, dtype))
            take = min(mb, M - j0)
            lw[i0:i0 + real, j0:j0 + take] = np.asarray(out)[:real, :take]
        done += real
        if progress is not None:
            progress(done, n)
    log_q, se, bias, ess = _weight_stats(lw)
    return PathLikelihoodResult(log_q=log_q, se=se, bias=bias, ess=ess, n_paths=M, h=hv, steps=int(steps),
                                proposal=proposal, log_weights=lw if keep_weights else None)


@dataclasses.dataclass
class PathNLLResult:
    """Per-h path-integral NLL summary (nats).

    hs (m,); nll (m,) mean over points of -log q^h (biased high at finite M by -bias);
    se (m,): standard error of that mean (spread over points, which includes the Monte Carlo
    noise; the per-point se when n = 1); mc_se (m,): Monte Carlo part alone,
    sqrt(sum se_i^2) / n; bias (m,): mean leading NLL bias +se_i^2/2 (>= 0);
    ess_min / ess_median / ess_mean (m,): ESS over points as a fraction of n_paths;
    results: the per-point :class:`PathLikelihoodResult` per h.
    """

    hs: np.ndarray
    nll: np.ndarray
    se: np.ndarray
    mc_se: np.ndarray
    bias: np.ndarray
    ess_min: np.ndarray
    ess_median: np.ndarray
    ess_mean: np.ndarray
    n_paths: int
    steps: int
    results: list[PathLikelihoodResult]

    def rows(self) -> list[dict[str, float]]:
        return [dict(h=float(self.hs[i]), nll=float(self.nll[i]), se=float(self.se[i]),
                     mc_se=float(self.mc_se[i]), bias=float(self.bias[i]), ess_min=float(self.ess_min[i]),
                     ess_median=float(self.ess_median[i]), ess_mean=float(self.ess_mean[i]))
                for i in range(len(self.hs))]


def path_nll(score: Callable, schedule: Schedule, x: Any, hs: float | Sequence[float], key: Array,
             n_paths: int = 256, steps: int = 100, *, proposal: str = "reverse", chunk_rows: int = 65536,
             progress: Callable[[int, int], None] | None = None) -> PathNLLResult:
    """Mean NLL of the points x (n, d) under the time-discretised h-backward model for each h > 0
    in ``hs``, by :func:`path_log_likelihood` (same proposal, ``n_paths`` paths per point,
    ``steps`` Euler steps), with standard errors and an ESS summary."""
    hv = _check_h_positive(hs, "hs")
    results, cols = [], []
    for i, h in enumerate(hv):
        r = path_log_likelihood(score, schedule, x, float(h), jax.random.fold_in(key, i), n_paths=n_paths,
                                steps=steps, proposal=proposal, chunk_rows=chunk_rows, progress=progress)
        n = r.log_q.size
        se = float(r.log_q.std(ddof=1) / math.sqrt(n)) if n > 1 else float(r.se[0])
        frac = r.ess / r.n_paths
        cols.append((float(np.mean(r.nll)), se, float(np.sqrt(np.sum(r.se**2)) / n), float(np.mean(-r.bias)),
                     float(frac.min()), float(np.median(frac)), float(frac.mean())))
        results.append(r)
    c = np.array(cols)
    return PathNLLResult(hs=hv, nll=c[:, 0], se=c[:, 1], mc_se=c[:, 2], bias=c[:, 3], ess_min=c[:, 4],
                         ess_median=c[:, 5], ess_mean=c[:, 6], n_paths=int(n_paths), steps=results[0].steps,
                         results=results)
