"""Model adapters: networks trained with another library's conventions as hbar scores
(docs/theory.md section 1 for alpha, sigma).

hbar's score contract is ``score(x, t)`` with x (n, d) and t a scalar *or* a time per row
(n,), returning s(x, t) = grad log p_t(x), shape (n, d). Other libraries train other targets
and feed other time variables; with x = alpha(t) x0 + sigma(t) eps (the schedule's
transition kernel, :mod:`hbar.schedules`) the conversions are exact identities:

=========================  =====================================================================
``prediction``             score
=========================  =====================================================================
``"score"``                the model output itself (score_sde)
``"eps"`` (noise)          s = -eps_hat / sigma                                  (DDPM, diffusers)
``"x0"`` (data)            s = (alpha x0_hat - x) / sigma^2
``"v"``                    eps_hat = (sigma x + alpha v_hat) / (alpha^2 + sigma^2), s = -eps_hat / sigma
                           with v = alpha eps - sigma x0 (Salimans & Ho 2022)
``"denoiser"``             s = (alpha D(x / alpha, sigma / alpha) - x) / sigma^2  (EDM's D(x, sigma),
                           k-diffusion; with :class:`hbar.schedules.EDMSchedule` s = (D(x, t) - x) / t^2)
=========================  =====================================================================

The time the model is fed (``model_time``): ``"t"`` (the schedule's time, default),
``"sigma"`` (the EDM / k-diffusion noise level sigma(t) / alpha(t)), ``"timestep"`` (a discrete
DDPM index, :meth:`hbar.schedules.DDPMSchedule.timestep`), or any callable t -> model time.
The model always receives one time per example, shape (n,) (the convention of score_sde,
diffusers and k-diffusion), whatever hbar passes. ``per_example=True`` wraps a model written
for one example, model(x (d,), t ()) -> (d,), with ``jax.vmap``.

Everything is an equinox module, so the wrapped model's weights stay pytree leaves (jit and
grad see through the adapter).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from hbar.schedules import Schedule
from hbar.validation import HbarInputError

__all__ = ["ModelScore", "as_score", "per_example", "from_eps", "from_x0", "from_v", "from_denoiser",
           "PREDICTIONS", "MODEL_TIMES"]

PREDICTIONS = ("score", "eps", "x0", "v", "denoiser")
MODEL_TIMES = ("t", "sigma", "timestep")


def per_row_time(t: Array | float, n: int, dtype: Any) -> Array:
    """A time per example, shape (n,), from a scalar, (n,) or (n, 1) time."""
    t = jnp.asarray(t, dtype=dtype)
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim == 0:
        return jnp.broadcast_to(t, (n,))
    if t.shape != (n,):
        raise HbarInputError(f"time must be a scalar or have shape (n,) = ({n},), got {t.shape}")
    return t


class ModelScore(eqx.Module):
    """hbar score s(x, t) from a model trained with another convention (see module doc).

    ``model(x (n, d), model_time (n,)) -> (n, d)`` (or per example with ``per_example``);
    ``schedule`` the forward schedule the model was trained with; ``dim`` the data dimension
    (optional; lets :func:`hbar.sample` find it)."""

    model: Callable
    schedule: Schedule = eqx.field(static=True)
    prediction: str = eqx.field(static=True, default="score")
    model_time: Any = eqx.field(static=True, default="t")
    per_example: bool = eqx.field(static=True, default=False)
    dim: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        if self.prediction not in PREDICTIONS:
            raise HbarInputError(f"unknown prediction {self.prediction!r}; choose from {PREDICTIONS}")
        if not (callable(self.model_time) or self.model_time in MODEL_TIMES):
            raise HbarInputError(f"model_time must be one of {MODEL_TIMES} or a callable t -> model time, "
                                 f"got {self.model_time!r}")
        if self.model_time == "timestep" and not hasattr(self.schedule, "timestep"):
            raise HbarInputError(f"model_time='timestep' needs a discrete schedule (DDPMSchedule), "
                                 f"got {type(self.schedule).__name__}")

    def _time(self, t: Array) -> Array:
        if callable(self.model_time):
            return jnp.asarray(self.model_time(t))
        if self.model_time == "t":
            return t
        if self.model_time == "sigma":
            return self.schedule.sigma(t) / self.schedule.alpha(t)
        return self.schedule.timestep(t)

    def _call_model(self, x: Array, t: Array) -> Array:
        tm = self._time(t)
        if self.per_example:
            out = jax.vmap(self.model)(x, tm)
        else:
            out = self.model(x, tm)
        out = jnp.asarray(out)
        if out.shape != x.shape:
            raise HbarInputError(f"the wrapped model returned shape {out.shape} for x of shape {x.shape}"
                                 + ("" if self.per_example else " (a model for one example? pass per_example=True)"))
        return out

    def __call__(self, x: Array, t: Array | float) -> Array:
        x = jnp.asarray(x)
        t = per_row_time(t, x.shape[0], jnp.result_type(x.dtype, float))
        sch = self.schedule
        a = sch.alpha(t)[:, None]
        s2 = sch.sigma2(t)[:, None]
        sig = jnp.sqrt(s2)
        if self.prediction == "denoiser":
            out = self._call_model(x / a, t)
            return (a * out - x) / s2
        out = self._call_model(x, t)
        if self.prediction == "score":
            return out
        if self.prediction == "eps":
            return -out / sig
        if self.prediction == "x0":
            return (a * out - x) / s2
        eps = (sig * x + a * out) / (a**2 + s2)  # "v"
        return -eps / sig


def as_score(model: Callable, schedule: Schedule, prediction: str = "score", *, model_time: Any = "t",
             per_example: bool = False, dim: int | None = None) -> ModelScore:
    """Wrap ``model`` as an hbar score (see the module docstring for the conventions)."""
    return ModelScore(model, schedule, prediction, model_time, per_example, dim)


def per_example(model: Callable, schedule: Schedule | None = None, *, dim: int | None = None) -> Callable:
    """Wrap a score model written for one example, model(x (d,), t ()) -> (d,), as a batched
    hbar score (x (n, d), t scalar or (n,)). ``schedule`` is only needed with a conversion;
    here it may be omitted."""
    from hbar.schedules import SimpleSchedule

    return ModelScore(model, schedule or SimpleSchedule(), "score", "t", True, dim)


def from_eps(model: Callable, schedule: Schedule, **kw: Any) -> ModelScore:
    """Noise prediction eps_hat(x, t) -> score -eps_hat / sigma(t)."""
    return as_score(model, schedule, "eps", **kw)


def from_x0(model: Callable, schedule: Schedule, **kw: Any) -> ModelScore:
    """Data prediction x0_hat(x, t) -> score (alpha x0_hat - x) / sigma^2."""
    return as_score(model, schedule, "x0", **kw)


def from_v(model: Callable, schedule: Schedule, **kw: Any) -> ModelScore:
    """v prediction (v = alpha eps - sigma x0) -> score."""
    return as_score(model, schedule, "v", **kw)


def from_denoiser(model: Callable, schedule: Schedule, **kw: Any) -> ModelScore:
    """EDM denoiser D(x, sigma) (input x / alpha, noise level sigma / alpha) -> score.
    The model is fed the EDM noise level unless ``model_time`` says otherwise."""
    kw.setdefault("model_time", "sigma")
    return as_score(model, schedule, "denoiser", **kw)
