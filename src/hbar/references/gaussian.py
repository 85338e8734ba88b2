"""Closed-form Gaussian oracle: exact NLL(h) and its h-derivatives for an affine score
(docs/theory.md section 7).

For a score s(x, t) = A(t) x + b(t) every marginal of the backward h-process (the
:class:`hbar.process.HProcess` drift u_h = f x - (1+h)/2 g^2 s and noise variance rate h g^2)
is Gaussian, N(m_t, C_t). The drift is linear, u_h = K x - k, with (from the one formula,
:meth:`HProcess.drift_given_score`, an affine map of (x, s))

    K = drift_given_score(I, A, t, h)   (= f I - (1+h)/2 g^2 A),
    k = -drift_given_score(0, b, t, h)  (= (1+h)/2 g^2 b),

and a step from t to t - dt is x <- x - u dt + sqrt(h g^2 dt) z, hence, in the ordinary time t,

    dm/dt = K m - k,        dC/dt = K C + C K^T - h g^2 I,

integrated from m_T = 0, C_T = prior_std^2 I at t = T down to t_min (signs tested against
Euler-Maruyama sampling of the same HProcess). Shapes: m (d,), C, K, A (d, d), b, k (d,).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hbar.gaussian import as_covariance
from hbar.precision import in_float64
from hbar.process import HProcess
from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_h, check_points

__all__ = ["GaussianOracleResult", "gaussian_oracle", "gaussian_backward_moments"]


@dataclasses.dataclass(frozen=True)
class GaussianOracleResult:
    """Exact NLL(h) of Gaussian data N(m0, S0) under the Gaussian model marginal q^h_{t_min}.

    Shapes (nh = number of h values, n = number of points, d = dimension):

    * ``h`` (nh,).
    * ``nll`` (nh,): expected NLL, E_{x ~ N(m0, S0)}[-log q^h_{t_min}(x)]
      = 1/2 [log det(2 pi C) + tr(C^{-1} S0) + (m0 - m)^T C^{-1} (m0 - m)].
    * ``c1`` (nh,): dNLL/dh at each h; ``c2`` (nh,): (1/2) d^2NLL/dh^2 at each h. So
      NLL(h + e) = nll + c1 e + c2 e^2 + O(e^3); **at h = 0 they are the Taylor (WKB)
      coefficients C1, C2 of NLL(h) = NLL0 + C1 h + C2 h^2 + ...** (docs/theory.md sections 5, 6).
    * ``w2`` (nh,): Bures W2 (not squared) between q^h_{t_min} and the data N(m0, S0).
    * ``mean`` (nh, d), ``cov`` (nh, d, d): m and C at t_min.
    * ``nll_points``, ``c1_points``, ``c2_points`` (nh, n): the same for -log N(x_i; m, C)
      at given points x (None if no points were passed).
    """

    h: np.ndarray
    nll: np.ndarray
    c1: np.ndarray
    c2: np.ndarray
    w2: np.ndarray
    mean: np.ndarray
    cov: np.ndarray
    nll_points: np.ndarray | None = None
    c1_points: np.ndarray | None = None
    c2_points: np.ndarray | None = None


def _moment_rhs(t, y, args):
    """Right-hand side of the moment ODEs and their first two h-derivatives (docs/theory.md section 7).

    From the HProcess of ``schedule``: K = drift_given_score(I, A, t, h), k = -drift_given_score(0, b, t, h),
    K' = dK/dh = drift_h_slope_given_score(A, t) (= -(1/2) g^2 A), k' = -drift_h_slope_given_score(b, t)
    (= (1/2) g^2 b), noise rate diffusion2(t, h) = h g^2 with h-slope diffusion2(t, 1) = g^2:
        m'  = K m - k                       C'  = K C + C K^T - h g^2 I
        m1' = K m1 + K' m - k'              C1' = K C1 + C1 K^T + K' C + C K'^T - g^2 I
        m2' = K m2 + 2 K' m1                C2' = K C2 + C2 K^T + 2 (K' C1 + C1 K'^T)
    (m1 = dm/dh, m2 = d^2 m/dh^2, and the same for C; ' on the left is d/dt.) Shapes: m* (d,),
    C* (d, d); ``args`` = (score, schedule, h).
    """
    import jax.numpy as jnp

    score, schedule, h = args
    proc = HProcess(schedule)
    m, C, m1, C1, m2, C2 = y
    A, b = score.affine(t)
    A = jnp.asarray(A, dtype=m.dtype)
    b = jnp.asarray(b, dtype=m.dtype)
    d = m.shape[0]
    eye = jnp.eye(d, dtype=m.dtype)
    K = proc.drift_given_score(eye, A, t, h)
    Kp = proc.drift_h_slope_given_score(A, t)
    k = -proc.drift_given_score(jnp.zeros_like(b), b, t, h)
    kp = -proc.drift_h_slope_given_score(b, t)
    noise = proc.diffusion2(t, h) * eye
    noise_h = proc.diffusion2(t, 1.0) * eye  # d(h g^2)/dh: diffusion2 is linear in h

    def lyap(M, X):
        P = M @ X
        return P + P.T

    dm = K @ m - k
    dC = lyap(K, C) - noise
    dm1 = K @ m1 + Kp @ m - kp
    dC1 = lyap(K, C1) + lyap(Kp, C) - noise_h
    dm2 = K @ m2 + 2.0 * Kp @ m1
    dC2 = lyap(K, C2) + 2.0 * lyap(Kp, C1)
    return (dm, dC, dm1, dC1, dm2, dC2)


def _flat_rhs(t, y, score, schedule, hs):
    """Right-hand side on the flat state of all h values, shape (nh * 3 * (d + d^2),):
    for each h the blocks (m, m1, m2) then (C, C1, C2) of :func:`_moment_rhs`."""
    import jax
    import jax.numpy as jnp

    nh = hs.shape[0]
    d = int(round((-1 + math.sqrt(1 + 4 * y.shape[0] / (3 * nh))) / 2))
    blk = d + d * d
    yy = y.reshape(nh, 3, blk)
    m = yy[:, :, :d]
    C = yy[:, :, d:].reshape(nh, 3, d, d)

    def rhs_one(m, C, h):
        out = _moment_rhs(t, (m[0], C[0], m[1], C[1], m[2], C[2]), (score, schedule, h))
        dm = jnp.stack([out[0], out[2], out[4]])
        dC = jnp.stack([out[1], out[3], out[5]])
        return jnp.concatenate([dm, dC.reshape(3, d * d)], axis=1)

    return jax.vmap(rhs_one)(m, C, hs).reshape(-1)


_RHS_CACHE: dict[Any, tuple[Callable, Callable]] = {}


def _rhs_functions(score: Any, schedule: Schedule) -> tuple[Callable, Callable]:
    """Jitted RHS f(t, y, hs) and its Jacobian in y for this score and schedule.

    The score is split (equinox) into its arrays, passed as jit arguments, and its static
    part, which together with the schedule keys a compile cache: repeated oracle calls with
    the same kind of score do not recompile and pay only the plain jit dispatch cost per
    right-hand-side evaluation.
    """
    import equinox as eqx
    import jax

    params, static = eqx.partition(score, eqx.is_array)
    try:
        key = (static, schedule)
        hash(key)
    except TypeError:
        key = None
    if key is None or key not in _RHS_CACHE:
        def f(t, y, p, hs):
            return _flat_rhs(t, y, eqx.combine(p, static), schedule, hs)

        pair = (jax.jit(f), jax.jit(jax.jacfwd(f, argnums=1)))
        if key is None:
            fj, jj = pair
        else:
            if len(_RHS_CACHE) > 64:
                _RHS_CACHE.clear()
            _RHS_CACHE[key] = pair
    fj, jj = _RHS_CACHE[key] if key is not None else pair
    return (lambda t, y, hs: fj(t, y, params, hs)), (lambda t, y, hs: jj(t, y, params, hs))


def _solve_moments(score, schedule, hs, ts, rtol, atol, method, d):
    """Integrate the moment + sensitivity ODEs for all h from T down to ts (decreasing)."""
    import jax
    import jax.numpy as jnp
    from scipy.integrate import solve_ivp

    if not jax.config.jax_enable_x64:
        warnings.warn(
            "gaussian_oracle runs in float32 because jax_enable_x64 is off: expect ~1e-6 instead of "
            "~1e-10 accuracy (call hbar.enable_x64() first)", RuntimeWarning, stacklevel=3,
        )
    rhs, jac = _rhs_functions(score, schedule)
    nh = hs.shape[0]
    hs_j = jnp.asarray(hs)
    y0 = np.zeros((nh, 3, d + d * d))
    y0[:, 0, d:] = (schedule.prior_std**2 * np.eye(d)).ravel()
    y0 = y0.ravel()
    f_np = lambda t, y: np.asarray(rhs(jnp.asarray(t), jnp.asarray(y), hs_j))  # noqa: E731
    kw = {}
    if method in ("Radau", "BDF"):
        kw["jac"] = lambda t, y: np.asarray(jac(jnp.asarray(t), jnp.asarray(y), hs_j))
    sol = solve_ivp(f_np, (schedule.T, float(ts[-1])), y0, method=method, t_eval=ts,
                    rtol=rtol, atol=atol, **kw)
    if not sol.success:
        raise RuntimeError(f"moment ODE solve failed: {sol.message}")
    Y = sol.y.T.reshape(len(ts), nh, 3, d + d * d)  # (nt, nh, 3, blk)
    m = np.moveaxis(Y[..., :d], 0, 1)  # (nh, nt, 3, d)
    C = np.moveaxis(Y[..., d:].reshape(len(ts), nh, 3, d, d), 0, 1)  # (nh, nt, 3, d, d)
    return m, C, sol.nfev


def _check_affine_score(score: Any, d: int | None, schedule: Schedule) -> int:
    if not hasattr(score, "affine"):
        raise HbarInputError(
            "gaussian_oracle needs an affine score object with .affine(t) -> (A, b) "
            "(s = x @ A.T + b), e.g. hbar.scores.AffineScore"
        )
    A, b = score.affine(schedule.T)
    A = np.asarray(A)
    b = np.asarray(b)
    if A.ndim != 2 or A.shape[0] != A.shape[1] or b.shape != (A.shape[0],):
        raise HbarInputError(f"score.affine(t) must return A (d, d) and b (d,), got {A.shape}, {b.shape}")
    if d is not None and A.shape[0] != d:
        raise HbarInputError(f"score dimension {A.shape[0]} does not match data dimension {d}")
    return int(A.shape[0])


def gaussian_backward_moments(
    score: Any,
    schedule: Schedule,
    h: float | Sequence[float] | np.ndarray,
    ts: Sequence[float] | np.ndarray | None = None,
    *,
    rtol: float = 1e-12,
    atol: float = 1e-12,
    method: str = "DOP853",
) -> dict[str, Any]:
    """Mean m_t and covariance C_t of the backward h-process with an affine score (section 7).

    Integrates dm/dt = K m - k, dC/dt = K C + C K^T - h g^2 I from t = T (m = 0,
    C = prior_std^2 I) down to t_min, together with the exact first and second h-derivatives
    (see :func:`_moment_rhs`), with scipy's ``solve_ivp`` (default DOP853, rtol = atol = 1e-12;
    use method="Radau" for stiff cases, e.g. very small t_min with a sharp score) on a jitted,
    h-vectorised right-hand side.

    Args:
        score: object with ``.affine(t) -> (A (d, d), b (d,))``, JAX-traceable in t.
        schedule: linear schedule.
        h: scalar or (nh,) noise strengths, >= 0.
        ts: times in [t_min, T] at which to save, default [t_min]; sorted decreasingly inside.

    Returns:
        dict with "h" (nh,), "ts" (nt,) (decreasing), "mean" (nh, nt, d), "cov" (nh, nt, d, d),
        "dmean_dh", "dcov_dh", "d2mean_dh2", "d2cov_dh2" of the same shapes, "nfev".
    """
    hs = check_h(h)
    d = _check_affine_score(score, None, schedule)
    if method not in ("DOP853", "Radau", "BDF", "RK45"):
        raise HbarInputError(f"method must be one of DOP853, Radau, BDF, RK45, got {method!r}")
    ts_arr = np.array([schedule.t_min]) if ts is None else np.atleast_1d(np.asarray(ts, dtype=float))
    schedule.check_time(ts_arr, "ts")
    ts_arr = np.sort(ts_arr)[::-1].copy()
    m, C, nfev = _solve_moments(score, schedule, hs, ts_arr, float(rtol), float(atol), method, d)
    sym = lambda X: 0.5 * (X + np.swapaxes(X, -1, -2))  # noqa: E731
    return {
        "h": hs,
        "ts": ts_arr,
        "mean": m[:, :, 0],
        "cov": sym(C[:, :, 0]),
        "dmean_dh": m[:, :, 1],
        "dcov_dh": sym(C[:, :, 1]),
        "d2mean_dh2": m[:, :, 2],
        "d2cov_dh2": sym(C[:, :, 2]),
        "nfev": int(nfev),
    }


def _gauss_nll_jets(m, C, m1, C1, m2, C2, m0, S0, x):
    """NLL and its first two derivatives along the curve m(e) = m + e m1 + e^2/2 m2,
    C(e) = C + e C1 + e^2/2 C2 at e = 0 -- by the chain rule exactly (F(0), F'(0), F''(0)/2)
    for F(e) = NLL(m(h + e), C(h + e)) when m1, m2, C1, C2 are the h-derivatives.

    With P = C^{-1}, P' = -P C1 P, P'' = 2 P C1 P C1 P - P C2 P, r = m0 - m (or x - m), r' = -m1,
    r'' = -m2:
        (log det C)'  = tr(P C1),             (log det C)'' = tr(P C2) - tr(P C1 P C1)
        tr(P S0)'     = tr(P' S0),            tr(P S0)''    = tr(P'' S0)
        (r^T P r)'    = 2 r'^T P r + r^T P' r
        (r^T P r)''   = 2 r''^T P r + 2 r'^T P r' + 4 r'^T P' r + r^T P'' r
    Shapes: m*, m0 (d,), C*, S0 (d, d), x (n, d). Returns ((nll, nll_x (n,)), (d1, d1_x),
    (half d2, half d2_x)).
    """
    from scipy.linalg import cho_factor, cho_solve

    d = m.shape[0]
    C = 0.5 * (C + C.T)
    cf = cho_factor(C, lower=True)
    logdet = 2.0 * float(np.sum(np.log(np.diag(cf[0]))))
    P = cho_solve(cf, np.eye(d))
    P = 0.5 * (P + P.T)
    PC1 = P @ C1
    Pp = -PC1 @ P                       # P'
    Ppp = 2.0 * PC1 @ PC1 @ P - P @ C2 @ P  # P''
    ld1 = float(np.trace(PC1))
    ld2 = float(np.trace(P @ C2) - np.trace(PC1 @ PC1))
    const = d * math.log(2.0 * math.pi)

    def quad(r):  # r (n, d) -> value, first, second derivative of r^T P r
        u = r @ P
        q0 = np.sum(u * r, axis=1)
        q1 = -2.0 * (r @ P @ m1) + np.einsum("ni,ij,nj->n", r, Pp, r)
        q2 = (-2.0 * (r @ P @ m2) + 2.0 * float(m1 @ P @ m1) - 4.0 * (r @ Pp @ m1)
              + np.einsum("ni,ij,nj->n", r, Ppp, r))
        return q0, q1, q2

    e0, e1, e2 = quad((m0 - m)[None, :])
    nll = 0.5 * (const + logdet + float(np.trace(P @ S0)) + e0[0])
    d1 = 0.5 * (ld1 + float(np.trace(Pp @ S0)) + e1[0])
    d2 = 0.5 * (ld2 + float(np.trace(Ppp @ S0)) + e2[0])
    p0, p1, p2 = quad(x - m[None, :])
    return (nll, 0.5 * (const + logdet + p0)), (d1, 0.5 * (ld1 + p1)), (0.5 * d2, 0.25 * (ld2 + p2))


def gaussian_oracle(
    score: Any,
    schedule: Schedule,
    m0: Any,
    S0: Any,
    h: float | Sequence[float] | np.ndarray,
    x: Any = None,
    *,
    rtol: float = 1e-12,
    atol: float = 1e-12,
    method: str = "DOP853",
) -> GaussianOracleResult:
    """Exact NLL(h), dNLL/dh, (1/2) d^2NLL/dh^2 and W2(h) for Gaussian data and an affine score.

    docs/theory.md section 7. Data N(m0, S0) in any dimension d; schedule with linear drift; score
    s(x, t) = A(t) x + b(t) given by ``score.affine(t) -> (A, b)`` (e.g.
    :class:`hbar.scores.AffineScore`, exact or perturbed). Every backward marginal q^h_t is
    N(m_t, C_t) with

        dm/dt = K m - k,   dC/dt = K C + C K^T - h g^2 I,   K = f I - (1+h)/2 g^2 A,
        k = (1+h)/2 g^2 b,  m_T = 0,  C_T = prior_std^2 I,  integrated T -> t_min,

    (K, k and h g^2 from :class:`hbar.process.HProcess`; the p_T vs prior mismatch is included). At t_min:

        NLL(h)     = 1/2 [log det(2 pi C) + tr(C^{-1} S0) + (m0 - m)^T C^{-1} (m0 - m)]
        NLL_x(h)   = -log N(x; m, C)                                  (per point)
        W2(h)      = Bures distance between N(m, C) and N(m0, S0)      (not squared)

    The h-derivatives are exact: the sensitivity ODEs for dm/dh, dC/dh, d^2m/dh^2, d^2C/dh^2
    (linear) are solved together with m, C, then pushed through the NLL by the chain rule
    (closed-form matrix derivatives, :func:`_gauss_nll_jets`). ``c1 = dNLL/dh`` and
    ``c2 = (1/2) d^2NLL/dh^2`` at each requested h; at h = 0 these are the Taylor coefficients
    of NLL(h) = NLL0 + C1 h + C2 h^2 + O(h^3).

    Args:
        score: affine score object (``.affine``), JAX-traceable in t.
        schedule: the forward schedule (its prior_std sets C_T).
        m0: (d,) data mean; S0: (d, d) data covariance (also (d,) diagonal or scalar).
        h: scalar or (nh,) array of h >= 0.
        x: optional (n, d) points for the per-point outputs.
        rtol, atol: ODE tolerances (default 1e-12: about 1e-10 relative accuracy in float64);
            method: scipy ``solve_ivp`` method, "DOP853" (default) or "Radau" (stiff).

    Returns:
        :class:`GaussianOracleResult` (all arrays NumPy, leading axis over h).
    """
    from hbar.metrics import gaussian_w2

    m0a = np.atleast_1d(np.asarray(m0, dtype=np.float64))
    if m0a.ndim != 1 or not np.all(np.isfinite(m0a)):
        raise HbarInputError(f"m0 must be a finite (d,) vector, got shape {m0a.shape}")
    d = m0a.shape[0]
    S0a = as_covariance(S0, d, "S0")
    if not np.allclose(S0a, S0a.T, atol=1e-12) or np.linalg.eigvalsh(S0a).min() < -1e-12:
        raise HbarInputError("S0 must be symmetric positive semi-definite")
    _check_affine_score(score, d, schedule)
    xa = None if x is None else check_points(x, "x", d=d).astype(np.float64)

    mom = gaussian_backward_moments(score, schedule, h, None, rtol=rtol, atol=atol, method=method)
    hs = mom["h"]
    nh = hs.shape[0]
    m = mom["mean"][:, 0]
    C = mom["cov"][:, 0]
    m1 = mom["dmean_dh"][:, 0]
    C1 = mom["dcov_dh"][:, 0]
    m2 = mom["d2mean_dh2"][:, 0]
    C2 = mom["d2cov_dh2"][:, 0]

    xs = m0a[None, :] if xa is None else xa
    nll, c1, c2 = np.empty(nh), np.empty(nh), np.empty(nh)
    nllp, c1p, c2p = (np.empty((nh, xs.shape[0])) for _ in range(3))
    for i in range(nh):
        (nll[i], nllp[i]), (c1[i], c1p[i]), (c2[i], c2p[i]) = _gauss_nll_jets(
            m[i], C[i], m1[i], C1[i], m2[i], C2[i], m0a, S0a, xs)
    w2 = np.array([gaussian_w2(m[i], C[i], m0a, S0a) for i in range(nh)])
    if not (np.all(np.isfinite(nll)) and np.all(np.isfinite(c1)) and np.all(np.isfinite(c2))):
        raise RuntimeError("gaussian_oracle produced non-finite values (model covariance not positive?)")
    return GaussianOracleResult(
        h=hs, nll=nll, c1=c1, c2=c2, w2=w2, mean=m, cov=C,
        nll_points=None if xa is None else nllp,
        c1_points=None if xa is None else c1p,
        c2_points=None if xa is None else c2p,
    )


@in_float64
def gaussian_chain_nll(score: Any, schedule: Schedule, h: float, x: Any, *, steps: int = 100,
                       grid: str | None = None, times: Any = None) -> np.ndarray:
    """Exact NLL (n,) of the points x (n, d) under the *time-discretised* h-model with an affine
    score (docs/theory.md section 3.11): the Euler–Maruyama chain of :func:`hbar.sample` and the
    target of :func:`hbar.path.path_log_likelihood`,

        y_{k+1} = y_k - u_h(y_k, t_k) D_k + sqrt(h g(t_k)^2 D_k) z_k,  y_0 ~ pi,  D_k = t_k - t_{k+1},

    on ``grid`` (:mod:`hbar.grids`, default the path tools' "log-snr") with ``steps`` steps, or on
    the given decreasing ``times`` from T to t_min. With u_h = K y - k affine (K = f I - (1+h)/2 g^2
    A, k = (1+h)/2 g^2 b from :class:`hbar.process.HProcess`) the chain stays Gaussian:

        m <- (I - K D) m + k D,   C <- (I - K D) C (I - K D)^T + h g^2 D I,   m_0 = 0, C_0 = prior_std^2 I,

    and NLL(x) = -log N(x; m_N, C_N). No Monte Carlo and no ODE tolerance: the reference for
    path-integral estimates at a finite step count, and for the discretisation error of a grid
    (its difference from :func:`gaussian_oracle` is exactly the time-discretisation error).
    h >= 0 (h = 0: the Euler scheme of the probability-flow ODE, whose chain is deterministic
    given y_0, still Gaussian). The score must provide ``.affine(t) -> (A, b)``. Runs in float64
    whatever the caller's JAX setting (:func:`hbar.precision.in_float64`).
    """
    import jax
    import jax.numpy as jnp

    from hbar.grids import DEFAULT_GRID, backward_grid, check_grid

    hv = float(check_h(h, "h")[0]) if np.ndim(h) == 0 else None
    if hv is None:
        raise HbarInputError("h must be a single number >= 0")
    d = _check_affine_score(score, None, schedule)
    xa = check_points(x, "x", d=d).astype(np.float64)
    ts = backward_grid(schedule, steps, check_grid(grid or DEFAULT_GRID) if times is None else DEFAULT_GRID, times)
    proc = HProcess(schedule)
    dtype = jnp.result_type(float)
    eye = jnp.eye(d, dtype=dtype)

    @jax.jit
    def moments(ts_j):
        def step(carry, inp):
            m, C = carry
            t, D = inp
            A, b = score.affine(t)
            K = proc.drift_given_score(eye, jnp.asarray(A, dtype), t, hv)
            k = -proc.drift_given_score(jnp.zeros(d, dtype), jnp.asarray(b, dtype), t, hv)
            B = eye - K * D
            return (B @ m + k * D, B @ C @ B.T + proc.diffusion2(t, hv) * D * eye), None

        init = (jnp.zeros(d, dtype), schedule.prior_std**2 * eye)
        (m, C), _ = jax.lax.scan(step, init, (ts_j[:-1], ts_j[:-1] - ts_j[1:]))
        return m, C

    m, C = (np.asarray(a, dtype=np.float64) for a in moments(jnp.asarray(ts, dtype)))
    C = 0.5 * (C + C.T)
    L = np.linalg.cholesky(C)
    r = np.linalg.solve(L, (xa - m[None, :]).T)
    return 0.5 * np.sum(r**2, axis=0) + np.sum(np.log(np.diag(L))) + 0.5 * d * math.log(2 * math.pi)
