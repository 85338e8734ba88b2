"""Time grids for the samplers and the path tools (docs/theory.md section 2.6).

Every fixed-step tool of hbar runs on a decreasing grid T = t_0 > t_1 > ... > t_N = t_min.
The discretisation error of an Euler step is set by the step's noise variance h g^2 D against
the local width of the density, sigma(t)^2: near t_min the data are sharp (sigma(t_min)^2 ~ 1e-3
for the paper's SIMPLE schedule) while a uniform grid of 100 steps has h g^2 D ~ 2e-3 h there.
The grids, chosen by name:

``"uniform"``  t_k = T + k (t_min - T) / N (the paper's sampler).
``"log-snr"``  uniform in lambda(t) = log(alpha^2 / sigma^2), the log signal-to-noise ratio;
               every step removes the same fraction of noise; near t = 0 this is geometric
               in t for the VP schedules (lambda ~ -log(c t^2)).
``"edm"``      Karras et al. (2022) power grid in the noise level s(t) = sigma / alpha:
               s_k = (s_max^(1/rho) + k/N (s_min^(1/rho) - s_max^(1/rho)))^rho, rho = 7 by
               default; rho = 1 is uniform in s, rho -> infinity tends to "log-snr".

Both non-uniform grids are mapped back to t by inverting the monotone lambda(t) (bisection in
float64). ``DEFAULT_GRID`` ("log-snr") resolves t_min for every schedule hbar ships: with
100 steps the relative noise variance of every step, g^2 D / sigma^2 (see
:func:`grid_resolution`), is at most 0.18-0.26 for SIMPLE, COSINE, VP-linear, VE and OU (and
scales as 1/steps), against 3.9-100 in the last step of the uniform grid ("edm", rho = 7:
0.38-0.71).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["GRIDS", "DEFAULT_GRID", "make_grid", "check_grid", "grid_resolution", "log_snr"]

GRIDS = ("uniform", "log-snr", "edm")
DEFAULT_GRID = "log-snr"


def check_grid(grid: str) -> str:
    """The canonical grid name (``"power"`` and ``"logsnr"`` accepted as aliases)."""
    aliases = {"power": "edm", "logsnr": "log-snr", "log_snr": "log-snr"}
    name = aliases.get(grid, grid) if isinstance(grid, str) else grid
    if name not in GRIDS:
        raise HbarInputError(f"unknown time grid {grid!r}; choose from {GRIDS}")
    return name


def log_snr(schedule: Schedule, t: Any) -> np.ndarray:
    """lambda(t) = log(alpha(t)^2 / sigma(t)^2), decreasing in t, float64 NumPy."""
    t = np.asarray(t, dtype=float)
    la = np.asarray(schedule.log_alpha(jnp.asarray(t, jnp.float64 if _x64() else jnp.float32)), dtype=float)
    s2 = np.asarray(schedule.sigma2(jnp.asarray(t, jnp.float64 if _x64() else jnp.float32)), dtype=float)
    return 2.0 * la - np.log(s2)


def _x64() -> bool:
    return jnp.result_type(float) == jnp.float64


def _invert_log_snr(schedule: Schedule, lam: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """t in [lo, hi] with lambda(t) = lam (lambda decreasing), by 100 bisection steps."""
    a = np.full(lam.shape, lo, dtype=float)
    b = np.full(lam.shape, hi, dtype=float)
    for _ in range(100):
        m = 0.5 * (a + b)
        above = log_snr(schedule, m) > lam  # lambda(m) > target: the root lies to the right
        a = np.where(above, m, a)
        b = np.where(above, b, m)
        if np.all(b - a <= 1e-15 * np.maximum(1.0, np.abs(b))):
            break
    return 0.5 * (a + b)


def make_grid(schedule: Schedule, steps: int, grid: str = DEFAULT_GRID, *, rho: float = 7.0,
              t_start: float | None = None, t_end: float | None = None) -> np.ndarray:
    """The time grid ``grid`` (one of :data:`GRIDS`) with ``steps`` steps from t_start (default T)
    to t_end (default t_min), float64 NumPy of shape (steps + 1,), exact end points; decreasing
    when t_start > t_end (the backward processes), increasing otherwise. ``rho`` > 0: the power
    of the "edm" grid. The non-uniform grids need t_start, t_end > 0 when sigma(0) = 0."""
    name = check_grid(grid)
    steps = check_positive_int(steps, "steps")
    t0 = float(schedule.T if t_start is None else t_start)
    t1 = float(schedule.t_min if t_end is None else t_end)
    schedule.check_time([t0, t1], "time grid end")
    if t0 == t1:
        raise HbarInputError(f"a time grid needs t_start != t_end, got {t0} twice")
    if name == "uniform":
        return np.linspace(t0, t1, steps + 1)
    lo, hi = min(t0, t1), max(t0, t1)
    l0, l1 = log_snr(schedule, np.array([t0, t1]))
    if not (np.isfinite(l0) and np.isfinite(l1)):
        raise HbarInputError(f"grid {name!r} needs a finite log-SNR at both ends (sigma > 0), got times {t0}, {t1}")
    k = np.arange(steps + 1) / steps
    if name == "log-snr":
        lam = l0 + k * (l1 - l0)
    else:
        if not rho > 0:
            raise HbarInputError(f"rho must be > 0, got {rho}")
        s0, s1 = np.exp(-0.5 * l0), np.exp(-0.5 * l1)  # s = sigma / alpha = exp(-lambda / 2)
        s = (s0 ** (1.0 / rho) + k * (s1 ** (1.0 / rho) - s0 ** (1.0 / rho))) ** rho
        lam = -2.0 * np.log(s)
    ts = _invert_log_snr(schedule, lam, lo, hi)
    ts[0], ts[-1] = t0, t1
    d = np.diff(ts)
    if not (np.all(d < 0) if t0 > t1 else np.all(d > 0)):
        raise HbarInputError(f"grid {name!r} with {steps} steps is not strictly monotone (too many steps for "
                             "float64 near an end)")
    return ts


def backward_grid(schedule: Schedule, steps: int = 100, grid: str = DEFAULT_GRID, times: Any = None) -> np.ndarray:
    """The decreasing time grid T -> t_min of a backward chain, shape (steps + 1,): ``grid`` with
    ``steps`` steps (:func:`make_grid`), or the given ``times``, checked to be strictly decreasing
    from T to t_min and inside the schedule's time range."""
    if times is None:
        return make_grid(schedule, check_positive_int(steps, "steps"), grid)
    ts = np.asarray(times, dtype=float)
    if ts.ndim != 1 or ts.size < 2 or not np.all(np.diff(ts) < 0):
        raise HbarInputError("times must be a strictly decreasing grid from T to t_min")
    if not (np.isclose(ts[0], schedule.T) and np.isclose(ts[-1], schedule.t_min)):
        raise HbarInputError(f"times must run from T={schedule.T} to t_min={schedule.t_min}")
    schedule.check_time(ts, "times")
    return ts


def grid_resolution(schedule: Schedule, ts: Any) -> np.ndarray:
    """Relative noise variance of each step of the h = 1 chain, g(t_k)^2 D_k / sigma(t_{k+1})^2
    for a decreasing grid (the variance the step adds against the width of the density it
    arrives at; shape (steps,)). Values << 1 resolve the data scale; the uniform 100-step grid
    of the SIMPLE schedule has about 2 in its last step."""
    ts = np.asarray(ts, dtype=float)
    if ts[0] < ts[-1]:
        ts = ts[::-1]
    dt = jnp.float64 if _x64() else jnp.float32
    g2 = np.asarray(schedule.g2(jnp.asarray(ts[:-1], dt)), dtype=float)
    s2 = np.asarray(schedule.sigma2(jnp.asarray(ts[1:], dt)), dtype=float)
    return g2 * (ts[:-1] - ts[1:]) / s2
