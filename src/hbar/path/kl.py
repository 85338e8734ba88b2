"""Path-space KL between the forward h-data process and the h-model (docs/theory.md section 3).

For h > 0 the KL between path measures is finite only between processes with the same
diffusion sqrt(h) g. The data process with diffusion sqrt(h) g whose time reversal is the
h-backward process with the *true* score is the forward h-process P^h (drift
f x - (1-h)/2 g^2 grad log p_t, started from p_data; P^1 is the noising process). Girsanov gives

    KL(P^h || Q^h) = KL(p_T || pi) + (1+h)^2/(8h) int_{t_min}^T g^2 E_{p_t} ||grad log p_t - s||^2 dt,

and by the data-processing inequality it bounds KL(p_data || q^h_{t_min}). For h != 1 and the
plain noising process P^1 the KL is infinite (different diffusion coefficients), which is why
the Monte Carlo check samples P^h with the true score. On data the integral is estimated in its
denoising (DSM) form, which adds an s-independent constant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.gaussian import isotropic_logpdf
from hbar.path._checks import check_h_positive, check_score_dim
from hbar.path._truth import Truth, gauss_kl_to_prior
from hbar.path.densities import backward_path_logp, sample_forward_paths
from hbar.schedules import Schedule
from hbar.stats import mean_se
from hbar.validation import HbarInputError, check_points, check_positive_int

__all__ = [
    "kl_prior",
    "score_error_integral",
    "path_kl_closed_form",
    "path_kl_monte_carlo",
    "PathKLBound",
    "path_kl_bound",
]


def kl_factor(h: np.ndarray) -> np.ndarray:
    """The Girsanov factor (1+h)^2/(8h) of the path KL, shape of h (docs/theory.md section 3)."""
    return (1.0 + h) ** 2 / (8.0 * h)


def _mc_summary(vals: Any, **extra: Any) -> dict[str, Any]:
    mean, se = mean_se(vals)
    return dict(value=mean, se=se, **extra)


def kl_prior(schedule: Schedule, *, truth: Any = None, data: Any = None, key: Array | None = None,
             n_samples: int = 2000) -> dict[str, Any]:
    """KL(p_T || pi), the prior-mismatch term of the path KL (docs/theory.md section 3).

    * truth = exact AffineScore (Gaussian data): closed form between N(alpha m0, alpha^2 S0 +
      sigma^2 I) and pi (se = 0, method "exact").
    * truth = GaussianMixtureScore: Monte Carlo E_{p_T}[log p_T - log pi] with exact log p_T.
    * data (n, d) only: Monte Carlo for the *diffused empirical* distribution p_T = (1/n) sum_i
      N(alpha(T) x_i, sigma(T)^2 I) (the true p_T of the data distribution is unknown; the two
      agree when alpha(T) is small or n is large).

    Returns dict(value, se, method); se is the standard error over the n_samples draws."""
    T = schedule.T
    if truth is not None:
        tr = Truth(truth, schedule)
        if tr.gaussian:
            m, C = tr.moments(T)
            return dict(value=gauss_kl_to_prior(m, C, schedule.prior_std**2), se=0.0, method="exact")
        if key is None:
            raise HbarInputError("kl_prior: Monte Carlo needs a PRNG key")
        k1, k2 = jax.random.split(key)
        x0 = tr.sample_data(k1, n_samples)
        xT, _ = schedule.marginal_sample(k2, x0, jnp.full((n_samples,), T))
        return _mc_summary(np.asarray(tr.log_density(xT, T) - schedule.prior_logp(xT)),
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
    def log_pT(x):  # log (1/n) sum_i N(x; alpha x_i, sigma^2 I), row by row
        def one(xi):
            return jax.nn.logsumexp(isotropic_logpdf(xi[None] - a * xd, s2)) - math.log(n)
        return jax.lax.map(one, x, batch_size=64)

    return _mc_summary(np.asarray(log_pT(xT) - schedule.prior_logp(xT)), method="monte-carlo (diffused empirical p_T)")


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
    """I[s] = int_{t_min}^T g^2 E ||target - s||^2 dt (docs/theory.md section 3), by Gauss–Legendre
    quadrature in log t (``quad_nodes`` nodes) and, where needed, Monte Carlo over the marginal.

    * truth given (exact AffineScore or GaussianMixtureScore): target = grad log p_t, the exact
      score error. Closed form when the truth is Gaussian and the model has ``.affine``
      (E||D x + e||^2 = tr(D C_t D^T) + ||D m_t + e||^2, method "exact"); otherwise Monte
      Carlo with x_t ~ p_t.
    * data (n, d) only: the denoising form E_{x0, z} ||s(alpha x0 + sigma z, t) + z/sigma||^2
      (DSM). By the denoising identity it equals the score error plus the s-independent constant
      int g^2 E||z/sigma + grad log p_t||^2 dt (= int g^2 [d/sigma^2 - E||grad log p_t||^2] dt).

    The Monte Carlo standard error is over the n_samples data draws (each carries its own
    noise at every node); the quadrature error is not included. Returns dict(value, se, kind,
    method) with kind "score-error" or "dsm"."""
    t_nodes, w_nodes = _quadrature(schedule, check_positive_int(quad_nodes, "quad_nodes"))
    dtype = jnp.result_type(float)
    if truth is not None:
        tr = Truth(truth, schedule)
        check_score_dim(score, tr.dim)
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
        check_score_dim(score, xd.shape[1])
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

    return _mc_summary(np.asarray(per_sample(x0, kz)), kind=kind, method="monte-carlo")


def path_kl_closed_form(score: Callable, schedule: Schedule, h: float | Sequence[float], truth: Any,
                        key: Array | None = None, *, n_samples: int = 2000, quad_nodes: int = 64) -> dict[str, Any]:
    """KL(P^h || Q^h) = KL(p_T || pi) + (1+h)^2/(8h) int g^2 E_{p_t}||grad log p_t - s||^2 dt
    (docs/theory.md section 3) for a known truth (exact AffineScore or GaussianMixtureScore) and
    any model score; h > 0 (scalar or list of m values). Exact (up to quadrature) for Gaussian
    truth with an affine model, Monte Carlo otherwise. Returns dict(h (m,), kl (m,), se (m,),
    kl_prior, score_error)."""
    hs = check_h_positive(h)
    kp = kl_prior(schedule, truth=truth, key=key, n_samples=n_samples)
    k2 = None if key is None else jax.random.fold_in(key, 1)
    se_int = score_error_integral(score, schedule, k2, truth=truth, n_samples=n_samples, quad_nodes=quad_nodes)
    fac = kl_factor(hs)
    kl = kp["value"] + fac * se_int["value"]
    se = np.sqrt(kp["se"] ** 2 + (fac * se_int["se"]) ** 2)
    return dict(h=hs, kl=kl, se=se, kl_prior=kp, score_error=se_int)


def path_kl_monte_carlo(score: Callable, schedule: Schedule, h: float, truth: Any, key: Array, *,
                        n_paths: int = 1000, steps: int = 200, convention: str = "ito") -> dict[str, Any]:
    """Direct Monte Carlo of the path KL of the *time-discretised* processes,
    E_{P^h}[log P^h_disc(x) - log Q^h_disc(x)], from sampled paths (docs/theory.md section 3).

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
    hv = float(check_h_positive(h)[0])
    tr = Truth(truth, schedule)
    check_score_dim(score, tr.dim)
    n_paths = check_positive_int(n_paths, "n_paths")
    k1, k2, k3 = jax.random.split(key, 3)
    x0, _ = schedule.marginal_sample(k3, tr.sample_data(k1, n_paths), jnp.full((n_paths,), schedule.t_min))
    ps = sample_forward_paths(schedule, x0, k2, steps, h=hv, score=tr.score,
                              log_p0=lambda z: tr.log_density(z, schedule.t_min), convention=convention)
    logq = np.asarray(backward_path_logp(score, schedule, hv, ps.path, ps.times, convention=convention))
    return _mc_summary(ps.logp - logq, n_paths=n_paths, steps=int(steps))


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
    for a list of h > 0, for any (e.g. trained) score on data (docs/theory.md section 3).

    On data the true score is unknown, so the integral is estimated in its denoising form
    (:func:`score_error_integral`, kind "dsm"): the reported ``kl_up_to_constant`` is the KL
    plus an s-independent constant, and KL(p_T || pi) is the diffused-empirical Monte Carlo
    value (:func:`kl_prior`). If ``truth`` (exact AffineScore / GaussianMixtureScore) is given,
    the exact KL is reported as well (``kl``). data: (n, d); hs: m values h > 0. The time
    integral is computed once; only the factor (1+h)^2/(8h) depends on h (it diverges like
    1/(8h) as h -> 0).
    """
    xs = check_points(data, "data")
    check_score_dim(score, xs.shape[1])
    hv = check_h_positive(hs, "hs")
    k1, k2, k3, k4 = jax.random.split(key, 4)
    fac = kl_factor(hv)
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
