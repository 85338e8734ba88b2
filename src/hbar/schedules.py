"""Forward noise schedules with linear drift (docs/theory.md section 1).

Every schedule describes the forward SDE

    dx = f(t) x dt + g(t) dw,        t in [t_min, T],

whose transition kernel from the data at t = 0 is Gaussian,

    x_t | x_0 ~ N(alpha(t) x_0, sigma(t)^2 I),
    alpha(t) = exp(int_0^t f),   sigma(t)^2 = alpha(t)^2 int_0^t g(s)^2 / alpha(s)^2 ds,

and a prior pi = N(0, prior_std^2 I) from which the backward processes start at T.
A schedule is an immutable, hashable dataclass, so it can be closed over or passed
as a static argument to jitted functions. ``log_alpha`` and ``sigma2`` are closed forms
where they exist; :class:`LinearSchedule` integrates user-given f and g^2 numerically.

Shapes: ``t`` is a scalar or any array of times; outputs broadcast like ``t``.
``x`` arguments are (n, d).
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.gaussian import isotropic_logpdf
from hbar.validation import HbarInputError

__all__ = [
    "Schedule",
    "SimpleSchedule",
    "CosineSchedule",
    "VPLinearSchedule",
    "VESchedule",
    "OUSchedule",
    "LinearSchedule",
    "DDPMSchedule",
    "EDMSchedule",
    "schedule_from_config",
    "SCHEDULES",
    "default_bound",
    "resolve_bound",
    "BOUND_FACTOR",
]


@dataclasses.dataclass(frozen=True)
class Schedule(abc.ABC):
    """Base class: subclasses define ``f``, ``g2``, ``log_alpha`` and ``sigma2``."""

    t_min: float
    T: float
    name: ClassVar[str] = "base"

    def __post_init__(self) -> None:
        if not (math.isfinite(self.t_min) and math.isfinite(self.T)):
            raise HbarInputError(f"schedule times must be finite, got t_min={self.t_min}, T={self.T}")
        if not (0.0 <= self.t_min < self.T):
            raise HbarInputError(
                f"schedule needs 0 <= t_min < T, got t_min={self.t_min}, T={self.T}"
            )

    # --- coefficients of the SDE -------------------------------------------------
    @abc.abstractmethod
    def f(self, t: Array | float) -> Array:
        """Linear drift coefficient f(t) (drift is f(t) x)."""
        ...

    @abc.abstractmethod
    def g2(self, t: Array | float) -> Array:
        """Squared diffusion coefficient g(t)^2."""
        ...

    @abc.abstractmethod
    def log_alpha(self, t: Array | float) -> Array:
        """log alpha(t) = int_0^t f(s) ds."""
        ...

    @abc.abstractmethod
    def sigma2(self, t: Array | float) -> Array:
        """sigma(t)^2 = alpha(t)^2 int_0^t g(s)^2 / alpha(s)^2 ds."""
        ...

    @property
    def prior_std(self) -> float:
        """Standard deviation of the prior pi = N(0, prior_std^2 I)."""
        return 1.0

    # --- derived quantities --------------------------------------------------------
    def g(self, t: Array | float) -> Array:
        return jnp.sqrt(self.g2(t))

    def alpha(self, t: Array | float) -> Array:
        return jnp.exp(self.log_alpha(t))

    def sigma(self, t: Array | float) -> Array:
        return jnp.sqrt(self.sigma2(t))

    def drift(self, x: Array, t: Array | float) -> Array:
        """Forward drift f(x, t) = f(t) x, shape of x."""
        return self.f(t) * x

    def marginal_sample(self, key: Array, x0: Array, t: Array) -> tuple[Array, Array]:
        """Draw x_t = alpha(t) x0 + sigma(t) z. ``t`` is scalar or (n,). Returns (x_t, z)."""
        z = jax.random.normal(key, x0.shape, dtype=x0.dtype)
        t = jnp.asarray(t, dtype=x0.dtype)
        tt = t[:, None] if t.ndim == 1 else t
        return self.alpha(tt) * x0 + self.sigma(tt) * z, z

    def prior_sample(self, key: Array, n: int, d: int, dtype: Any = None) -> Array:
        """n draws from pi = N(0, prior_std^2 I), shape (n, d)."""
        dtype = dtype or jnp.result_type(float)
        return self.prior_std * jax.random.normal(key, (n, d), dtype=dtype)

    def prior_logp(self, x: Array) -> Array:
        """log pi(x) per row, shape (n,)."""
        return isotropic_logpdf(x, self.prior_std**2)

    def prior_score(self, x: Array) -> Array:
        """grad log pi(x) = -x / prior_std^2, shape of x."""
        return -x / self.prior_std**2

    # --- validation and serialisation ----------------------------------------------
    def check_time(self, t: float | np.ndarray, what: str = "time") -> None:
        """Raise a clear error if a concrete time lies outside [t_min, T]."""
        arr = np.asarray(t, dtype=float)
        if not np.all(np.isfinite(arr)):
            raise HbarInputError(f"{what} must be finite, got {t}")
        lo, hi = float(arr.min()), float(arr.max())
        tol = 1e-12 * max(1.0, abs(self.T))
        if lo < self.t_min - tol or hi > self.T + tol:
            raise HbarInputError(
                f"{what} {t} lies outside the schedule {self.name!r} range "
                f"[t_min={self.t_min}, T={self.T}]"
            )

    def to_config(self) -> dict[str, Any]:
        """JSON-serialisable description; inverse of :func:`schedule_from_config`."""
        cfg = {"name": self.name}
        cfg.update({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        return cfg


@dataclasses.dataclass(frozen=True)
class SimpleSchedule(Schedule):
    """The paper's SIMPLE VP schedule, beta(t) = 20 t: f = -10 t, g^2 = 20 t,
    alpha = exp(-5 t^2), sigma^2 = 1 - exp(-10 t^2); t in [0.01, 1]."""

    t_min: float = 0.01
    T: float = 1.0
    name: ClassVar[str] = "simple"

    def f(self, t):
        return -10.0 * jnp.asarray(t)

    def g2(self, t):
        return 20.0 * jnp.asarray(t)

    def log_alpha(self, t):
        return -5.0 * jnp.asarray(t) ** 2

    def sigma2(self, t):
        return -jnp.expm1(-10.0 * jnp.asarray(t) ** 2)


@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
    """The paper's COSINE schedule: f = -(pi/2) tan(pi t/2), g^2 = pi tan(pi t/2),
    alpha = cos(pi t/2), sigma^2 = sin(pi t/2)^2; t in [0.01, 1 - 1e-3]."""

    t_min: float = 0.01
    T: float = 1.0 - 1e-3

    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.T >= 1.0:
            raise HbarInputError(f"COSINE schedule needs T < 1 (g^2 diverges at t = 1), got T={self.T}")

    def f(self, t):
        return -0.5 * jnp.pi * jnp.tan(0.5 * jnp.pi * jnp.asarray(t))

    def g2(self, t):
        return jnp.pi * jnp.tan(0.5 * jnp.pi * jnp.asarray(t))

    def log_alpha(self, t):
        return jnp.log(jnp.cos(0.5 * jnp.pi * jnp.asarray(t)))

    def sigma2(self, t):
        return jnp.sin(0.5 * jnp.pi * jnp.asarray(t)) ** 2


@dataclasses.dataclass(frozen=True)
class VPLinearSchedule(Schedule):
    """VP schedule of Song et al. with beta(t) = b0 + t (b1 - b0): f = -beta/2, g^2 = beta,
    log alpha = -(b0 t + (b1 - b0) t^2 / 2) / 2, sigma^2 = 1 - alpha^2."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    t_min: float = 1e-3
    T: float = 1.0
    name: ClassVar[str] = "vp-linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.beta_min <= self.beta_max):
            raise HbarInputError(f"VP schedule needs 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    def _beta(self, t):
        return self.beta_min + jnp.asarray(t) * (self.beta_max - self.beta_min)

    def f(self, t):
        return -0.5 * self._beta(t)

    def g2(self, t):
        return self._beta(t)

    def log_alpha(self, t):
        t = jnp.asarray(t)
        return -0.5 * (self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2)

    def sigma2(self, t):
        return -jnp.expm1(2.0 * self.log_alpha(t))


@dataclasses.dataclass(frozen=True)
class VESchedule(Schedule):
    """Variance-exploding schedule, sigma_VE(t) = s_min (s_max / s_min)^t: f = 0,
    g^2 = d sigma_VE^2 / dt = 2 sigma_VE^2 log(s_max / s_min), alpha = 1,
    sigma^2 = sigma_VE(t)^2 - s_min^2. Prior N(0, s_max^2 I)."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    t_min: float = 1e-3
    T: float = 1.0
    name: ClassVar[str] = "ve"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.sigma_min < self.sigma_max):
            raise HbarInputError(f"VE schedule needs 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")

    @property
    def prior_std(self) -> float:
        return self.sigma_max

    def _log_ratio(self) -> float:
        return math.log(self.sigma_max / self.sigma_min)

    def f(self, t):
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def g2(self, t):
        t = jnp.asarray(t)
        return 2.0 * self._log_ratio() * self.sigma_min**2 * jnp.exp(2.0 * self._log_ratio() * t)

    def log_alpha(self, t):
        return self.f(t)

    def sigma2(self, t):
        return self.sigma_min**2 * jnp.expm1(2.0 * self._log_ratio() * jnp.asarray(t))


@dataclasses.dataclass(frozen=True)
class OUSchedule(Schedule):
    """Ornstein–Uhlenbeck forward process with constant beta: f = -beta/2, g^2 = beta,
    alpha = exp(-beta t / 2), sigma^2 = 1 - exp(-beta t)."""

    beta: float = 1.0
    t_min: float = 1e-3
    T: float = 10.0
    name: ClassVar[str] = "ou"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise HbarInputError(f"OU schedule needs beta > 0, got {self.beta}")

    def f(self, t):
        return jnp.full_like(jnp.asarray(t, dtype=jnp.result_type(float)), -0.5 * self.beta)

    def g2(self, t):
        return jnp.full_like(jnp.asarray(t, dtype=jnp.result_type(float)), self.beta)

    def log_alpha(self, t):
        return -0.5 * self.beta * jnp.asarray(t)

    def sigma2(self, t):
        return -jnp.expm1(-self.beta * jnp.asarray(t))


@dataclasses.dataclass(frozen=True)
class DDPMSchedule(Schedule):
    """The discrete-beta schedule of DDPM (Ho et al. 2020) and of ``diffusers``' DDPMScheduler,
    embedded in continuous time t in [0, 1] with N = ``n_steps`` steps of length 1/N.

    Betas: ``beta_schedule = "linear"`` (beta_k = linspace(beta_start, beta_end, N)) or
    ``"scaled_linear"`` (Stable Diffusion: linspace(sqrt(beta_start), sqrt(beta_end), N)^2).
    On step k (t in ((k-1)/N, k/N], k = 1..N) the rate is constant,
    beta(t) = -N log(1 - beta_k), with f = -beta(t)/2, g^2 = beta(t), so that at the grid
    times t_k = k/N

        alpha(t_k)^2 = prod_{i<=k} (1 - beta_i) = alphas_cumprod[k - 1],   sigma^2 = 1 - alpha^2

    exactly (between grid times log alpha is linear). A discrete model's timestep index is
    k - 1 = N t - 1 (:meth:`timestep`; integer on the grid, fractional between). Default
    t_min = 1/N (the first DDPM step), T = 1.
    """

    beta_start: float = 1e-4
    beta_end: float = 0.02
    n_steps: int = 1000
    beta_schedule: str = "linear"
    t_min: float | None = None  # type: ignore[assignment]
    T: float = 1.0
    name: ClassVar[str] = "ddpm"

    def __post_init__(self) -> None:
        if isinstance(self.n_steps, bool) or not float(self.n_steps).is_integer() or int(self.n_steps) < 1:
            raise HbarInputError(f"DDPM schedule needs an integer n_steps >= 1, got {self.n_steps!r}")
        object.__setattr__(self, "n_steps", int(self.n_steps))
        if self.t_min is None:
            object.__setattr__(self, "t_min", 1.0 / self.n_steps)
        super().__post_init__()
        if self.T > 1.0 + 1e-12:
            raise HbarInputError(f"DDPM schedule lives on t in [0, 1], got T={self.T}")
        if not (0 < self.beta_start <= self.beta_end < 1):
            raise HbarInputError(f"DDPM schedule needs 0 < beta_start <= beta_end < 1, got {self.beta_start}, {self.beta_end}")
        if self.beta_schedule == "linear":
            betas = np.linspace(self.beta_start, self.beta_end, self.n_steps)
        elif self.beta_schedule == "scaled_linear":
            betas = np.linspace(math.sqrt(self.beta_start), math.sqrt(self.beta_end), self.n_steps) ** 2
        else:
            raise HbarInputError(f"DDPM beta_schedule must be 'linear' or 'scaled_linear', got {self.beta_schedule!r}")
        rate = -self.n_steps * np.log1p(-betas)  # beta(t) on each step
        cum = np.concatenate([[0.0], np.cumsum(rate) / self.n_steps])[:-1]  # int_0^{(k-1)/N} beta
        object.__setattr__(self, "_rate", rate)
        object.__setattr__(self, "_cum", cum)

    @property
    def betas(self) -> np.ndarray:
        """The discrete betas, shape (N,)."""
        return -np.expm1(-self._rate / self.n_steps)

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """prod_{i<=k} (1 - beta_i), shape (N,) (diffusers' ``alphas_cumprod``)."""
        return np.cumprod(1.0 - self.betas)

    def _seg(self, t):
        t = jnp.asarray(t, dtype=jnp.result_type(float))
        k = jnp.clip(jnp.ceil(t * self.n_steps) - 1, 0, self.n_steps - 1).astype(jnp.int32)
        return t, k

    def timestep(self, t):
        """The discrete model's timestep index N t - 1 (0-based, fractional between grid times)."""
        return jnp.asarray(t) * self.n_steps - 1.0

    def _B(self, t):
        t, k = self._seg(t)
        rate = jnp.asarray(self._rate, dtype=t.dtype)[k]
        return jnp.asarray(self._cum, dtype=t.dtype)[k] + (t - k.astype(t.dtype) / self.n_steps) * rate

    def f(self, t):
        _, k = self._seg(t)
        return -0.5 * jnp.asarray(self._rate, dtype=jnp.result_type(float))[k]

    def g2(self, t):
        _, k = self._seg(t)
        return jnp.asarray(self._rate, dtype=jnp.result_type(float))[k]

    def log_alpha(self, t):
        return -0.5 * self._B(t)

    def sigma2(self, t):
        return -jnp.expm1(-self._B(t))


@dataclasses.dataclass(frozen=True)
class EDMSchedule(Schedule):
    """The EDM schedule (Karras et al. 2022; k-diffusion's sigma parametrisation): time is
    the noise level, sigma(t) = t, alpha = 1, so f = 0, g^2 = d sigma^2/dt = 2 t and
    sigma^2 = t^2. t in [sigma_min, sigma_max] = [t_min, T] (default [0.002, 80]); prior
    N(0, T^2 I) as EDM samples x_T. A denoiser D(x, sigma) gives the score
    (D(x, t) - x) / t^2 (:func:`hbar.adapters.from_denoiser`)."""

    t_min: float = 0.002
    T: float = 80.0
    name: ClassVar[str] = "edm"

    @property
    def prior_std(self) -> float:
        return self.T

    def f(self, t):
        return jnp.zeros_like(jnp.asarray(t, dtype=jnp.result_type(float)))

    def g2(self, t):
        return 2.0 * jnp.asarray(t, dtype=jnp.result_type(float))

    def log_alpha(self, t):
        return self.f(t)

    def sigma2(self, t):
        return jnp.asarray(t, dtype=jnp.result_type(float)) ** 2



def _integrate_log_alpha_sigma2(
    f: Callable, g2: Callable, t_grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Solve d(log alpha)/dt = f, d(sigma^2)/dt = 2 f sigma^2 + g^2 from t = 0 on ``t_grid``
    with a tight-tolerance scipy integrator. Returns (log_alpha, sigma2) on the grid."""
    from scipy.integrate import solve_ivp

    def rhs(t, y):
        ft = float(f(t))
        return [ft, 2.0 * ft * y[1] + float(g2(t))]

    sol = solve_ivp(rhs, (0.0, float(t_grid[-1])), [0.0, 0.0], t_eval=t_grid, method="DOP853",
                    rtol=1e-13, atol=1e-15)
    if not sol.success:
        raise HbarInputError(f"could not integrate the user schedule: {sol.message}")
    return sol.y[0], sol.y[1]


@dataclasses.dataclass(frozen=True, eq=False)
class LinearSchedule(Schedule):
    """A user-defined linear schedule given f(t) and g(t)^2 as callables.

    ``f`` and ``g2`` must accept floats and JAX arrays (write them with ``jnp``).
    alpha and sigma^2 are obtained once at construction by integrating
    d(log alpha)/dt = f and d(sigma^2)/dt = 2 f sigma^2 + g^2 from t = 0 (scipy DOP853,
    rtol 1e-13) on ``n_grid`` nodes, and evaluated between nodes by cubic Hermite
    interpolation with the exact derivatives (error O(dt^4)).
    """

    f_fn: Callable[[Any], Any] = None  # type: ignore[assignment]
    g2_fn: Callable[[Any], Any] = None  # type: ignore[assignment]
    t_min: float = 1e-3
    T: float = 1.0
    std_prior: float = 1.0
    n_grid: int = 4001
    name: ClassVar[str] = "linear"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (callable(self.f_fn) and callable(self.g2_fn)):
            raise HbarInputError("LinearSchedule needs callables f_fn(t) and g2_fn(t)")
        grid = np.linspace(0.0, self.T, self.n_grid)
        la, s2 = _integrate_log_alpha_sigma2(self.f_fn, self.g2_fn, grid)
        fg = np.array([float(self.f_fn(t)) for t in grid])
        gg = np.array([float(self.g2_fn(t)) for t in grid])
        if not (np.all(np.isfinite(la)) and np.all(np.isfinite(s2)) and np.all(gg >= 0)):
            raise HbarInputError("user schedule gives non-finite alpha/sigma or negative g^2")
        object.__setattr__(self, "_grid", grid)
        object.__setattr__(self, "_tab", (la, fg, s2, 2 * fg * s2 + gg))

    __hash__ = object.__hash__

    @property
    def prior_std(self) -> float:
        return self.std_prior

    def _hermite(self, t, y, dy):
        grid = self._grid
        h = grid[1] - grid[0]
        t = jnp.asarray(t)
        i = jnp.clip(jnp.floor(t / h).astype(jnp.int32), 0, len(grid) - 2)
        u = t / h - i
        y0, y1 = jnp.asarray(y)[i], jnp.asarray(y)[i + 1]
        d0, d1 = jnp.asarray(dy)[i] * h, jnp.asarray(dy)[i + 1] * h
        h00 = 2 * u**3 - 3 * u**2 + 1
        h10 = u**3 - 2 * u**2 + u
        h01 = -2 * u**3 + 3 * u**2
        h11 = u**3 - u**2
        return h00 * y0 + h10 * d0 + h01 * y1 + h11 * d1

    def f(self, t):
        return jnp.asarray(self.f_fn(t))

    def g2(self, t):
        return jnp.asarray(self.g2_fn(t))

    def log_alpha(self, t):
        la, fg, _, _ = self._tab
        return self._hermite(t, la, fg)

    def sigma2(self, t):
        _, _, s2, ds2 = self._tab
        return self._hermite(t, s2, ds2)

    def to_config(self) -> dict[str, Any]:
        raise HbarInputError(
            "a LinearSchedule holds Python callables and cannot be written to a config; "
            "use a named schedule for checkpoints"
        )


SCHEDULES: dict[str, type[Schedule]] = {
    cls.name: cls
    for cls in (SimpleSchedule, CosineSchedule, VPLinearSchedule, VESchedule, OUSchedule, DDPMSchedule, EDMSchedule)
}


def schedule_from_config(cfg: dict[str, Any] | str) -> Schedule:
    """Build a schedule from ``{"name": ..., **params}`` or a bare name."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    if not isinstance(cfg, dict) or "name" not in cfg:
        raise HbarInputError(f"schedule config must be a name or a dict with 'name', got {cfg!r}")
    params = dict(cfg)
    name = params.pop("name")
    if name not in SCHEDULES:
        raise HbarInputError(f"unknown schedule {name!r}; known: {sorted(SCHEDULES)}")
    cls = SCHEDULES[name]
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(params) - allowed
    if unknown:
        raise HbarInputError(f"unknown parameters {sorted(unknown)} for schedule {name!r}; allowed: {sorted(allowed)}")
    kinds = {f.name: f.type for f in dataclasses.fields(cls)}

    def cast(k, v):
        if kinds[k] == "str":
            return str(v)
        if kinds[k] == "int":
            if isinstance(v, bool) or not float(v).is_integer():
                raise ValueError(f"{k} must be an integer, got {v!r}")
            return int(v)
        return None if v is None else float(v)

    try:
        return cls(**{k: cast(k, v) for k, v in params.items()})
    except (TypeError, ValueError) as err:
        raise HbarInputError(f"bad parameters for schedule {name!r}: {err}") from err


#: multiple of (prior scale + data scale) beyond which a trajectory counts as blown up
BOUND_FACTOR = 100.0


def default_bound(schedule: Schedule, data_scale: float = 1.0) -> float:
    """The default divergence bound of every sampler and solve (docs/theory.md section 14.1):

        bound = BOUND_FACTOR (prior_std + data_scale) = 100 (prior_std + data_scale),

    with ``data_scale`` the largest |x_i| of the data (:func:`hbar.nll`) or 1 (the sampler:
    hbar's data sets are standardised; pass ``bound`` for data of another scale). Every
    marginal x_t = alpha x_0 + sigma z with alpha <= 1 (VP, VE, EDM) stays far inside it, so a
    trajectory that leaves [-bound, bound]^d has diverged."""
    scale = float(schedule.prior_std) + float(data_scale)
    return BOUND_FACTOR * scale


def resolve_bound(bound: float | None, schedule: Schedule, data_scale: float = 1.0) -> float:
    """``bound`` checked (a number > 0; ``math.inf`` switches the bound off, leaving only the
    non-finite check), or :func:`default_bound` when it is None."""
    if bound is None:
        return default_bound(schedule, data_scale)
    if isinstance(bound, (bool, np.bool_)) or not isinstance(bound, (int, float, np.integer, np.floating)) \
            or math.isnan(bound) or not bound > 0:
        raise HbarInputError(f"bound must be a number > 0 (or math.inf for no bound), got {bound!r}")
    return float(bound)
