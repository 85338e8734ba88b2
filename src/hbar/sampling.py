"""The h-family sampler (docs/theory.md section 2).

    dx = [ f(t) x - (1+h)/2 g(t)^2 s(x, t) ] dt + sqrt(h) g(t) dw_bar,
    run from t = T down to t = t_min, x_T ~ pi.

h = 1 is the reverse SDE, h = 0 the probability-flow ODE; the noise amplitude is
sqrt(h) g (DEIS: lambda^2 = h; DDIM-like "eta": eta^2 = h).

Methods
-------
``"euler"``    Euler–Maruyama on a uniform grid of ``steps`` steps (the paper's sampler);
               one score evaluation per step; weak order 1.
``"heun"``     stochastic Heun (predictor–corrector with the same Gaussian increment),
               two score evaluations per step; weak order 2 for this additive-noise SDE.
``"adaptive"`` h = 0 only: the probability-flow ODE with the adaptive solver of
               :mod:`hbar.ode` (Tsit5, PID control), per-point step-size control.

With step size D = t_k - t_{k+1} > 0 (time runs backward), one Euler–Maruyama step is

    x_{k+1} = x_k - u(x_k, t_k) D + sqrt(h g(t_k)^2 D) z_k,    z_k ~ N(0, I).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.ode import ODEOptions, all_finite_rows, solve_ode
from hbar.process import HProcess
from hbar.schedules import Schedule
from hbar.scores import declared_dim
from hbar.validation import HbarInputError, check_h, check_positive_int

__all__ = ["SampleResult", "sample", "time_grid", "METHODS", "score_dimension", "simulate_path", "cast_floats"]

METHODS = ("euler", "heun", "adaptive")


def time_grid(schedule: Schedule, steps: int, t_start: float | None = None, t_end: float | None = None,
              dtype=None) -> Array:
    """Uniform grid t_0 = t_start, ..., t_steps = t_end, shape (steps + 1,); decreasing by
    default (t_start = T, t_end = t_min), as the backward processes run. Both ends must lie
    in [t_min, T]."""
    t_start = schedule.T if t_start is None else t_start
    t_end = schedule.t_min if t_end is None else t_end
    schedule.check_time([t_start, t_end], "time grid end")
    if t_start == t_end:
        raise HbarInputError(f"a time grid needs t_start != t_end, got {t_start} twice")
    return jnp.linspace(t_start, t_end, steps + 1, dtype=dtype or jnp.result_type(float))


def cast_floats(tree, dtype):
    """Cast every floating-point array leaf of a pytree (e.g. a network's weights) to dtype."""
    return jax.tree_util.tree_map(lambda a: a.astype(dtype) if eqx.is_inexact_array(a) else a, tree)


def score_dimension(score: Callable, d: int | None) -> int:
    """The data dimension: ``d`` if given, else ``score.dim`` (analytic scores) or ``score.d``
    (hbar networks) when the score carries it."""
    if d is not None:
        return check_positive_int(d, "d")
    dim = declared_dim(score)
    if dim is None:
        raise HbarInputError("cannot tell the data dimension from the score: pass d=... or x_T=...")
    return int(dim)


@dataclasses.dataclass
class SampleResult:
    """Samples at t_min and what it cost.

    samples: (n, d) final states (rows that blew up are kept, flagged in ``valid``);
    valid: (n,) bool, finite and (if a bound was given) never outside [-bound, bound]^d;
    n_failed: number of invalid rows (also warned about: never dropped silently);
    nfe: number of batched score evaluations (each on all n points);
    path: (steps + 1, n, d) trajectory when requested, else None; times: (steps + 1,).
    """

    samples: np.ndarray
    valid: np.ndarray
    n_failed: int
    nfe: int
    h: float
    method: str
    steps: int
    path: np.ndarray | None = None
    times: np.ndarray | None = None

    @property
    def valid_samples(self) -> np.ndarray:
        return self.samples[self.valid]


def _sde_scan(u: Callable, var_rate: Callable, x0: Array, ts: Array, key: Array, method: str,
              bound: float, keep_path: bool):
    """Fixed-grid Euler–Maruyama / stochastic Heun over the decreasing grid ``ts`` for
    dx = u dt + sqrt(var_rate(t)) dw (var_rate = h g^2 for the h-family).
    Carries a running max |x| per row to detect excursions. Returns (x, maxabs, path|None)."""

    def step(carry, inp):
        x, maxabs = carry
        k, t0, t1 = inp
        dt = t0 - t1  # > 0
        z = jax.random.normal(jax.random.fold_in(key, k), x.shape, dtype=x.dtype)
        u0 = u(x, t0)
        if method == "euler":
            noise = jnp.sqrt(var_rate(t0) * dt) * z
            x_new = x - u0 * dt + noise
        else:  # stochastic Heun with a trapezoidal noise variance
            noise = jnp.sqrt(0.5 * (var_rate(t0) + var_rate(t1)) * dt) * z
            x_pred = x - u0 * dt + noise
            x_new = x - 0.5 * (u0 + u(x_pred, t1)) * dt + noise
        maxabs = jnp.maximum(maxabs, jnp.max(jnp.abs(x_new), axis=-1))
        return (x_new, maxabs), (x_new if keep_path else None)

    ks = jnp.arange(ts.shape[0] - 1)
    (x, maxabs), path = jax.lax.scan(step, (x0, jnp.max(jnp.abs(x0), axis=-1)), (ks, ts[:-1], ts[1:]))
    return x, maxabs, path


def sample(
    score: Callable,
    schedule: Schedule,
    key: Array,
    n: int,
    h: float,
    steps: int = 1000,
    method: str = "euler",
    *,
    d: int | None = None,
    x_T: Array | None = None,
    bound: float | None = None,
    ode_options: ODEOptions = ODEOptions(),
    return_path: bool = False,
    batch_size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SampleResult:
    """Draw n samples of the h-backward process at t_min (docs/theory.md section 2).

    Args:
        score: score callable s(x, t), (n, d) -> (n, d).
        schedule: forward schedule; the sampler runs from schedule.T to schedule.t_min.
        key: JAX PRNG key (fixes both the prior draw and the Brownian increments).
        n: number of samples. h: noise strength >= 0 (h = 0: probability-flow ODE).
        steps: number of fixed steps (euler, heun). method: "euler" | "heun" | "adaptive".
        d: data dimension (else taken from ``score.dim`` or ``x_T``).
        x_T: optional (n, d) starting points at T (default: draws from the prior).
        bound: a trajectory with any |x_i| > bound at any step counts as failed.
        return_path: keep the whole (steps + 1, n, d) trajectory (euler/heun).
        batch_size: sample in chunks of this many points (memory), with ``progress(done, n)``.
    """
    h_val = float(check_h(h)[0])
    n = check_positive_int(n, "n")
    if method not in METHODS:
        raise HbarInputError(f"unknown sampling method {method!r}; choose from {METHODS}")
    if method == "adaptive" and h_val != 0.0:
        raise HbarInputError("method='adaptive' integrates the probability-flow ODE and needs h = 0; "
                             "use 'euler' or 'heun' for h > 0")
    steps = check_positive_int(steps, "steps")
    dtype = jnp.result_type(float)
    if x_T is not None:
        x_T = jnp.asarray(x_T, dtype=dtype)
        if x_T.ndim != 2 or x_T.shape[0] != n:
            raise HbarInputError(f"x_T must have shape (n={n}, d), got {x_T.shape}")
        d = x_T.shape[1] if d is None else d
    d = score_dimension(score, d)
    if x_T is not None and x_T.shape[1] != d:
        raise HbarInputError(f"x_T has dimension {x_T.shape[1]}, but d = {d}")
    if bound is not None and not bound > 0:
        raise HbarInputError(f"bound must be > 0, got {bound}")
    k_prior, k_noise = jax.random.split(key)
    if x_T is None:
        x_T = schedule.prior_sample(k_prior, n, d, dtype=dtype)
    bnd = jnp.inf if bound is None else bound
    batch = n if batch_size is None else check_positive_int(batch_size, "batch_size")

    ts = time_grid(schedule, steps, dtype=dtype)
    h_arr = jnp.asarray(h_val, dtype=dtype)
    bnd_arr = jnp.asarray(bnd, dtype=dtype)

    if method == "adaptive":
        def run(x0):
            return _adaptive_run(score, x0, schedule=schedule, options=ode_options)
    else:
        def run(x0, kk):
            return _sde_run(score, x0, kk, h_arr, bnd_arr, ts, schedule=schedule, method=method,
                            keep_path=return_path)

    outs, maxes, paths, nfe = [], [], [], 0
    for i, start in enumerate(range(0, n, batch)):
        x0 = x_T[start:start + batch]
        if method == "adaptive":
            x, ok, evals = run(x0)
            maxabs = jnp.where(ok, jnp.max(jnp.abs(x), axis=-1), jnp.inf)
            nfe = max(nfe, int(jnp.max(evals)))
            path = None
        else:
            x, maxabs, path = run(x0, jax.random.fold_in(k_noise, i))
            nfe = steps * (1 if method == "euler" else 2)
        outs.append(np.asarray(x))
        maxes.append(np.asarray(maxabs))
        if return_path and path is not None:
            paths.append(np.concatenate([np.asarray(x0)[None], np.asarray(path)], axis=0))
        if progress is not None:
            progress(min(start + batch, n), n)

    samples = np.concatenate(outs)
    maxabs = np.concatenate(maxes)
    valid = np.asarray(all_finite_rows(jnp.asarray(samples))) & np.isfinite(maxabs) & (maxabs <= bnd)
    n_failed = int((~valid).sum())
    if n_failed:
        warnings.warn(f"hbar.sample: {n_failed} of {n} trajectories blew up or left the bound "
                      f"(h={h_val}, method={method}); they are flagged in result.valid", stacklevel=2)
    return SampleResult(
        samples=samples, valid=valid, n_failed=n_failed, nfe=nfe, h=h_val, method=method, steps=steps,
        path=np.concatenate(paths, axis=1) if paths else None,
        times=np.asarray(ts) if method != "adaptive" else None,
    )


@eqx.filter_jit
def _sde_run(score, x0, key, h, bound, ts, *, schedule, method, keep_path):
    """Jitted fixed-grid run; compiled once per (score structure, schedule, shapes, method):
    h and the bound are traced, so scanning over h does not recompile."""
    proc = HProcess(schedule, score)
    return _sde_scan(lambda x, t: proc.drift(x, t, h), lambda t: proc.diffusion2(t, h), x0, ts, key, method,
                     bound, keep_path)


@eqx.filter_jit
def _adaptive_run(score, x0, *, schedule, options):
    """Per-point adaptive probability-flow solve from T to t_min (vmapped over rows)."""
    proc = HProcess(schedule, cast_floats(score, x0.dtype))

    def one(x):
        sol = solve_ode(lambda t, y: proc.velocity(y[None], t)[0], x, schedule.T, schedule.t_min, options)
        return sol["y1"], sol["ok"], sol["evals"]

    return jax.vmap(one)(x0)


def simulate_path(drift: Callable[[Array, Array], Array], g2: Callable[[Array], Array], x0: Array, ts: Array,
                  key: Array, h: float | Array = 1.0, method: str = "euler") -> Array:
    """A fixed-grid path of dx = drift(x, t) dt + sqrt(h g2(t)) dw along the grid ``ts``.

    ``ts`` (steps + 1,) must be strictly monotone and concrete: decreasing for a backward-time
    process (as in :func:`sample`), increasing for a forward-time one (e.g. the noising
    process from data). ``drift`` is always written in forward-time notation, so one Euler step
    is x_{k+1} = x_k + drift(x_k, t_k) (t_{k+1} - t_k) + sqrt(h g2(t_k) |t_{k+1} - t_k|) z_k.
    Uses the same scan as :func:`sample` (an increasing grid is run as a decreasing grid in
    tau = -t). Traceable. Returns the path (steps + 1, n, d) including x0.
    """
    if method not in ("euler", "heun"):
        raise HbarInputError(f"simulate_path: method must be 'euler' or 'heun', got {method!r}")
    grid = np.asarray(ts, dtype=float)
    if grid.ndim != 1 or grid.size < 2:
        raise HbarInputError(f"simulate_path: ts must be a 1-D grid with >= 2 times, got shape {grid.shape}")
    steps = np.diff(grid)
    if np.all(steps < 0):
        _, _, path = _sde_scan(drift, lambda t: h * g2(t), x0, jnp.asarray(ts, dtype=x0.dtype), key, method,
                               jnp.inf, True)
    elif np.all(steps > 0):
        _, _, path = _sde_scan(lambda x, tau: -drift(x, -tau), lambda tau: h * g2(-tau), x0,
                               -jnp.asarray(ts, dtype=x0.dtype), key, method, jnp.inf, True)
    else:
        raise HbarInputError("simulate_path: ts must be strictly increasing or strictly decreasing")
    return jnp.concatenate([x0[None], path], axis=0)

