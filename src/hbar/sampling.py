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

Reliability (docs/theory.md sections 14.1-14.2): z_k of point i is drawn from
fold_in(fold_in(noise key, i), k), so a sample does not depend on ``batch_size``; a trajectory that
turns non-finite or leaves [-bound, bound]^d (default 100 (prior_std + 1)) is ended at that step and
counted in ``n_failed``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar import distributed
from hbar.ode import ODEOptions, all_finite_rows, solve_ode
from hbar.process import HProcess
from hbar.schedules import Schedule, resolve_bound
from hbar.scores import check_score_shape, declared_dim
from hbar.validation import HbarInputError, check_h, check_positive_int

__all__ = ["SampleResult", "sample", "time_grid", "METHODS", "score_dimension", "simulate_path", "cast_floats",
           "HWindow", "h_window", "HSteps", "edm_churn", "SDEOptions", "SDE_SOLVERS"]

METHODS = ("euler", "heun", "adaptive", "sde")

#: diffrax solvers of ``method="sde"`` -> score evaluations per step. The noise sqrt(h g^2) dw
#: does not depend on x (additive), so Ito = Stratonovich and SRA1 / ShARK (strong order 1.5
#: for additive noise, embedded error estimate) apply.
SDE_SOLVERS = {"shark": 2, "sra1": 2, "heun": 2, "euler": 1}


class HWindow(eqx.Module):
    """A time-dependent noise strength h(t) = h_in for t_lo <= t <= t_hi, h_out elsewhere.

    EDM's stochastic sampler (S_churn, S_tmin, S_tmax) is such a window: it adds noise only
    for noise levels in [S_tmin, S_tmax]; its per-step churn gamma_i corresponds to
    h ~ gamma_i t_i / (t_i - t_{i+1}) on the EDM schedule (sigma = t) to first order, and
    exactly to the step-wise h of :func:`edm_churn` (docs/theory.md section 2.7). Any
    jnp-traceable callable h(t) >= 0 works as well; h(t) enters only through
    :class:`hbar.process.HProcess`.
    """

    h_in: Array
    t_lo: Array
    t_hi: Array
    h_out: Array

    def __call__(self, t: Array | float) -> Array:
        t = jnp.asarray(t)
        return jnp.where((t >= self.t_lo) & (t <= self.t_hi), self.h_in, self.h_out)


def h_window(h_in: float, t_lo: float, t_hi: float, h_out: float = 0.0) -> HWindow:
    """h(t) = h_in on [t_lo, t_hi], h_out elsewhere (see :class:`HWindow`)."""
    check_h([h_in, h_out])
    if not t_lo <= t_hi:
        raise HbarInputError(f"h_window needs t_lo <= t_hi, got {t_lo}, {t_hi}")
    f = lambda v: jnp.asarray(v, dtype=jnp.result_type(float))
    return HWindow(f(h_in), f(t_lo), f(t_hi), f(h_out))


class HSteps(eqx.Module):
    """A piecewise-constant noise strength on a decreasing grid t_0 > t_1 > ... > t_N:
    h(t) = hs[k] for t_{k+1} < t <= t_k (hs[0] above t_0, hs[N-1] at and below t_N)."""

    times: Array
    hs: Array

    def __call__(self, t: Array | float) -> Array:
        t, times, hs = jnp.asarray(t), jnp.asarray(self.times), jnp.asarray(self.hs)
        n = hs.shape[0]
        k = n - jnp.searchsorted(times[::-1], t, side="left")
        return hs[jnp.clip(k, 0, n - 1)]


EDM_GAMMA_MAX = math.sqrt(2.0) - 1.0  # EDM's cap on the per-step churn (Karras et al. 2022, Algorithm 2)


def edm_churn(S_churn: float, S_tmin: float, S_tmax: float, steps: int, schedule: Schedule, *,
              sigma_data: float = 0.5, rho: float = 7.0) -> HSteps:
    """EDM's stochastic sampler (Karras et al. 2022, Algorithm 2, S_noise = 1) as an h(t)
    (docs/theory.md section 2.7).

    EDM runs ``steps`` steps on its power grid (hbar's "edm" grid, power ``rho``) in the noise
    level s = sigma / alpha (s = t on :class:`hbar.schedules.EDMSchedule`); at a step from s_i
    with S_tmin <= s_i <= S_tmax it first raises the noise level to (1 + gamma) s_i,
    gamma = min(S_churn / steps, sqrt 2 - 1), by adding fresh noise, then integrates the
    probability-flow ODE down to s_{i+1}. The h-process with the constant

        h_i = log(v(s_hat_i) / v(s_i)) / log(v(s_i) / v(s_{i+1})),   v(s) = sigma_data^2 + s^2,

    on that step has, for Gaussian data of standard deviation ``sigma_data`` and the exact
    score, the same transition law from s_i to s_{i+1} (same marginals, same correlation), so
    both samplers have the same joint law at the grid times. Limits: gamma (2 + gamma) s_i^2 /
    (s_i^2 - s_{i+1}^2) (equal injected variance) for s << sigma_data, log(1 + gamma) /
    log(s_i / s_{i+1}) for s >> sigma_data, and gamma s_i / (s_i - s_{i+1}) to first order.
    EDM's S_noise > 1 inflates the noise beyond the marginal-preserving family and has no h.
    Returns an :class:`HSteps` on the times of that grid; pass it as ``h`` to :func:`sample`
    (any method and grid; with ``grid="edm"`` and the same ``steps`` each step has one h).
    """
    from hbar.grids import log_snr, make_grid

    steps = check_positive_int(steps, "steps")
    vals = np.asarray([S_churn, S_tmin, S_tmax, sigma_data], dtype=float)
    if not np.all(np.isfinite(vals)) or S_churn < 0 or S_tmin < 0 or not sigma_data > 0:
        raise HbarInputError("edm_churn needs finite S_churn >= 0, S_tmin >= 0 and sigma_data > 0, got "
                             f"S_churn={S_churn}, S_tmin={S_tmin}, S_tmax={S_tmax}, sigma_data={sigma_data}")
    if not S_tmin <= S_tmax:
        raise HbarInputError(f"edm_churn needs S_tmin <= S_tmax, got {S_tmin}, {S_tmax}")
    ts = make_grid(schedule, steps, "edm", rho=rho)
    s = np.exp(-0.5 * np.asarray(log_snr(schedule, ts), dtype=float))  # noise level sigma / alpha
    gamma = np.where((s[:-1] >= S_tmin) & (s[:-1] <= S_tmax), min(S_churn / steps, EDM_GAMMA_MAX), 0.0)
    v = sigma_data**2 + s**2
    v_hat = sigma_data**2 + ((1.0 + gamma) * s[:-1]) ** 2
    hs = np.log(v_hat / v[:-1]) / np.log(v[:-1] / v[1:])
    f = lambda a: jnp.asarray(a, dtype=jnp.result_type(float))
    return HSteps(f(ts), f(hs))


@dataclasses.dataclass(frozen=True)
class SDEOptions:
    """Options of ``method="sde"`` (diffrax): ``solver`` in :data:`SDE_SOLVERS` (default
    "shark", strong order 1.5 for additive noise); ``adaptive`` PID step control with
    ``rtol`` / ``atol`` (else ``steps`` fixed steps); ``max_steps`` before giving up (rows
    are then flagged as failed); ``bm_tol`` the tolerance of the virtual Brownian tree."""

    solver: str = "shark"
    adaptive: bool = True
    rtol: float = 1e-3
    atol: float = 1e-3
    max_steps: int = 100_000
    bm_tol: float | None = None


def time_grid(schedule: Schedule, steps: int, t_start: float | None = None, t_end: float | None = None,
              dtype=None, grid: str = "uniform", rho: float = 7.0) -> Array:
    """Grid t_0 = t_start, ..., t_steps = t_end, shape (steps + 1,); decreasing by default
    (t_start = T, t_end = t_min), as the backward processes run. Both ends must lie in
    [t_min, T]. ``grid``: "uniform" (default, the paper's), "log-snr" or "edm" (power ``rho``),
    see :mod:`hbar.grids` (docs/theory.md section 2.6)."""
    from hbar.grids import check_grid, make_grid

    if check_grid(grid) != "uniform":
        ts = make_grid(schedule, steps, grid, rho=rho, t_start=t_start, t_end=t_end)
        return jnp.asarray(ts, dtype=dtype or jnp.result_type(float))
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
    valid: (n,) bool: the trajectory stayed finite and inside [-bound, bound]^d (default bound
    100 (prior_std + 1)) and its solver succeeded; a failed trajectory is ended at its first
    offending step (docs/theory.md section 14.1);
    n_failed: number of invalid rows (also warned about: never dropped silently);
    nfe: number of batched score evaluations (each on all n points);
    path: (steps + 1, n, d) trajectory when requested, else None; times: (steps + 1,).
    """

    samples: np.ndarray
    valid: np.ndarray
    n_failed: int
    nfe: int
    h: float | Callable
    method: str
    steps: int
    path: np.ndarray | None = None
    times: np.ndarray | None = None

    @property
    def valid_samples(self) -> np.ndarray:
        return self.samples[self.valid]


def _row_normals(row_keys: Array, k: Array, d: int, dtype) -> Array:
    """Standard normals (n, d) of step k: row i's from its own key, fold_in(row_keys[i], k),
    so a row's noise depends on (seed, point index, step) only, not on its batch."""
    return jax.vmap(lambda rk: jax.random.normal(jax.random.fold_in(rk, k), (d,), dtype=dtype))(row_keys)


def point_keys(key: Array, start: int, stop: int) -> Array:
    """Keys of the points start..stop-1 of a sample: fold_in(key, i) for point index i
    (docs/theory.md section 14.2: samples do not depend on ``batch_size``)."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(start, stop, dtype=jnp.uint32))


def _sde_scan(u: Callable, var_rate: Callable, x0: Array, ts: Array, key: Array, method: str,
              bound: float, keep_path: bool, row_keys: Array | None = None):
    """Fixed-grid Euler–Maruyama / stochastic Heun over the decreasing grid ``ts`` for
    dx = u dt + sqrt(var_rate(t)) dw (var_rate = h g^2 for the h-family).

    Noise: with ``row_keys`` (n,) row i draws its normals from its own key
    (:func:`_row_normals`), else the step's normals come from fold_in(key, k) for the whole array.
    A row whose new state is non-finite or has an entry beyond ``bound`` is ended there: it is
    frozen at that first offending state for the remaining steps (docs/theory.md section 14.1).
    Returns (x, alive (n,) bool, path|None)."""

    def step(carry, inp):
        x, alive = carry
        k, t0, t1 = inp
        dt = t0 - t1  # > 0
        if row_keys is None:
            z = jax.random.normal(jax.random.fold_in(key, k), x.shape, dtype=x.dtype)
        else:
            z = _row_normals(row_keys, k, x.shape[-1], x.dtype)
        u0 = u(x, t0)
        if method == "euler":
            noise = jnp.sqrt(var_rate(t0) * dt) * z
            x_new = x - u0 * dt + noise
        else:  # stochastic Heun with a trapezoidal noise variance
            noise = jnp.sqrt(0.5 * (var_rate(t0) + var_rate(t1)) * dt) * z
            x_pred = x - u0 * dt + noise
            x_new = x - 0.5 * (u0 + u(x_pred, t1)) * dt + noise
        x_new = jnp.where(alive[:, None], x_new, x)
        alive = alive & jnp.all(jnp.isfinite(x_new) & (jnp.abs(x_new) <= bound), axis=-1)
        return (x_new, alive), (x_new if keep_path else None)

    ks = jnp.arange(ts.shape[0] - 1)
    alive0 = jnp.all(jnp.isfinite(x0) & (jnp.abs(x0) <= bound), axis=-1)
    (x, alive), path = jax.lax.scan(step, (x0, alive0), (ks, ts[:-1], ts[1:]))
    return x, alive, path


def sample(
    score: Callable,
    schedule: Schedule,
    key: Array,
    n: int,
    h: float | Callable,
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
    grid: str = "uniform",
    sde_options: SDEOptions = SDEOptions(),
    mesh: distributed.MeshLike = None,
) -> SampleResult:
    """Draw n samples of the h-backward process at t_min (docs/theory.md section 2).

    Args:
        score: score callable s(x, t), (n, d) -> (n, d).
        schedule: forward schedule; the sampler runs from schedule.T to schedule.t_min.
        key: JAX PRNG key (fixes both the prior draw and the Brownian increments).
        n: number of samples. h: noise strength >= 0 (h = 0: probability-flow ODE), or a
            time-dependent h(t) (a jnp-traceable callable, e.g. :func:`h_window`).
        steps: number of fixed steps (euler, heun; "sde" without adaptivity).
        method: "euler" | "heun" (fixed-step scan, the fast path) | "adaptive" (h = 0 ODE) |
            "sde" (diffrax SDE solvers, adaptive by default, see :class:`SDEOptions`).
        d: data dimension (else taken from ``score.dim`` or ``x_T``).
        x_T: optional (n, d) starting points at T (default: draws from the prior).
        bound: a trajectory with a non-finite entry or any |x_i| > bound at any step is ended
            there and counted as failed (``valid``, ``n_failed``, a warning). Default (None):
            100 (prior_std + 1) (:func:`hbar.schedules.default_bound`, for standardised data);
            ``math.inf`` keeps only the non-finite check; <= 0 is an error (docs/theory.md 14.1).
        return_path: keep the whole (steps + 1, n, d) trajectory (euler/heun).
        batch_size: sample in chunks of this many points (memory), with ``progress(done, n)``.
            The samples do not depend on it: point i's noise comes from fold_in(key, i) and its
            adaptive steps ("adaptive", "sde") are its own (docs/theory.md section 14.2).
        grid: time grid of the fixed-step methods, "uniform" (the paper's) | "log-snr" | "edm"
            (:mod:`hbar.grids`; "log-snr" resolves t_min, docs/theory.md section 2.6).
        mesh: devices to run on, data-parallel (docs/theory.md section 15): None = every device
            JAX sees when there are several, else the plain single-device path; an int (1: plain
            path), a device list or a one-axis ``jax.sharding.Mesh``. Each chunk's points are split
            over the devices, the score is replicated, the samples are gathered to every process;
            they do not depend on the layout (a point's noise and steps are its own).
    """
    h_fn = h if callable(h) else None
    if h_fn is None and np.ndim(h) != 0:
        raise HbarInputError(f"h must be a number >= 0 or a callable h(t), got {h!r} (for several h call "
                             f"sample once per h; for a time-dependent h use h_window or HSteps)")
    h_val = float("nan") if h_fn is not None else float(check_h(h)[0])
    n = check_positive_int(n, "n")
    if method not in METHODS:
        raise HbarInputError(f"unknown sampling method {method!r}; choose from {METHODS}")
    if method == "sde" and sde_options.solver not in SDE_SOLVERS:
        raise HbarInputError(f"unknown SDE solver {sde_options.solver!r}; choose from {sorted(SDE_SOLVERS)}")
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
    check_score_shape(score, d, "the samples")
    bnd = resolve_bound(bound, schedule)
    k_prior, k_noise = jax.random.split(key)
    if x_T is None:
        x_T = schedule.prior_sample(k_prior, n, d, dtype=dtype)
    batch = n if batch_size is None else check_positive_int(batch_size, "batch_size")

    ts = time_grid(schedule, steps, dtype=dtype, grid=grid)
    if h_fn is not None:  # check h(t) >= 0 on the grid before compiling anything
        h_grid = np.asarray(jax.vmap(h_fn)(ts))
        check_h(h_grid, "h(t) on the time grid")
        h_arr = h_fn
    else:
        h_arr = jnp.asarray(h_val, dtype=dtype)
    bnd_arr = jnp.asarray(bnd, dtype=dtype)
    mesh = distributed.resolve_mesh(mesh)
    if mesh is not None:
        score, h_arr, bnd_arr, ts = distributed.replicate((score, h_arr, bnd_arr, ts), mesh)

    outs, oks, paths, nfe = [], [], [], 0
    for start in range(0, n, batch):
        x0 = x_T[start:start + batch]
        keys = point_keys(k_noise, start, start + x0.shape[0])
        if mesh is not None:  # the chunk's rows split over the devices, padded (docs/theory.md section 15)
            m, x0_plain = x0.shape[0], x0
            rows = distributed.padded_size(m, mesh)
            x0, keys = (distributed.shard_rows(distributed.pad_rows(a, rows), mesh) for a in (x0, keys))
        if method == "adaptive":
            x, ok, evals = _adaptive_run(score, x0, bnd_arr, schedule=schedule, options=ode_options)
            nfe = max(nfe, int(jnp.max(evals)))
            path = None
        elif method == "sde":
            x, ok, n_steps = _diffrax_run(score, x0, keys, h_arr, bnd_arr, schedule=schedule, options=sde_options,
                                          steps=steps)
            nfe = max(nfe, int(jnp.max(n_steps)) * SDE_SOLVERS[sde_options.solver])
            path = None
        else:
            x, ok, path = _sde_run(score, x0, keys, h_arr, bnd_arr, ts, schedule=schedule, method=method,
                                   keep_path=return_path)
            nfe = steps * (1 if method == "euler" else 2)
        if mesh is not None:
            x, ok, path = distributed.gather((x, ok, path))
            x, ok, path, x0 = x[:m], ok[:m], None if path is None else path[:, :m], x0_plain
        outs.append(np.asarray(x))
        oks.append(np.asarray(ok))
        if return_path and path is not None:
            paths.append(np.concatenate([np.asarray(x0)[None], np.asarray(path)], axis=0))
        if progress is not None:
            progress(min(start + batch, n), n)

    samples = np.concatenate(outs)
    valid = (np.concatenate(oks) & np.asarray(all_finite_rows(jnp.asarray(samples)))
             & np.all(np.abs(samples) <= bnd, axis=1))
    n_failed = int((~valid).sum())
    if n_failed:
        warnings.warn(f"hbar.sample: {n_failed} of {n} trajectories blew up or left the bound (non-finite, "
                      f"|x| > bound = {bnd:.4g} or solver failure; h={h_val if h_fn is None else 'h(t)'}, "
                      f"method={method}); they were ended there and are flagged in result.valid", stacklevel=2)
    return SampleResult(
        samples=samples, valid=valid, n_failed=n_failed, nfe=nfe, h=h_val if h_fn is None else h_fn, method=method,
        steps=steps, path=np.concatenate(paths, axis=1) if paths else None,
        times=np.asarray(ts) if method not in ("adaptive", "sde") else None,
    )


@eqx.filter_jit
def _sde_run(score, x0, row_keys, h, bound, ts, *, schedule, method, keep_path):
    """Jitted fixed-grid run; compiled once per (score structure, schedule, shapes, method):
    h and the bound are traced, so scanning over h does not recompile. ``h`` is a scalar
    array or a callable h(t) (evaluated per step, traced); ``row_keys`` (n,) the points' keys."""
    proc = HProcess(schedule, score)
    hfun = h if callable(h) else (lambda t: h)
    return _sde_scan(lambda x, t: proc.drift(x, t, hfun(t)), lambda t: proc.diffusion2(t, hfun(t)), x0, ts, None,
                     method, bound, keep_path, row_keys=row_keys)


@eqx.filter_jit
def _diffrax_run(score, x0, row_keys, h, bound, *, schedule, options, steps):
    """The h-process with a diffrax SDE solver, one solve per point (vmapped over rows: each
    point has its own Brownian tree from its key in ``row_keys`` and its own step-size
    control), in reversed time tau = -t from -T to -t_min so the solver steps forward:
    dx = -u_h(x, -tau) dtau + sqrt(h g^2)(-tau) dW_tau. Drift and diffusion come from
    :class:`HProcess`. A point's solve ends at once (failed) when its state turns non-finite or
    leaves [-bound, bound]^d, or its step size collapses (docs/theory.md section 14.1).
    Returns (x (n, d), ok (n,), accepted steps (n,))."""

    def one(x, key):
        return _diffrax_one(score, x, key, h, bound, schedule=schedule, options=options, steps=steps)

    return jax.vmap(one)(x0, row_keys)


def _diffrax_one(score, x0, key, h, bound, *, schedule, options, steps):
    """One point (d,) of :func:`_diffrax_run`."""
    import diffrax
    import lineax

    proc = HProcess(schedule, score)
    hfun = h if callable(h) else (lambda t: h)
    (d,) = x0.shape
    n = 1
    t0, t1 = -schedule.T, -schedule.t_min

    def drift(tau, y, args):
        t = -tau
        return -proc.drift(y.reshape(n, d), t, hfun(t)).reshape(-1)

    def diffusion(tau, y, args):
        t = -tau
        amp = jnp.sqrt(proc.diffusion2(t, hfun(t))).astype(y.dtype)
        return lineax.DiagonalLinearOperator(jnp.full(y.shape, amp, dtype=y.dtype))

    levy = diffrax.SpaceTimeLevyArea if options.solver in ("shark", "sra1") else diffrax.BrownianIncrement
    span = t1 - t0
    bm = diffrax.VirtualBrownianTree(t0, t1, tol=options.bm_tol or span / (16 * steps), shape=(n * d,), key=key,
                                     levy_area=levy)
    terms = diffrax.MultiTerm(diffrax.ODETerm(drift), diffrax.ControlTerm(diffusion, bm))
    solver = {"shark": diffrax.ShARK, "sra1": diffrax.SRA1, "heun": diffrax.Heun, "euler": diffrax.Euler}[options.solver]()
    if options.adaptive and options.solver != "euler":
        ctrl = diffrax.PIDController(rtol=options.rtol, atol=options.atol, dtmin=ODEOptions.min_step * span,
                                     force_dtmin=False)
    else:
        ctrl = diffrax.ConstantStepSize()
    event = diffrax.Event(lambda t, y, args, **kw: jnp.any(~jnp.isfinite(y) | (jnp.abs(y) > bound)))
    sol = diffrax.diffeqsolve(terms, solver, t0, t1, span / steps, x0.reshape(-1), stepsize_controller=ctrl,
                              max_steps=options.max_steps, throw=False, event=event)
    x = sol.ys[-1].reshape(d)
    ok = sol.result == diffrax.RESULTS.successful
    return x, ok, sol.stats["num_accepted_steps"]


@eqx.filter_jit
def _adaptive_run(score, x0, bound, *, schedule, options):
    """Per-point adaptive probability-flow solve from T to t_min (vmapped over rows), ended
    (failed) when a point turns non-finite or leaves [-bound, bound]^d."""
    proc = HProcess(schedule, cast_floats(score, x0.dtype))

    def one(x):
        sol = solve_ode(lambda t, y: proc.velocity(y[None], t)[0], x, schedule.T, schedule.t_min, options,
                        bound=bound)
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

