"""Path-integral Monte Carlo likelihood of the time-discretised h-model (docs/theory.md section 3).

The target is the density at t_min of the Euler–Maruyama chain of :func:`hbar.sampling.sample`
on the grid T = t_0 > ... > t_N = t_min started from pi,

    q^h(x) = int pi(y_0) prod_k N(y_{k+1}; y_k - u_h(y_k, t_k) D_k, h g(t_k)^2 D_k I) dy_0..dy_{N-1},

with y_N = x and u_h = ``HProcess.drift``. It is estimated by importance sampling over paths
run forward in time from x: log q^h(x) ~ log (1/M) sum_m w_m, w = Q^h[y] / R[y | y_N = x].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.gaussian import isotropic_logpdf
from hbar.path._checks import check_h_positive
from hbar.process import HProcess
from hbar.sampling import time_grid
from hbar.schedules import Schedule
from hbar.stats import mean_se
from hbar.validation import HbarInputError, check_points, check_positive_int

__all__ = ["PROPOSALS", "PathLikelihoodResult", "path_log_likelihood", "PathNLLResult", "path_nll"]

PROPOSALS = ("reverse", "forward")


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


def weight_stats(lw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """log-mean-exp, delta-method se, leading bias and ESS per row of log-weights lw (n, M);
    each (n,)."""
    M = lw.shape[1]
    mx = np.max(lw, axis=1, keepdims=True)
    w = np.exp(lw - mx)
    mean = w.mean(axis=1)
    var = w.var(axis=1, ddof=1) if M > 1 else np.full(lw.shape[0], np.nan)
    log_q = np.log(mean) + mx[:, 0]
    rel = var / (M * mean**2)
    ess = w.sum(axis=1) ** 2 / np.sum(w**2, axis=1)
    return log_q, np.sqrt(rel), -0.5 * rel, ess


def _point_noise(key: Array, i0: Array, j0: Array, nb: int, m: int, n_paths: int, d: int, dtype: Any):
    """Noise at step k for paths j0, ..., j0 + m - 1 of points i0, ..., i0 + nb - 1, rows ordered
    point-major, shape (nb * m, d). Point i draws all its n_paths rows from
    fold_in(fold_in(key, i), k) and the chunk takes its slice, so the noise of path j of point i
    does not depend on the chunking."""
    point_keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(i0 + jnp.arange(nb))

    def one(kp, k):
        z = jax.random.normal(jax.random.fold_in(kp, k), (n_paths, d), dtype=dtype)
        if m == n_paths:
            return z
        z = jnp.concatenate([z, jnp.zeros((m, d), dtype)])  # no clamping of the last, short block
        return jax.lax.dynamic_slice_in_dim(z, j0, m, axis=0)

    return lambda k: jax.vmap(one, in_axes=(0, None))(point_keys, k).reshape(nb * m, d)


@eqx.filter_jit
def _pimc_chunk(score, schedule, h, h_prop, x, key, i0, j0, ts, m, n_paths):
    """Log importance weights (nb, m) for the points x (nb, d), which are points i0, i0 + 1, ...
    of the caller's batch, and their paths j0, ..., j0 + m - 1 (of n_paths): proposal paths from x
    at t_min to T along ts (decreasing grid, read backwards), fused with the weight computation
    (one score evaluation per step and path); the noise comes from :func:`_point_noise`.

    Proposal: the forward h_prop-process (``HProcess.forward_drift_given_score``, h_prop = h
    for "reverse", 1 for "forward": the noising process); target: the h-backward chain
    (``HProcess.drift_given_score``). Both variances come from ``HProcess.diffusion2``."""
    nb, d = x.shape
    proc = HProcess(schedule, score)
    y0 = jnp.repeat(x, m, axis=0)  # (nb * m, d), row i * m + j = path j of point i
    noise = _point_noise(key, i0, j0, nb, m, n_paths, d, x.dtype)
    t_rev = ts[::-1]  # increasing: t_min = t_rev[0] -> T
    s0 = score(y0, t_rev[0])

    def step(carry, inp):
        y, s_y, lw = carry
        k, ta, tb = inp  # proposal travels ta -> tb (forward in time); target travels tb -> ta
        dt = tb - ta
        v = proc.forward_drift_given_score(y, s_y, ta, h_prop)
        var_p = proc.diffusion2(tb, h_prop) * dt  # variance at the target step's start time tb
        z = noise(k)
        y_new = y + v * dt + jnp.sqrt(var_p) * z
        s_new = score(y_new, tb)
        u_new = proc.drift_given_score(y_new, s_new, tb, h)
        log_target = isotropic_logpdf(y - y_new + u_new * dt, proc.diffusion2(tb, h) * dt)
        log_prop = isotropic_logpdf(z, 1.0) - 0.5 * d * jnp.log(var_p)  # log N(sqrt(var_p) z; 0, var_p I)
        return (y_new, s_new, lw + log_target - log_prop), None

    ks = jnp.arange(ts.shape[0] - 1)
    (yT, _, lw), _ = jax.lax.scan(step, (y0, s0, jnp.zeros(nb * m, x.dtype)), (ks, t_rev[:-1], t_rev[1:]))
    lw = lw + proc.prior_logp(yT)
    return lw.reshape(nb, m)


def _pimc_grid(schedule: Schedule, steps: int, times: Any) -> np.ndarray:
    """The decreasing grid T -> t_min: uniform with ``steps`` steps, or the given ``times``."""
    if times is None:
        return np.asarray(time_grid(schedule, check_positive_int(steps, "steps")))
    ts = np.asarray(times, dtype=float)
    if ts.ndim != 1 or ts.size < 2 or not np.all(np.diff(ts) < 0):
        raise HbarInputError("times must be a strictly decreasing grid from T to t_min")
    if not (np.isclose(ts[0], schedule.T) and np.isclose(ts[-1], schedule.t_min)):
        raise HbarInputError(f"times must run from T={schedule.T} to t_min={schedule.t_min}")
    schedule.check_time(ts, "times")
    return ts


def path_log_likelihood(score: Callable, schedule: Schedule, x: Any, h: float, key: Array, *,
                        n_paths: int = 256, steps: int = 100, proposal: str = "reverse",
                        times: Any = None, chunk_rows: int = 65536, keep_weights: bool = False,
                        progress: Callable[[int, int], None] | None = None) -> PathLikelihoodResult:
    """Path-integral Monte Carlo estimate of log q^h(x), h > 0, any d (docs/theory.md section 3).

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
    rows per jitted call), one score evaluation per step and path. Path j of point i always
    uses the same noise, whatever ``chunk_rows``. x: (n, d). Returns a
    :class:`PathLikelihoodResult` (arrays (n,), log_weights (n, M) with ``keep_weights``).
    """
    hv = float(check_h_positive(h)[0])
    if proposal not in PROPOSALS:
        raise HbarInputError(f"unknown proposal {proposal!r}; choose from {PROPOSALS}")
    dim = getattr(score, "dim", None)
    xs = check_points(x, "x", d=None if dim is None else int(dim))
    n, d = xs.shape
    M = check_positive_int(n_paths, "n_paths")
    chunk_rows = check_positive_int(chunk_rows, "chunk_rows")
    dtype = jnp.result_type(float)
    ts_j = jnp.asarray(_pimc_grid(schedule, steps, times), dtype)
    h_prop = hv if proposal == "reverse" else 1.0
    # chunking: whole point blocks x path blocks with at most chunk_rows rows
    mb = min(M, chunk_rows)
    nb = max(1, min(n, chunk_rows // mb))
    hj, hpj = jnp.asarray(hv, dtype), jnp.asarray(h_prop, dtype)
    lw = np.empty((n, M))
    xs_j = jnp.asarray(xs, dtype)
    done = 0
    for i0 in range(0, n, nb):
        xb = xs_j[i0:i0 + nb]
        real = xb.shape[0]
        if real < nb:
            xb = jnp.concatenate([xb, jnp.repeat(xb[-1:], nb - real, axis=0)])
        for j0 in range(0, M, mb):
            out = _pimc_chunk(score, schedule, hj, hpj, xb, key, jnp.asarray(i0), jnp.asarray(j0), ts_j, mb, M)
            take = min(mb, M - j0)
            lw[i0:i0 + real, j0:j0 + take] = np.asarray(out)[:real, :take]
        done += real
        if progress is not None:
            progress(done, n)
    log_q, se, bias, ess = weight_stats(lw)
    return PathLikelihoodResult(log_q=log_q, se=se, bias=bias, ess=ess, n_paths=M, h=hv, steps=int(ts_j.shape[0] - 1),
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
    """Mean NLL of the points x (n, d) under the time-discretised h-backward model for each of the
    m values h > 0 in ``hs``, by :func:`path_log_likelihood` (same proposal, ``n_paths`` paths per
    point, ``steps`` Euler steps), with standard errors and an ESS summary (docs/theory.md
    section 3). Returns a :class:`PathNLLResult` of (m,) arrays."""
    hv = check_h_positive(hs, "hs")
    results, cols = [], []
    for i, h in enumerate(hv):
        r = path_log_likelihood(score, schedule, x, float(h), jax.random.fold_in(key, i), n_paths=n_paths,
                                steps=steps, proposal=proposal, chunk_rows=chunk_rows, progress=progress)
        n = r.log_q.size
        nll, se = mean_se(r.nll)
        if n == 1:
            se = float(r.se[0])
        frac = r.ess / r.n_paths
        cols.append((nll, se, float(np.sqrt(np.sum(r.se**2)) / n), float(np.mean(-r.bias)),
                     float(frac.min()), float(np.median(frac)), float(frac.mean())))
        results.append(r)
    c = np.array(cols)
    return PathNLLResult(hs=hv, nll=c[:, 0], se=c[:, 1], mc_se=c[:, 2], bias=c[:, 3], ess_min=c[:, 4],
                         ess_median=c[:, 5], ess_mean=c[:, 6], n_paths=int(n_paths), steps=results[0].steps,
                         results=results)
