"""Log-likelihoods of the h-family: the exact h = 0 value and its WKB expansion in h.

h = 0 (docs/theory.md section 4): along the probability-flow characteristic

    dx/dtau = v0(x, tau) = f(tau) x - (g(tau)^2 / 2) s(x, tau),   x(t_min) = data point,
    log q^0_{t_min}(x) = log pi(x_T) + int_{t_min}^T div v0(x_tau, tau) dtau,

integrated from data towards noise (t increasing). The divergence is exact (d jvps) or the
Hutchinson–Skilling estimate eps^T (dv0/dx) eps with one probe eps per trajectory, fixed
along it (unbiased for the log-likelihood, since the estimate is linear in the integrand).

For order >= 1 the backward characteristic solve of :mod:`hbar.wkb` adds the WKB
coefficients, NLL(h) = NLL0 + h C1 + h^2 C2 + O(h^3) per point (docs/theory.md sections 5, 6).

Each point meets the tolerance: a batch shares one step size under the max-norm error
controller of :mod:`hbar.ode` (``batching="batch"``; "auto" uses it with batches capped in high
dimension), or with ``batching="per-point"`` the single-point solve is vmapped over a batch so
that every point has its own step-size control. If a
batched solve fails, the batch is solved again point by point to find the failing
trajectories, which are reported (``valid``, ``n_failed``), never dropped silently.
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
from jax.sharding import Mesh

from hbar import distributed
from hbar.ode import ODEOptions, all_finite_rows
from hbar.one_loop import fluctuation_grid, ladder_grids, ladder_result, one_loop_ell1
from hbar.precision import in_float64
from hbar.probability_flow import pf_log_likelihood
from hbar.process import HProcess
from hbar.sampling import cast_floats
from hbar.schedules import Schedule, resolve_bound
from hbar.scores import check_score_shape
from hbar.stats import mean_se
from hbar.validation import HbarInputError, check_h, check_number, check_points, check_positive_int
from hbar.wkb import backward_characteristic, finite_difference_ell1

__all__ = ["LikelihoodResult", "nll", "bits_per_dim"]

EXACT_DIVERGENCE_MAX_DIM = 64
# method="auto" at order 1: exact characteristics below this dimension, the one-loop estimator
# from it on (measured in benchmarks/one_loop.py, docs/theory.md section 5.7)
ONE_LOOP_MIN_DIM = 16


@dataclasses.dataclass
class LikelihoodResult:
    """Per-point NLL at h = 0 and WKB coefficients, NLL(h) ~ nll0 + h c1 + h^2 c2.

    Arrays are (n,) in nats; c1 / c2 are None when not computed. ``valid`` flags points
    whose solves succeeded and stayed within ``bound``; statistics use valid points only
    and ``n_failed`` counts the others. ``evals_forward`` / ``evals_backward`` are the
    total numbers of vector-field evaluations executed by the forward and backward solves,
    summed over batches (one evaluation = one score pass plus its derivatives on a whole
    batch; two batches count twice one); ``extras["evals_forward_per_point"]`` /
    ``extras["evals_backward_per_point"]`` (n,) are those each point's own solve needed.
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
    c1_se: np.ndarray | None = None
    probes: int | None = None

    def _stat(self, arr):
        if arr is None:
            return None
        return mean_se(arr[self.valid & np.isfinite(arr)])

    @property
    def nll0_mean(self) -> tuple[float, float]:
        """(mean, standard error) of nll0 over valid points."""
        return self._stat(self.nll0)

    @property
    def c1_mean(self) -> tuple[float, float] | None:
        return self._stat(self.c1)

    @property
    def c1_estimator_se(self) -> float | None:
        """Standard error of the mean C1 due to the one-loop estimator alone (method="one-loop"):
        sqrt(sum_i se_i^2) / n over valid points, se_i = ``c1_se`` (over probes). The spread over
        points (``c1_mean``'s s.e.) already contains it; None for the exact methods."""
        if self.c1_se is None:
            return None
        ok = self.valid & np.isfinite(self.c1_se)
        return float(np.sqrt(np.sum(self.c1_se[ok] ** 2)) / max(int(ok.sum()), 1))

    @property
    def c2_mean(self) -> tuple[float, float] | None:
        return self._stat(self.c2)

    def nll(self, h: float | np.ndarray, order: int | None = None, per_point: bool = False,
            validity: bool = False, tol: float = 1e-2):
        """The WKB expansion NLL0 + h C1 (+ h^2 C2) at the given h (to ``order``, default all).
        Mean over valid points, or per point when ``per_point``. ``validity`` (needs C2): return
        a :class:`hbar.series.SeriesEvaluation` instead -- the truncated series, its per-point
        [0/1] Pade resummation, the per-point radius |C1/C2| and, per h, the estimated
        truncation error and whether the series is ``trusted`` (error <= ``tol``), docs/theory.md
        section 6.3."""
        hh = check_h(h)
        order = self.order if order is None else order
        if order > self.order:
            raise HbarInputError(f"order {order} requested but only order {self.order} was computed")
        if validity:
            from hbar.series import evaluate_series

            if self.c2 is None:
                raise HbarInputError("validity needs C2: compute the likelihood with order=2")
            ok = self.valid & np.isfinite(self.nll0) & np.isfinite(self.c1) & np.isfinite(self.c2)
            return evaluate_series(self.nll0[ok], self.c1[ok], self.c2[ok], hh, order=max(order, 1), tol=tol)
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
        if self.c1_se is not None:
            out["c1_estimator_se"] = self.c1_estimator_se
            out["probes"] = self.probes
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


BATCHINGS = ("per-point", "batch")
# batching="auto" at order >= 1 caps a jitted chunk at this many rows x d^(2 order) (the
# size of the highest Taylor layer): the derivative passes of large chunks leave the cache.
# Measured on the 64-D digits model, order 1, seconds per point: chunks of 1 point 2.06
# (batched) / 2.09 (per-point), of 4 points 3.79 (batched) / 2.35 (per-point). On the 2-D
# swiss roll (200 points) a vmapped per-point chunk runs as many evaluations as its slowest
# point (115 vs 103 for the batched solve) and smaller chunks cost more per point (chunks of
# 10: 1.10-1.2x), so "auto" is "batch" with this cap.
AUTO_TAYLOR_BUDGET = 4096


def run_batched(fn: Callable[..., dict], proc: HProcess, arrays: list[np.ndarray], batch_size: int,
                progress: Callable[[int, int], None] | None = None, *, batching: str = "batch",
                mesh: Mesh | None = None, **static: Any) -> dict[str, np.ndarray]:
    """Apply a batch function ``fn(proc, *arrays, **static)`` to row chunks of ``arrays``
    (padded to one shape so it compiles once; compiled functions are cached across calls by
    ``equinox.filter_jit``, so a second call with the same score is not recompiled).

    ``batching``: "batch" solves a chunk as one batched solve (one step size for the chunk,
    set by its worst row under the max norm); "per-point" vmaps the single-point solve over
    the chunk's rows, so each row has its own step-size control and its own step count (the
    vmapped loop runs until the chunk's slowest row is done, but easy rows take their own,
    larger steps instead of their chunk's). ``fn`` returns a dict with per-row arrays and
    scalars ``ok``, ``evals_*``. In "batch" mode a chunk whose solve failed is re-run row by
    row (vmapped) so that the failing rows are identified; their ``row_ok`` is False.

    Returns concatenated rows, ``row_ok``, and for each counter ``evals_*`` (vector-field
    evaluations of one solve): ``evals_*`` the total number of evaluations executed, summed
    over chunks (a batched or vmapped evaluation of a chunk counts once; in "per-point" mode a
    chunk executes as many as its slowest row needs; failed attempts that were re-run count
    too), and ``evals_*_per_point`` (n,) the evaluations each row's own solve needed (in
    "batch" mode those of its chunk).

    ``mesh`` (a :class:`jax.sharding.Mesh` from :func:`hbar.distributed.resolve_mesh`, or None):
    each chunk, padded to a multiple of the mesh size by repeating its last row, is split over
    the mesh's devices with ``proc`` replicated; the program is the plain one (a "batch" chunk
    still shares one step size, now all-reduced), and outputs are gathered to every process
    (docs/theory.md section 15).
    """
    if batching not in BATCHINGS:
        raise HbarInputError(f"batching must be one of {BATCHINGS}, got {batching!r}")
    n = arrays[0].shape[0]
    bs = min(batch_size, n)
    chunks: dict[str, list] = {}
    evals: dict[str, int] = {}
    bs_pad = bs if mesh is None else distributed.padded_size(bs, mesh)
    if mesh is not None:
        proc, static = distributed.replicate((proc, static), mesh)

    def count(k, v, executed):
        evals[k] = evals.get(k, 0) + int(executed)
        chunks.setdefault(k + "_per_point", []).append(np.broadcast_to(np.asarray(v), (bs_pad,))[: stop - start])

    for start in range(0, n, bs):
        stop = min(start + bs, n)
        if mesh is None:
            args = [jnp.asarray(_pad_rows(a[start:stop], bs)) for a in arrays]
        else:  # rows split over the mesh's devices (docs/theory.md section 15)
            args = [distributed.shard_rows(_pad_rows(a[start:stop], bs_pad), mesh) for a in arrays]
        if batching == "batch":
            out = _jit_batch(fn, proc, args, static)
            if mesh is not None:
                out = distributed.gather(out)
            ok = bool(out["ok"])
            if not ok:  # the failed attempt was executed: count it
                for k, v in out.items():
                    if k.startswith("evals"):
                        evals[k] = evals.get(k, 0) + int(np.asarray(v))
        if batching == "per-point" or not ok:
            out = _jit_rows(fn, proc, args, static)
            if mesh is not None:
                out = distributed.gather(out)
            out = {k: (v[:, 0] if (k != "ok" and not k.startswith("evals") and v.ndim >= 2) else v)
                   for k, v in out.items()}
            row_ok = np.asarray(out["ok"]).reshape(bs_pad)
        else:
            row_ok = np.ones(bs_pad, dtype=bool)
        for k, v in out.items():
            if k == "ok":
                continue
            if k.startswith("evals"):
                v = np.asarray(v)
                count(k, v, np.max(v[: stop - start]) if v.ndim else v)
                continue
            chunks.setdefault(k, []).append(np.asarray(v)[: stop - start])
        chunks.setdefault("row_ok", []).append(row_ok[: stop - start])
        if progress is not None:
            progress(stop, n)
    result = {k: np.concatenate(v) for k, v in chunks.items()}
    result.update(evals)
    return result


@eqx.filter_jit
def _jit_batch(fn, proc, args, static):
    return fn(cast_floats(proc, args[0].dtype), *args, **static)


@eqx.filter_jit
def _jit_rows(fn, proc, args, static):
    proc = cast_floats(proc, args[0].dtype)
    return jax.vmap(lambda *rows: fn(proc, *[r[None] for r in rows], **static))(*args)


def _batch_characteristics(proc, xb, pb=None, *, order, options, bound=None):
    """One batch of the forward probability-flow solve and, for order >= 1, the backward
    characteristic solve of :mod:`hbar.wkb`."""
    fwd = pf_log_likelihood(proc, xb, proc.schedule.t_min, options, probe=pb, bound=bound)
    out = dict(ell0=fwd["ell0"], x_T=fwd["x_T"], ok=fwd["ok"], evals_forward=fwd["evals"])
    if order >= 1:
        bwd = backward_characteristic(proc, fwd["x_T"], order, options, bound=bound)
        out.update(ell1=bwd["ell1"], x_back=bwd["x"], ell0_back=bwd["ell0"],
                   ok=fwd["ok"] & bwd["ok"], evals_backward=bwd["evals"])
        if order >= 2:
            out["ell2"] = bwd["ell2"]
    return out


def _batch_one_loop(proc, xb, kb, pb=None, *, options, grid, probes, bound=None):
    """One batch of the forward probability-flow solve (NLL0, x_T) plus ``probes`` one-loop
    samples of psi1 per point (:mod:`hbar.one_loop`, docs/theory.md section 5.7)."""
    fwd = pf_log_likelihood(proc, xb, proc.schedule.t_min, options, probe=pb, bound=bound)
    ol = one_loop_ell1(proc, xb, fwd["x_T"], kb, grid, probes)
    return dict(ell0=fwd["ell0"], x_T=fwd["x_T"], **{k: v for k, v in ol.items() if k.startswith("ell1")},
                ok=fwd["ok"] & ol["ok"], evals_forward=fwd["evals"], evals_backward=ol["evals"])


def _batch_finite_difference(proc, xb, *, options, inner, fd_step, bound=None):
    """One batch of the forward solve plus the paper's finite-difference C1 baseline."""
    fwd = pf_log_likelihood(proc, xb, proc.schedule.t_min, options, bound=bound)
    fd = finite_difference_ell1(proc, xb, options, inner, fd_step, bound=bound)
    return dict(ell0=fwd["ell0"], x_T=fwd["x_T"], ell1=fd["ell1"], ok=fwd["ok"] & fd["ok"],
                evals_forward=fwd["evals"], evals_backward=fd["evals"])


@in_float64
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
    batching: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    probes: int = 16,
    steps: int | list[int] = 128,
    grid: str = "logsnr",
    mesh: distributed.MeshLike = None,
) -> LikelihoodResult:
    """Negative log-likelihood of data points under the h-family model, with WKB terms.

    Computed in float64 whatever the global JAX setting (:mod:`hbar.precision`).

    Args:
        score: score callable s(x, t), (n, d) -> (n, d).
        schedule: forward schedule; the model density is evaluated at t_min.
        x: (n, d) data points (NaN/inf rejected).
        order: 0 (NLL at h = 0), 1 (adds C1 = dNLL/dh at 0), 2 (adds C2, d <= 2).
        method: "characteristics" (exact autodiff, docs/theory.md section 5),
            "finite-difference" (the paper's algorithm, order 1 only; docs/theory.md section 5.6:
            central differences of nested solves with step ``fd_step``), "one-loop" (order 1 only,
            any d: unbiased stochastic C1 with its standard error over ``probes`` samples per
            point in ``result.c1_se``; docs/theory.md section 5.7; needs ``key``) or "auto"
            (characteristics for order 1 up to d = ONE_LOOP_MIN_DIM - 1, one-loop from there).
        probes, steps, grid: one-loop only -- samples per point, steps of the fixed
            fluctuation grid (stochastic Heun, weak order 2) and its kind ("logsnr": uniform
            in log(alpha^2/sigma^2), or "uniform" in t). ``batch_size`` then counts samples
            (points x probes) per jitted batch. ``steps`` may be a ladder, e.g. [32, 64, 128]
            (constant integer ratio, common random numbers): C1 is then Richardson-extrapolated
            when the observed order is near 2, with the discretisation error kept apart from
            the Monte Carlo s.e. in ``extras["ladder"]`` (:func:`hbar.one_loop.ladder_result`).
        divergence: "exact", "hutchinson" (order 0 only) or "auto" (exact for d <= 64).
        key: PRNG key for Hutchinson probes (Rademacher, one per trajectory).
        options: tolerances of the solves; inner_options: of the nested solves of the
            finite-difference baseline (default: same as ``options``).
        bound: a trajectory whose state leaves [-bound, bound]^d, or turns non-finite, is ended
            at once and counted as failed (``valid``, ``n_failed``, a warning). Default (None):
            100 (prior_std + max |x|) (:func:`hbar.schedules.default_bound`), max over all the
            points of the call: which points fail can then depend on the others when their scales
            differ by orders of magnitude (the values of valid points do not); pass ``bound`` to
            fix it (``hbar nll`` computes it once over all points). ``math.inf`` keeps only the
            non-finite check; <= 0 is an error (docs/theory.md section 14.1).
        batch_size: points per jitted batch; progress(done, n) is called after each.
        batching: "per-point" (each point has its own step-size control: the single-point
            solve vmapped over the batch), "batch" (one step size per batch, set by its worst
            point) or "auto" ("batch", and at order >= 1 at most AUTO_TAYLOR_BUDGET / d^(2 order)
            points per jitted batch: 1 point in 64-D, where every point then has its own steps;
            measured in benchmarks/run.py). Both meet the tolerance for every point.
        mesh: devices to run on, data-parallel (docs/theory.md section 15): None = every device
            JAX sees when there are several (all processes after :func:`hbar.distributed.initialize`),
            else the plain single-device path; an int = that many devices (1: plain path), a device
            list, or a one-axis ``jax.sharding.Mesh``. Each batch's points are split over the
            devices; results are gathered to every process and do not depend on the layout (the
            batches and their step sizes are the same as on one device).

    Failures and batch invariance (docs/theory.md sections 14.1-14.3): a solve ends at the first
    accepted step whose state is non-finite or out of bound, or when a non-finite score makes
    its step size collapse (``ODEOptions.min_step``), so a failing point costs a few dozen
    evaluations, not ``max_steps``. A failed "batch" solve is re-run point by point: the failed
    points are flagged, the others keep their own single-point values, which agree with a clean
    batched run to the solver tolerance; with ``batching="per-point"`` a point's values do not
    depend on the other points of its batch at all.
    """
    xs = check_points(x, "x")
    n, d = xs.shape
    check_score_shape(score, d, "x")
    bnd = resolve_bound(bound, schedule, float(np.max(np.abs(xs))))
    if method == "finite-difference":
        fd_step = check_number(fd_step, "fd_step", positive=True)
    if order not in (0, 1, 2):
        raise HbarInputError(f"order must be 0, 1 or 2, got {order}")
    if method == "auto":
        method = "one-loop" if (order == 1 and d >= ONE_LOOP_MIN_DIM) else "characteristics"
    if method not in ("characteristics", "finite-difference", "one-loop"):
        raise HbarInputError(f"unknown method {method!r}; use 'characteristics', 'finite-difference', "
                             f"'one-loop' or 'auto'")
    if method == "one-loop":
        if order != 1:
            raise HbarInputError("the one-loop estimator computes order=1 only")
        if key is None:
            raise HbarInputError("method='one-loop' needs a PRNG key (key=jax.random.PRNGKey(...))")
        probes = check_positive_int(probes, "probes")
        ol_grid = (fluctuation_grid(schedule, steps, grid) if np.ndim(steps) == 0
                   else ladder_grids(schedule, steps, grid))  # a step ladder: ladder_result below
    if method == "finite-difference" and order != 1:
        raise HbarInputError("the finite-difference baseline computes order=1 only")
    if divergence == "auto":
        divergence = "exact" if d <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    if divergence not in ("exact", "hutchinson"):
        raise HbarInputError(f"divergence must be 'exact', 'hutchinson' or 'auto', got {divergence!r}")
    if divergence == "hutchinson" and order > 0 and method != "one-loop":
        raise HbarInputError("Hutchinson divergence is available for order=0 only; use divergence='exact'")
    if order == 2 and d > 2:
        warnings.warn(f"order=2 in d={d}: the cost grows like d^4 per step", stacklevel=2)
    batch_size = check_positive_int(batch_size, "batch_size")
    if batching not in ("auto",) + BATCHINGS:
        raise HbarInputError(f"batching must be 'auto', 'per-point' or 'batch', got {batching!r}")
    dtype = jnp.result_type(float)
    xs = xs.astype(dtype)
    arrays = [xs]
    if divergence == "hutchinson":
        if key is None:
            raise HbarInputError("divergence='hutchinson' needs a PRNG key")
        probe = np.asarray(jax.random.rademacher(key, (n, d), dtype=dtype))
        arrays.append(probe)

    proc = HProcess(schedule, score)
    mesh = distributed.resolve_mesh(mesh)
    bnd_arr = jnp.asarray(bnd, dtype=dtype)
    if method == "one-loop":
        point_keys = jax.random.split(jax.random.fold_in(key, 1), n)
        if jnp.issubdtype(point_keys.dtype, jax.dtypes.prng_key):
            point_keys = jax.random.key_data(point_keys)
        arrays.insert(1, np.asarray(point_keys))
        res = run_batched(_batch_one_loop, proc, arrays, max(1, batch_size // probes), progress, mesh=mesh,
                          options=options, grid=tuple(np.asarray(g, dtype=dtype) for g in ol_grid) if isinstance(ol_grid, tuple)
                          else np.asarray(ol_grid, dtype=dtype), probes=probes, bound=bnd_arr)
    elif method == "finite-difference":
        res = run_batched(_batch_finite_difference, proc, arrays, batch_size, progress, mesh=mesh,
                          options=options, inner=inner_options or options,
                          fd_step=float(fd_step), bound=bnd_arr)
    else:
        chunk = batch_size
        if batching == "auto" and order >= 1:
            chunk = min(batch_size, max(1, AUTO_TAYLOR_BUDGET // d ** (2 * order)))
        res = run_batched(_batch_characteristics, proc, arrays, chunk, progress,
                          batching="batch" if batching == "auto" else batching, mesh=mesh,
                          order=order, options=options, bound=bnd_arr)
    solver_ok = res["row_ok"].copy()
    finite = np.isfinite(res["ell0"]) & np.asarray(all_finite_rows(jnp.asarray(res["x_T"])))
    inside = np.all(np.abs(res["x_T"]) <= bnd, axis=1)
    c1 = c2 = c1_se = None
    extras: dict[str, Any] = {"x_T": res["x_T"]}
    extras.update({k: res[k] for k in res if k.startswith("evals_") and k.endswith("_per_point")})
    if order >= 1:
        c1 = -res["ell1"]
        finite &= np.isfinite(c1)
        valid = solver_ok & finite & inside
        if "ell1_se" in res:
            c1_se = res["ell1_se"]
            extras.update(steps=int(steps) if np.ndim(steps) == 0 else [int(s) for s in steps], grid=grid)
            if "ell1_levels" in res:  # step ladder: extrapolated C1, discretisation error in extras["ladder"]
                c1, c1_se, lad = ladder_result(res, valid, steps)
                finite &= np.isfinite(c1)
                extras.update(lad)
        if "x_back" in res:
            ret = np.max(np.abs(res["x_back"] - xs), axis=1)
            back_diff = np.abs(res["ell0_back"] - res["ell0"])
            extras["return_error_max"] = float(np.max(ret[valid])) if valid.any() else math.nan
            extras["ell0_backward_diff_max"] = float(np.max(back_diff[valid])) if valid.any() else math.nan
            finite &= np.asarray(all_finite_rows(jnp.asarray(res["x_back"])))
            inside &= np.all(np.abs(res["x_back"]) <= bnd, axis=1)
    if order >= 2:
        c2 = -res["ell2"]
        finite &= np.isfinite(c2)
    valid = solver_ok & finite & inside
    causes = {"non-finite": int((~finite).sum()), "out of bound": int((finite & ~inside).sum()),
              "solver": int((finite & inside & ~solver_ok).sum())}
    extras.update(bound=bnd, failures=causes)
    n_failed = int((~valid).sum())
    if n_failed:
        why = ", ".join(f"{k}: {v}" for k, v in causes.items() if v)
        warnings.warn(f"hbar.nll: {n_failed} of {n} trajectories failed ({why}; 'solver' = step budget or a "
                      f"step size collapsed by a non-finite score; bound = {bnd:.4g}); they are flagged in "
                      f"result.valid and excluded from the means", stacklevel=2)
    return LikelihoodResult(
        nll0=-res["ell0"], c1=c1, c2=c2, valid=valid, n_failed=n_failed, order=order, method=method,
        divergence=divergence, evals_forward=int(res.get("evals_forward", 0)),
        evals_backward=int(res.get("evals_backward", 0)), extras=extras,
        c1_se=c1_se, probes=probes if method == "one-loop" else None,
    )
