"""Log-likelihoods of the h-family: the exact h = 0 value and its WKB expansion in h.

h = 0 (theory.md section 4): along the probability-flow characteristic

    dx/dtau = v0(x, tau) = f(tau) x - (g(tau)^2 / 2) s(x, tau),   x(t_min) = data point,
    log q^0_{t_min}(x) = log pi(x_T) + int_{t_min}^T div v0(x_tau, tau) dtau,

integrated from data towards noise (t increasing). The divergence is exact (d jvps) or the
Hutchinson–Skilling estimate eps^T (dv0/dx) eps with one probe eps per trajectory, fixed
along it (unbiased for the log-likelihood, since the estimate is linear in the integrand).

For order >= 1 the backward characteristic solve of :mod:`hbar.wkb` adds the WKB
coefficients, NLL(h) = NLL0 + h C1 + h^2 C2 + O(h^3) per point (theory.md sections 5, 6).

Solves are batched over points with the max-norm error controller of :mod:`hbar.ode`, so
each point meets the tolerance. If a batched solve fails, the batch is solved again point
by point to find the failing trajectories, which are reported (``valid``, ``n_failed``),
never dropped silently.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.derivatives import divergence, divergence_hutchinson
from hbar.ode import ODEOptions, all_finite_rows, solve_ode
from hbar.sampling import cast_floats
from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_h, check_points, check_positive_int

__all__ = ["LikelihoodResult", "nll", "pf_log_likelihood", "bits_per_dim", "pf_velocity"]

EXACT_DIVERGENCE_MAX_DIM = 64


def pf_velocity(score: Callable, schedule: Schedule, x: Array, t: Array) -> Array:
    """v0(x, t) = f(t) x - (g(t)^2/2) s(x, t), shape (n, d)."""
    return schedule.f(t) * x - 0.5 * schedule.g2(t) * score(x, t)


def pf_log_likelihood(
    score: Callable,
    schedule: Schedule,
    x: Array,
    t0: Array | float,
    options: ODEOptions,
    probe: Array | None = None,
) -> dict[str, Array]:
    """log q^0_{t0}(x) by the forward probability-flow solve from t0 to T (traceable).

    x: (n, d) points at time t0; probe: None for the exact divergence, else (n, d)
    Hutchinson probes. Returns dict(ell0 (n,), x_T (n, d), ok (bool), evals (int)).
    """
    def field(t, y):
        X, _ = y
        if probe is None:
            v, div = divergence(lambda z: pf_velocity(score, schedule, z, t), X)
        else:
            v, div = divergence_hutchinson(lambda z: pf_velocity(score, schedule, z, t), X, probe)
        return (v, div)

    y0 = (x, jnp.zeros(x.shape[0], dtype=x.dtype))
    sol = solve_ode(field, y0, t0, schedule.T, options)
    x_T, delta = sol["y1"]
    return dict(ell0=schedule.prior_logp(x_T) + delta, x_T=x_T, ok=sol["ok"], evals=sol["evals"])


@dataclasses.dataclass
class LikelihoodResult:
    """Per-point NLL at h = 0 and WKB coefficients, NLL(h) ~ nll0 + h c1 + h^2 c2.

    Arrays are (n,) in nats; c1 / c2 are None when not computed. ``valid`` flags points
    whose solves succeeded and stayed within ``bound``; statistics use valid points only
    and ``n_failed`` counts the others. ``evals_forward`` / ``evals_backward`` are the
    numbers of vector-field evaluations of the forward and backward solves (each on a
    batch; one evaluation = one score pass plus its derivatives).
    """

    nll0: np.ndarray
    c1: np.ndarray | None
    c2: np.ndarray | None
    valid: np.ndarray
    n_failed: int
    order: int
    method: str
    divergence: str
    evals_forward: int
    evals_backward: int
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    @staticmethod
    def _mean_se(a: np.ndarray) -> tuple[float, float]:
        a = a[np.isfinite(a)]
        if a.size == 0:
            return math.nan, math.nan
        se = float(a.std(ddof=1) / math.sqrt(a.size)) if a.size > 1 else math.nan
        return float(a.mean()), se

    def _stat(self, arr):
        if arr is None:
            return None
        return self._mean_se(np.where(self.valid, arr, np.nan))

    @property
    def nll0_mean(self) -> tuple[float, float]:
        """(mean, standard error) of nll0 over valid points."""
        return self._stat(self.nll0)

    @property
    def c1_mean(self) -> tuple[float, float] | None:
        return self._stat(self.c1)

    @property
    def c2_mean(self) -> tuple[float, float] | None:
        return self._stat(self.c2)

    def nll(self, h: float | np.ndarray, order: int | None = None, per_point: bool = False):
        """The WKB expansion NLL0 + h C1 (+ h^2 C2) at the given h (to ``order``, default all).
        Mean over valid points, or per point when ``per_point``."""
        hh = check_h(h)
        order = self.order if order is None else order
        if order > self.order:
            raise HbarInputError(f"order {order} requested but only order {self.order} was computed")
        per = self.nll0[None, :] + 0 * hh[:, None]
        if order >= 1:
            per = per + hh[:, None] * self.c1[None, :]
        if order >= 2:
            per = per + hh[:, None] ** 2 * self.c2[None, :]
        if per_point:
            return per if np.ndim(h) else per[0]
        out = np.nanmean(np.where(self.valid[None, :], per, np.nan), axis=1)
        return out if np.ndim(h) else float(out[0])

    def summary(self) -> dict[str, Any]:
        out = {"n": int(self.nll0.shape[0]), "n_failed": self.n_failed, "order": self.order,
               "method": self.method, "divergence": self.divergence,
               "evals_forward": self.evals_forward, "evals_backward": self.evals_backward,
               "nll0": self.nll0_mean}
        if self.c1 is not None:
            out["c1"] = self.c1_mean
        if self.c2 is not None:
            out["c2"] = self.c2_mean
        return out


def bits_per_dim(nll: np.ndarray | float, d: int, levels: int = 256,
                 data_range: tuple[float, float] = (0.0, 1.0)) -> np.ndarray | float:
    """Bits per dimension of discrete data under uniform dequantisation.

    Data with ``levels`` integer values k are mapped to y = lo + (hi - lo)(k + u)/levels,
    u ~ U[0, 1)^d. Then -log2 P(k) <= [NLL(y) - d log((hi - lo)/levels)] / (d ln 2), which
    is what is returned; for 8-bit data on [0, 1] the offset is +8 bits, on [-1, 1] +7.
    """
    lo, hi = data_range
    if not hi > lo or levels < 2:
        raise HbarInputError(f"bad dequantisation convention: range {data_range}, levels {levels}")
    return (np.asarray(nll) - d * math.log((hi - lo) / levels)) / (d * math.log(2.0))


def _pad_rows(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[0] == size:
        return x
    return np.concatenate([x, np.repeat(x[-1:], size - x.shape[0], axis=0)])


def run_batched(fn: Callable[..., dict], score: Callable, arrays: list[np.ndarray], batch_size: int,
                progress: Callable[[int, int], None] | None = None, **static: Any) -> dict[str, np.ndarray]:
    """Apply a batch function ``fn(score, *arrays, **static)`` to row chunks of ``arrays``
    (padded to one shape so it compiles once; compiled functions are cached across calls by
    ``equinox.filter_jit``, so a second call with the same score is not recompiled).

    ``fn`` returns a dict with per-row arrays and scalars ``ok``, ``evals_*``. A chunk whose
    solve failed is re-run row by row (vmapped) so that the failing rows are identified;
    their ``row_ok`` is False. Returns concatenated rows, ``row_ok`` and the maximum of
    each ``evals_*`` counter.
    """
    n = arrays[0].shape[0]
    bs = min(batch_size, n)
    chunks: dict[str, list] = {}
    evals: dict[str, int] = {}
    for start in range(0, n, bs):
        stop = min(start + bs, n)
        args = [jnp.asarray(_pad_rows(a[start:stop], bs)) for a in arrays]
        out = _jit_batch(fn, score, args, static)
        if bool(out["ok"]):
            row_ok = np.ones(bs, dtype=bool)
        else:
            out = _jit_rows(fn, score, args, static)
            out = {k: (v[:, 0] if (k != "ok" and not k.startswith("evals") and v.ndim >= 2) else v)
                   for k, v in out.items()}
            row_ok = np.asarray(out["ok"]).reshape(bs)
        for k, v in out.items():
            if k == "ok":
                continue
            if k.startswith("evals"):
                evals[k] = max(evals.get(k, 0), int(np.max(np.asarray(v))))
                continue
            chunks.setdefault(k, []).append(np.asarray(v)[: stop - start])
        chunks.setdefault("row_ok", []).append(row_ok[: stop - start])
        if progress is not None:
            progress(stop, n)
    result = {k: np.concatenate(v) for k, v in chunks.items()}
    result.update(evals)
    return result


@eqx.filter_jit
def _jit_batch(fn, score, args, static):
    return fn(cast_floats(score, args[0].dtype), *args, **static)


@eqx.filter_jit
def _jit_rows(fn, score, args, static):
    score = cast_floats(score, args[0].dtype)
    return jax.vmap(lambda *rows: fn(score, *[r[None] for r in rows], **static))(*args)


def _batch_characteristics(score, xb, pb=None, *, schedule, order, options):
    """One batch of the forward probability-flow solve and, for order >= 1, the backward
    characteristic solve of :mod:`hbar.wkb`."""
    from hbar.wkb import backward_characteristic

    fwd = pf_log_likelihood(score, schedule, xb, schedule.t_min, options, probe=pb)
    out = dict(ell0=fwd["ell0"], x_T=fwd["x_T"], ok=fwd["ok"], evals_forward=fwd["evals"])
    if order >= 1:
        bwd = backward_characteristic(score, schedule, fwd["x_T"], order, options)
        out.update(ell1=bwd["ell1"], x_back=bwd["x"], ell0_back=bwd["ell0"],
                   ok=fwd["ok"] & bwd["ok"], evals_backward=bwd["evals"])
        if order >= 2:
            out["ell2"] = bwd["ell2"]
    return out


def _batch_finite_difference(score, xb, *, schedule, options, inner, fd_step):
    """One batch of the forward solve plus the paper's finite-difference C1 baseline."""
    from hbar.wkb import finite_difference_ell1

    fwd = pf_log_likelihood(score, schedule, xb, schedule.t_min, options)
    fd = finite_difference_ell1(score, schedule, xb, options, inner, fd_step)
    return dict(ell0=fwd["ell0"], x_T=fwd["x_T"], ell1=fd["ell1"], ok=fwd["ok"] & fd["ok"],
                evals_forward=fwd["evals"], evals_backward=fd["evals"])


def nll(
    score: Callable,
    schedule: Schedule,
    x: Any,
    order: int = 0,
    *,
    method: str = "characteristics",
    divergence: str = "auto",
    key: Array | None = None,
    options: ODEOptions = ODEOptions(),
    inner_options: ODEOptions | None = None,
    fd_step: float = 0.01,
    bound: float | None = None,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
) -> LikelihoodResult:
    """Negative log-likelihood of data points under the h-family model, with WKB terms.

    Args:
        score: score callable s(x, t), (n, d) -> (n, d).
        schedule: forward schedule; the model density is evaluated at t_min.
        x: (n, d) data points (NaN/inf rejected).
        order: 0 (NLL at h = 0), 1 (adds C1 = dNLL/dh at 0), 2 (adds C2, d <= 2).
        method: "characteristics" (exact autodiff, theory.md section 5) or
            "finite-difference" (the paper's algorithm, order 1 only; theory.md section 5,
            first bullet: central differences of nested solves with step ``fd_step``).
        divergence: "exact", "hutchinson" (order 0 only) or "auto" (exact for d <= 64).
        key: PRNG key for Hutchinson probes (Rademacher, one per trajectory).
        options: tolerances of the solves; inner_options: of the nested solves of the
            finite-difference baseline (default: same as ``options``).
        bound: points whose x_T (or backward return) leave [-bound, bound]^d are failed.
        batch_size: points per jitted batch; progress(done, n) is called after each.
    """
    xs = check_points(x, "x")
    n, d = xs.shape
    if order not in (0, 1, 2):
        raise HbarInputError(f"order must be 0, 1 or 2, got {order}")
    if method not in ("characteristics", "finite-difference"):
        raise HbarInputError(f"unknown method {method!r}; use 'characteristics' or 'finite-difference'")
    if method == "finite-difference" and order != 1:
        raise HbarInputError("the finite-difference baseline computes order=1 only")
    if divergence == "auto":
        divergence = "exact" if d <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise HbarInputError(f"divergence must be 'exact', 'hutchinson' or 'auto', got {divergence!r}")
    if divergence == "hutchinson" and order > 0:
        raise HbarInputError("Hutchinson divergence is available for order=0 only; use divergence='exact'")
    if order == 2 and d > 2:
        warnings.warn(f"order=2 in d={d}: the cost grows like d^4 per step", stacklevel=2)
    batch_size = check_positive_int(batch_size, "batch_size")
    dtype = jnp.result_type(float)
    xs = xs.astype(dtype)
    arrays = [xs]
    if divergence == "hutchinson":
        if key is None:
            raise HbarInputError("divergence='hutchinson' needs a PRNG key")
        probe = np.asarray(jax.random.rademacher(key, (n, d), dtype=dtype))
        arrays.append(probe)

    if method == "finite-difference":
        res = run_batched(_batch_finite_difference, score, arrays, batch_size, progress,
                          schedule=schedule, options=options, inner=inner_options or options,
                          fd_step=float(fd_step))
    else:
        res = run_batched(_batch_characteristics, score, arrays, batch_size, progress,
                          schedule=schedule, order=order, options=options)
    valid = res["row_ok"] & np.isfinite(res["ell0"]) & np.asarray(all_finite_rows(jnp.asarray(res["x_T"])))
    if bound is not None:
        valid &= np.all(np.abs(res["x_T"]) <= bound, axis=1)
    c1 = c2 = None
    extras: dict[str, Any] = {"x_T": res["x_T"]}
    if order >= 1:
        c1 = -res["ell1"]
        valid &= np.isfinite(c1)
        if "x_back" in res:
            ret = np.max(np.abs(res["x_back"] - xs), axis=1)
            extras["return_error_max"] = float(np.nanmax(np.where(valid, ret, np.nan))) if valid.any() else math.nan
            extras["ell0_backward_diff_max"] = float(np.nanmax(np.where(valid, np.abs(res["ell0_back"] - res["ell0"]), np.nan))) if valid.any() else math.nan
            if bound is not None:
                valid &= np.all(np.abs(res["x_back"]) <= bound, axis=1)
    if order >= 2:
        c2 = -res["ell2"]
        valid &= np.isfinite(c2)
    n_failed = int((~valid).sum())
    if n_failed:
        warnings.warn(f"hbar.nll: {n_failed} of {n} trajectories failed (solver failure, non-finite or "
                      f"out of bound); they are flagged in result.valid and excluded from the means",
                      stacklevel=2)
    return LikelihoodResult(
        nll0=-res["ell0"], c1=c1, c2=c2, valid=valid, n_failed=n_failed, order=order, method=method,
        divergence=divergence, evals_forward=int(res.get("evals_forward", 0)),
        evals_backward=int(res.get("evals_backward", 0)), extras=extras,
    )
