"""Closed-form and brute-force references: the test oracles of hbar (theory.md sections 2, 7, 8).

Two independent ways to get the negative log-likelihood NLL(h) of the h-family of backward
processes (theory.md section 2)

    dx = u(x, t) dt + sqrt(h) g(t) dw_bar,   u = f(t) x - (1+h)/2 g(t)^2 s(x, t),

run from t = T (x_T ~ prior pi = N(0, prior_std^2 I)) down to t_min, without any expansion in h:

1. :func:`gaussian_oracle` -- exact for an *affine* score s = A(t) x + b(t) in any dimension
   (theory.md section 7). The marginals are Gaussian; their moments obey linear ODEs that are
   integrated together with their exact h-derivatives (sensitivity equations).
2. :func:`fokker_planck_nll` / :func:`fokker_planck_density` -- any score callable in d = 1, 2
   (theory.md section 8): the backward Fokker-Planck equation of the h-process is solved on a
   box grid (finite volumes, Scharfetter-Gummel fluxes, variable-step BDF2), with automatic
   grid/time-step refinement and Richardson extrapolation, reporting every level.

Sign conventions (derived here, and tested against Euler-Maruyama sampling). With the
backward drift u = K x - k, K = f I - (1+h)/2 g^2 A, k = (1+h)/2 g^2 b, a step from t to
t - dt is x <- x - u dt + sqrt(h g^2 dt) z, hence in the ordinary time variable t

    dm/dt = K m - k,        dC/dt = K C + C K^T - h g^2 I,

integrated from m_T = 0, C_T = prior_std^2 I at t = T down to t_min. (This agrees with
theory.md section 7, whose k has the same definition.) The same steps give the density
equation d_t q = -div(u q) - (h g^2 / 2) Lap q, t decreasing (section 2).
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_h, check_points, check_positive_int

__all__ = [
    "GaussianOracleResult",
    "gaussian_oracle",
    "gaussian_backward_moments",
    "FokkerPlanckLevel",
    "FokkerPlanckResult",
    "FokkerPlanckDensity",
    "fokker_planck_nll",
    "fokker_planck_density",
]


# =====================================================================================
# 1. Closed-form Gaussian oracle (theory.md section 7)
# =====================================================================================


@dataclasses.dataclass(frozen=True)
class GaussianOracleResult:
    """Exact NLL(h) of Gaussian data N(m0, S0) under the Gaussian model marginal q^h_{t_min}.

    Shapes (nh = number of h values, n = number of points, d = dimension):

    * ``h`` (nh,).
    * ``nll`` (nh,): expected NLL, E_{x ~ N(m0, S0)}[-log q^h_{t_min}(x)]
      = 1/2 [log det(2 pi C) + tr(C^{-1} S0) + (m0 - m)^T C^{-1} (m0 - m)].
    * ``c1`` (nh,): dNLL/dh at each h; ``c2`` (nh,): (1/2) d^2NLL/dh^2 at each h. So
      NLL(h + e) = nll + c1 e + c2 e^2 + O(e^3); **at h = 0 they are the Taylor (WKB)
      coefficients C1, C2 of NLL(h) = NLL0 + C1 h + C2 h^2 + ...** (theory.md sections 5, 6).
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
    """Right-hand side of the moment ODEs and their first two h-derivatives.

    With K = f I - (1+h)/2 g^2 A, K' = dK/dh = -(1/2) g^2 A, k = (1+h)/2 g^2 b, k' = (1/2) g^2 b:
        m'  = K m - k                       C'  = K C + C K^T - h g^2 I
        m1' = K m1 + K' m - k'              C1' = K C1 + C1 K^T + K' C + C K'^T - g^2 I
        m2' = K m2 + 2 K' m1                C2' = K C2 + C2 K^T + 2 (K' C1 + C1 K'^T)
    (m1 = dm/dh, m2 = d^2 m/dh^2, and the same for C; ' on the left is d/dt.)
    """
    import jax.numpy as jnp

    score, schedule, h = args
    m, C, m1, C1, m2, C2 = y
    A, b = score.affine(t)
    A = jnp.asarray(A, dtype=m.dtype)
    b = jnp.asarray(b, dtype=m.dtype)
    g2 = schedule.g2(t)
    f = schedule.f(t)
    d = m.shape[0]
    eye = jnp.eye(d, dtype=m.dtype)
    K = f * eye - 0.5 * (1.0 + h) * g2 * A
    Kp = -0.5 * g2 * A
    k = 0.5 * (1.0 + h) * g2 * b
    kp = 0.5 * g2 * b

    def lyap(M, X):
        P = M @ X
        return P + P.T

    dm = K @ m - k
    dC = lyap(K, C) - h * g2 * eye
    dm1 = K @ m1 + Kp @ m - kp
    dC1 = lyap(K, C1) + lyap(Kp, C) - g2 * eye
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

    theory.md section 7. Data N(m0, S0) in any dimension d; schedule with linear drift; score
    s(x, t) = A(t) x + b(t) given by ``score.affine(t) -> (A, b)`` (e.g.
    :class:`hbar.scores.AffineScore`, exact or perturbed). Every backward marginal q^h_t is
    N(m_t, C_t) with

        dm/dt = K m - k,   dC/dt = K C + C K^T - h g^2 I,   K = f I - (1+h)/2 g^2 A,
        k = (1+h)/2 g^2 b,  m_T = 0,  C_T = prior_std^2 I,  integrated T -> t_min,

    (so the p_T vs prior mismatch is included). At t_min:

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
    S0a = np.asarray(S0, dtype=np.float64)
    if S0a.ndim == 0:
        S0a = S0a * np.eye(d)
    elif S0a.ndim == 1:
        S0a = np.diag(S0a)
    if S0a.shape != (d, d) or not np.all(np.isfinite(S0a)):
        raise HbarInputError(f"S0 must be a finite (d, d) matrix with d={d}, got shape {S0a.shape}")
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


# =====================================================================================
# 2. Fokker-Planck brute force in d = 1, 2 (theory.md section 8)
# =====================================================================================


def _bernoulli(z: np.ndarray) -> np.ndarray:
    """B(z) = z / (exp(z) - 1), B(0) = 1, evaluated without overflow or cancellation."""
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    small = np.abs(z) < 1e-6
    zs = z[small]
    out[small] = 1.0 - 0.5 * zs + zs * zs / 12.0
    zl = z[~small]
    with np.errstate(over="ignore", invalid="ignore"):
        pos = zl > 0
        res = np.empty_like(zl)
        # z > 0: z e^{-z} / (1 - e^{-z}); z < 0: z / expm1(z)
        ez = np.exp(-zl[pos])
        res[pos] = zl[pos] * ez / (-np.expm1(-zl[pos]))
        res[~pos] = zl[~pos] / np.expm1(zl[~pos])
    out[~small] = res
    return out


def _sg_coefficients(v: np.ndarray, D: float, dx: float) -> tuple[np.ndarray, np.ndarray]:
    """Scharfetter-Gummel flux J = a q_L - b q_R across a face with velocity v (L -> R positive).

    a = (D/dx) B(-P), b = (D/dx) B(P), P = v dx / D (cell Peclet number), B(z) = z/(e^z - 1).
    Exact for constant v and D between the two centres; a, b >= 0 (monotone, M-matrix);
    a - b = v always; for |P| -> 0 it is the central flux, for |P| -> inf the upwind flux.
    For D = 0 (h = 0) it is exactly first-order upwind: a = max(v, 0), b = max(-v, 0).
    """
    if D <= 0.0:
        return np.maximum(v, 0.0), np.maximum(-v, 0.0)
    P = v * (dx / D)
    c = D / dx
    return c * _bernoulli(-P), c * _bernoulli(P)


def _cell_average_gauss_1d(edges: np.ndarray, std: float) -> np.ndarray:
    """Mass of N(0, std^2) in each cell [edges[i], edges[i+1]] (tail-accurate)."""
    from scipy.special import ndtr

    a = edges[:-1] / std
    b = edges[1:] / std
    return np.where(a >= 0.0, ndtr(-a) - ndtr(-b), ndtr(b) - ndtr(a))


class _Grid:
    """Uniform cell-centred grid on a box, d = 1 or 2 (cells per axis ``n``)."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray, n: tuple[int, ...]):
        self.d = len(n)
        self.lo = np.asarray(lo, float)
        self.hi = np.asarray(hi, float)
        self.n = tuple(int(k) for k in n)
        self.dx = (self.hi - self.lo) / np.asarray(self.n)
        self.edges = [np.linspace(self.lo[k], self.hi[k], self.n[k] + 1) for k in range(self.d)]
        self.centres = [0.5 * (e[1:] + e[:-1]) for e in self.edges]
        self.size = int(np.prod(self.n))
        self.vol = float(np.prod(self.dx))
        # interior face points: faces normal to axis k (n_k - 1 interior per line)
        if self.d == 1:
            self.face_pts = [self.edges[0][1:-1, None]]
        else:
            fx = np.stack(np.meshgrid(self.edges[0][1:-1], self.centres[1], indexing="ij"), -1).reshape(-1, 2)
            fy = np.stack(np.meshgrid(self.centres[0], self.edges[1][1:-1], indexing="ij"), -1).reshape(-1, 2)
            self.face_pts = [fx, fy]
        self.all_face_pts = np.concatenate(self.face_pts, axis=0)
        self.n_faces = [p.shape[0] for p in self.face_pts]
        if self.d == 2:
            self._build_pattern_2d()

    def _build_pattern_2d(self) -> None:
        """Fixed COO pattern of the 5-point operator and its permutation into CSC order."""
        import scipy.sparse as sp

        n0, n1 = self.n
        idx = np.arange(self.size).reshape(n0, n1)
        rows = [idx.ravel(),
                idx[:-1, :].ravel(), idx[1:, :].ravel(),   # x-upper: (i,j)->(i+1,j); x-lower
                idx[:, :-1].ravel(), idx[:, 1:].ravel()]   # y-upper; y-lower
        cols = [idx.ravel(),
                idx[1:, :].ravel(), idx[:-1, :].ravel(),
                idx[:, 1:].ravel(), idx[:, :-1].ravel()]
        r = np.concatenate(rows)
        c = np.concatenate(cols)
        nnz = r.size
        probe = sp.csc_matrix((np.arange(1, nnz + 1, dtype=np.float64), (r, c)), shape=(self.size, self.size))
        probe.sort_indices()
        self._perm = probe.data.astype(np.int64) - 1  # csc slot -> coo position
        self._indices = probe.indices.copy()
        self._indptr = probe.indptr.copy()

    def prior_cell_density(self, std: float) -> np.ndarray:
        """Cell averages of the prior N(0, std^2 I) density, flattened (size,)."""
        m = [_cell_average_gauss_1d(e, std) / dx for e, dx in zip(self.edges, self.dx)]
        if self.d == 1:
            return m[0]
        return np.outer(m[0], m[1]).ravel()

    def boundary_mask(self) -> np.ndarray:
        if self.d == 1:
            mask = np.zeros(self.n[0], bool)
            mask[[0, -1]] = True
            return mask
        mask = np.zeros(self.n, bool)
        mask[[0, -1], :] = True
        mask[:, [0, -1]] = True
        return mask.ravel()

    def eval_logq(self, q: np.ndarray, x: np.ndarray, method: str = "quadratic") -> tuple[np.ndarray, np.ndarray]:
        """log q at points x (n, d) from the cell values q (size,). Returns (values (n,), ok (n,)).

        "quadratic" (default): P = tensor-product quadratic Lagrange interpolant of log qbar
        (qbar = cell averages) on the 3 (1-D) or 3 x 3 (2-D) centres nearest to x, then the
        cell-average-to-point correction log q(x) = P(x) - sum_k dx_k^2/24 (d_kk P + (d_k P)^2)
        (from qbar = q + dx^2/24 q'' + O(dx^4) per axis) with the derivatives of P itself.
        Interpolation error O(dx^3); exact for a Gaussian up to the O(dx^4) correction terms.
        "linear": (bi)linear interpolation of log qbar between centres, O(dx^2) (error
        dx^2/8 |d^2 log q| at mid-cell), no correction. ``ok`` is False where a grid value of
        the stencil is <= 0 (then the value is meaningless).
        """
        n = self.n
        qq = q.reshape(n)
        lq = np.log(np.maximum(qq, 1e-300))
        idx, w0, w1, w2 = [], [], [], []
        for k in range(self.d):
            s = (x[:, k] - self.lo[k]) / self.dx[k] - 0.5
            if method == "linear":
                i0 = np.clip(np.floor(s).astype(int), 0, n[k] - 2)
                r = s - i0  # in [0, 1] except in the outer half cells (linear extrapolation)
                idx.append(i0)
                w0.append(np.stack([1 - r, r], axis=1))
            elif method == "quadratic":
                i0 = np.clip(np.rint(s).astype(int), 1, n[k] - 2)
                r = s - i0
                idx.append(i0 - 1)
                one = np.ones_like(r)
                w0.append(np.stack([0.5 * r * (r - 1), 1 - r * r, 0.5 * r * (r + 1)], axis=1))
                w1.append(np.stack([r - 0.5, -2 * r, r + 0.5], axis=1))  # d/dr (cell units)
                w2.append(np.stack([one, -2 * one, one], axis=1))        # d^2/dr^2
            else:
                raise HbarInputError(f"point_eval must be 'quadratic' or 'linear', got {method!r}")
        span = 2 if method == "linear" else 3
        ar = np.arange(span)
        if self.d == 1:
            nodes = idx[0][:, None] + ar[None, :]
            ok = np.all(qq[nodes] > 0, axis=1)
            vals = lq[nodes]
            P = np.sum(w0[0] * vals, axis=1)
            if method == "quadratic":
                P1 = np.sum(w1[0] * vals, axis=1)
                P2 = np.sum(w2[0] * vals, axis=1)
                P = P - (P2 + P1**2) / 24.0
            return P, ok
        ii = idx[0][:, None, None] + ar[None, :, None]
        jj = idx[1][:, None, None] + ar[None, None, :]
        ok = np.all(qq[ii, jj] > 0, axis=(1, 2))
        block = lq[ii, jj]
        P = np.einsum("na,nb,nab->n", w0[0], w0[1], block)
        if method == "quadratic":
            Px = np.einsum("na,nb,nab->n", w1[0], w0[1], block)
            Pxx = np.einsum("na,nb,nab->n", w2[0], w0[1], block)
            Py = np.einsum("na,nb,nab->n", w0[0], w1[1], block)
            Pyy = np.einsum("na,nb,nab->n", w0[0], w2[1], block)
            P = P - (Pxx + Px**2 + Pyy + Py**2) / 24.0
        return P, ok


def _feature_scale(score: Callable, schedule: Schedule, x: np.ndarray, quantile: float = 0.9) -> float:
    """Length scale of the model density near the data: 1 / sqrt(lambda), lambda = the
    ``quantile`` over the points of the largest eigenvalue of -(J + J^T)/2, J = d s / d x at
    t_min (for a Gaussian this is the smallest standard deviation)."""
    import jax
    import jax.numpy as jnp

    t = jnp.asarray(schedule.t_min, dtype=jnp.result_type(float))
    jac = jax.jit(jax.vmap(jax.jacfwd(lambda p: score(p[None, :], t)[0])))
    J = np.asarray(jac(jnp.asarray(x)))
    lam = np.linalg.eigvalsh(-0.5 * (J + np.swapaxes(J, 1, 2)))[:, -1]
    lam_q = float(np.quantile(lam, quantile))
    if not np.isfinite(lam_q) or lam_q <= 0:
        return float("inf")
    return 1.0 / math.sqrt(lam_q)


def _time_nodes(schedule: Schedule, n_steps: int, floor: float) -> np.ndarray:
    """Time nodes t_0 = T > t_1 > ... > t_n = t_min, uniform in a warped time psi(t).

    psi = 0.8 rho_hat + 0.2 t_hat, where rho(t) = log(sigma^2/alpha^2 + floor) (a log
    noise-to-signal ratio floored at ``floor``), rho_hat and t_hat are rho and t rescaled to
    [0, 1]. Since d rho/dt = g^2 / (sigma^2 + floor alpha^2), the steps are short where the
    diffusion g^2 is fast relative to the current spread of the marginals (near t_min for VP
    schedules, where the score sharpens; near T for COSINE where g^2 blows up) and about
    uniform in t elsewhere. The mapping is fixed for a given schedule, so refining n_steps
    nests the grids (needed for Richardson extrapolation).
    """
    tf = np.linspace(schedule.t_min, schedule.T, 20001)
    a2 = np.exp(2.0 * np.asarray(schedule.log_alpha(tf), dtype=np.float64))
    s2 = np.asarray(schedule.sigma2(tf), dtype=np.float64)
    rho = np.log(s2 / a2 + floor)
    # enforce monotonicity (sigma^2/alpha^2 is nondecreasing for g^2 >= 0)
    rho = np.maximum.accumulate(rho)
    rh = (rho - rho[0]) / max(rho[-1] - rho[0], 1e-300)
    th = (tf - tf[0]) / (tf[-1] - tf[0])
    psi = 0.8 * rh + 0.2 * th
    target = np.linspace(1.0, 0.0, n_steps + 1)
    t = np.interp(target, psi, tf)
    t[0], t[-1] = schedule.T, schedule.t_min
    if np.any(np.diff(t) >= 0):
        raise RuntimeError("internal error: time nodes not strictly decreasing")
    return t


@dataclasses.dataclass
class _LevelOut:
    q: list[np.ndarray]           # final density per h (size,)
    max_peclet: np.ndarray        # (nh,)
    mass_initial: float
    mass_final: np.ndarray        # (nh,)
    min_density: np.ndarray       # (nh,) min q / max q at t_min
    negative_mass: np.ndarray     # (nh,)
    boundary_mass: np.ndarray     # (nh,) max over time of the mass in the boundary cells
    seconds: float
    n_factor: int = 0             # sparse LU factorisations (2-D)
    n_iter: int = 0               # preconditioned GMRES iterations (2-D, "reuse")


def _make_score_eval(score: Callable, d: int) -> Callable:
    import jax
    import jax.numpy as jnp

    fn = jax.jit(lambda p, t: score(p, t))

    def ev(pts_j, t: float) -> np.ndarray:
        out = np.asarray(fn(pts_j, jnp.asarray(t, dtype=pts_j.dtype)), dtype=np.float64)
        return out

    return ev


def _gmres_right(mat, b: np.ndarray, x0: np.ndarray, prec: Callable, rtol: float, max_iter: int):
    """Right-preconditioned GMRES (modified Gram-Schmidt), no restart: x = x0 + P^{-1} V y.

    Returns (x, iterations) with x None if the true residual |b - mat x| did not reach
    rtol |b| within max_iter iterations.
    """
    bnorm = float(np.linalg.norm(b))
    if bnorm == 0.0:
        return np.zeros_like(b), 0
    r0 = b - mat @ x0
    beta = float(np.linalg.norm(r0))
    if beta <= rtol * bnorm:
        return x0.copy(), 0
    V = [r0 / beta]
    Z = []
    H = np.zeros((max_iter + 1, max_iter))
    y = None
    its = 0
    for j in range(max_iter):
        z = prec(V[j])
        Z.append(z)
        w = mat @ z
        for i in range(j + 1):
            H[i, j] = float(w @ V[i])
            w -= H[i, j] * V[i]
        H[j + 1, j] = float(np.linalg.norm(w))
        e1 = np.zeros(j + 2)
        e1[0] = beta
        y, *_ = np.linalg.lstsq(H[: j + 2, : j + 1], e1, rcond=None)
        res = float(np.linalg.norm(e1 - H[: j + 2, : j + 1] @ y))
        its = j + 1
        if res <= 0.5 * rtol * bnorm or H[j + 1, j] <= 1e-300:
            break
        V.append(w / H[j + 1, j])
    x = x0 + np.stack(Z, axis=1) @ y
    if float(np.linalg.norm(b - mat @ x)) <= rtol * bnorm:
        return x, its
    return None, its


class _StaleLUSolver:
    """Sparse solves for a slowly changing sequence of matrices (2-D).

    ``mode="splu"``: a fresh SuperLU factorisation per call. ``mode="reuse"``: GMRES
    preconditioned by the LU of an earlier matrix of the sequence, to a relative residual
    ``rtol`` (true residual checked); the LU is renewed after a solve that needed more than
    ``refactor_after`` iterations, and GMRES failing within ``max_iter`` iterations falls back
    to a direct solve. Exact up to ``rtol`` and several times faster on large grids, since a
    triangular solve costs far less than a factorisation.
    """

    def __init__(self, mode: str, rtol: float = 1e-12, max_iter: int = 15, refactor_after: int = 6):
        self.mode = mode
        self.rtol = rtol
        self.max_iter = max_iter
        self.refactor_after = refactor_after
        self.lu = None
        self.n_factor = 0
        self.n_iter = 0
        self.n_solve = 0

    def _factor(self, mat):
        import scipy.sparse.linalg as spl

        # M = c0 I - dt L is a column diagonally dominant M-matrix: no pivoting needed
        self.n_factor += 1
        return spl.splu(mat, permc_spec="MMD_AT_PLUS_A", diag_pivot_thresh=0.0,
                        options={"SymmetricMode": True})

    def solve(self, mat, rhs: np.ndarray, x0: np.ndarray) -> np.ndarray:
        self.n_solve += 1
        if self.mode == "reuse" and self.lu is not None:
            xs, its = _gmres_right(mat, rhs, x0, self.lu.solve, self.rtol, self.max_iter)
            self.n_iter += its
            if xs is not None:
                if its > self.refactor_after:
                    self.lu = None  # convergence slowing down: refactorise next step
                return xs
        lu = self._factor(mat)
        self.lu = lu if self.mode == "reuse" else None
        return lu.solve(rhs)


def _solve_fp_level(
    score_eval: Callable,
    schedule: Schedule,
    grid: _Grid,
    hs: np.ndarray,
    t_nodes: np.ndarray,
    linear_solver: str = "reuse",
) -> _LevelOut:
    """Backward Fokker-Planck for several h on one grid and time grid (BDF2, SG fluxes).

    BLAS is limited to one thread while stepping: the vectors are small and OpenBLAS threads
    competing with XLA's thread pool slowed the level-1 operations by 100x on a loaded machine.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return _solve_fp_level_impl(score_eval, schedule, grid, hs, t_nodes, linear_solver)
    with threadpool_limits(limits=1, user_api="blas"):
        return _solve_fp_level_impl(score_eval, schedule, grid, hs, t_nodes, linear_solver)


def _solve_fp_level_impl(
    score_eval: Callable,
    schedule: Schedule,
    grid: _Grid,
    hs: np.ndarray,
    t_nodes: np.ndarray,
    linear_solver: str,
) -> _LevelOut:
    import jax.numpy as jnp
    import scipy.sparse as sp
    from scipy.linalg import solve_banded

    t_start = time.perf_counter()
    d = grid.d
    nh = hs.shape[0]
    pts_j = jnp.asarray(grid.all_face_pts)
    # coordinate along the face normal, per axis
    normal_coord = [grid.face_pts[k][:, k] for k in range(d)]
    splits = np.cumsum(grid.n_faces)[:-1]
    q0 = grid.prior_cell_density(schedule.prior_std)
    mass0 = float(q0.sum() * grid.vol)
    q = [q0.copy() for _ in range(nh)]
    q_prev: list[np.ndarray | None] = [None] * nh
    max_pe = np.zeros(nh)
    bmask = grid.boundary_mask()
    bmass = np.full(nh, float(q0[bmask].sum() * grid.vol))
    solvers = [_StaleLUSolver(linear_solver) for _ in range(nh)]
    dt_prev = None
    for step in range(t_nodes.shape[0] - 1):
        t_new = float(t_nodes[step + 1])
        dt = float(t_nodes[step] - t_nodes[step + 1])
        s_all = score_eval(pts_j, t_new)
        s_parts = np.split(s_all, splits, axis=0)
        s_norm = [s_parts[k][:, k] for k in range(d)]
        f = float(schedule.f(t_new))
        g2 = float(schedule.g2(t_new))
        if dt_prev is None:
            c0, c1, c2 = 1.0, 1.0, 0.0  # backward Euler start
        else:
            w = dt / dt_prev
            c0, c1, c2 = (1 + 2 * w) / (1 + w), 1 + w, w * w / (1 + w)
        for ih, h in enumerate(hs):
            D = 0.5 * h * g2
            coef = []
            for k in range(d):
                # reverse-time velocity v = -u = -f x + (1+h)/2 g^2 s (component along axis k)
                v = -f * normal_coord[k] + 0.5 * (1.0 + h) * g2 * s_norm[k]
                if D > 0:
                    max_pe[ih] = max(max_pe[ih], float(np.max(np.abs(v))) * grid.dx[k] / D)
                else:
                    max_pe[ih] = np.inf
                a, b = _sg_coefficients(v, D, float(grid.dx[k]))
                coef.append((a / grid.dx[k], b / grid.dx[k]))
            rhs = c1 * q[ih] if q_prev[ih] is None or c2 == 0.0 else c1 * q[ih] - c2 * q_prev[ih]
            if d == 1:
                a, b = coef[0]
                n0 = grid.n[0]
                ab = np.zeros((3, n0))
                diag = np.full(n0, c0)
                diag[:-1] += dt * a
                diag[1:] += dt * b
                ab[1] = diag
                ab[0, 1:] = -dt * b     # (i, i+1)
                ab[2, :-1] = -dt * a    # (i+1, i)
                q_new = solve_banded((1, 1), ab, rhs, check_finite=False)
            else:
                n0, n1 = grid.n
                (ax, bx), (ay, by) = coef
                ax = ax.reshape(n0 - 1, n1)
                bx = bx.reshape(n0 - 1, n1)
                ay = ay.reshape(n0, n1 - 1)
                by = by.reshape(n0, n1 - 1)
                diag = np.full((n0, n1), c0)
                diag[:-1, :] += dt * ax
                diag[1:, :] += dt * bx
                diag[:, :-1] += dt * ay
                diag[:, 1:] += dt * by
                data = np.concatenate([diag.ravel(), -dt * bx.ravel(), -dt * ax.ravel(),
                                       -dt * by.ravel(), -dt * ay.ravel()])
                mat = sp.csc_matrix((data[grid._perm], grid._indices, grid._indptr),
                                    shape=(grid.size, grid.size))
                q_new = solvers[ih].solve(mat, rhs, q[ih])
            q_prev[ih] = q[ih]
            q[ih] = q_new
            bmass[ih] = max(bmass[ih], float(np.abs(q_new[bmask]).sum() * grid.vol))
        dt_prev = dt
    mass_f = np.array([float(qq.sum() * grid.vol) for qq in q])
    qmin = np.array([float(qq.min() / qq.max()) for qq in q])
    negm = np.array([float(np.clip(qq, None, 0.0).sum() * grid.vol) for qq in q])
    return _LevelOut(q=q, max_peclet=max_pe, mass_initial=mass0, mass_final=mass_f, min_density=qmin,
                     negative_mass=negm, boundary_mass=bmass, seconds=time.perf_counter() - t_start,
                     n_factor=sum(sv.n_factor for sv in solvers), n_iter=sum(sv.n_iter for sv in solvers))


@dataclasses.dataclass(frozen=True)
class FokkerPlanckLevel:
    """One refinement level of :func:`fokker_planck_nll`. Arrays are (nh,), NaN for an h not
    solved at this level (already converged) or whose solution was unusable (``failed``).

    * cells: cells per axis; n_steps: BDF2 time steps; dx: cell widths (d,).
    * nll: mean NLL on this grid (no extrapolation); richardson: extrapolated from this and
      the previous level (NaN if the previous level is missing).
    * max_peclet: max cell Peclet number |u| dx / (h g^2 / 2) over faces and time.
    * mass_error: |final mass - initial mass| (conservation; round-off level expected);
      negative_mass: sum of the negative part of q times the cell volume at t_min;
      boundary_mass: max over time of the mass in the outer layer of cells.
    * failed: (nh,) bool, True where the grid density was <= 0 next to some data point
      (BDF2 undershoot on a too coarse grid): that level is skipped for that h.
    * seconds; n_factor: sparse LU factorisations; n_iter: preconditioned GMRES iterations.
    """

    cells: int
    n_steps: int
    dx: tuple[float, ...]
    nll: np.ndarray
    richardson: np.ndarray
    max_peclet: np.ndarray
    mass_error: np.ndarray
    negative_mass: np.ndarray
    boundary_mass: np.ndarray
    failed: np.ndarray
    seconds: float
    n_factor: int = 0
    n_iter: int = 0


@dataclasses.dataclass(frozen=True)
class FokkerPlanckResult:
    """Brute-force NLL(h) from the backward Fokker-Planck equation (theory.md section 8).

    Shapes: nh values of h, n points.

    * ``h`` (nh,); ``nll`` (nh,): mean NLL over the points, Richardson-extrapolated from the
      last two levels; ``nll_points`` (nh, n): per-point -log q^h_{t_min}(x), extrapolated the
      same way; ``error`` (nh,): estimated discretisation error of ``nll`` (see
      :func:`fokker_planck_nll`); ``stderr`` (nh,): Monte Carlo standard error of the mean
      over the points, std(nll_points) / sqrt(n) (not a discretisation error).
    * ``converged`` (nh,): error <= tol reached; ``observed_order`` (nh,): convergence order
      measured from the last three levels (2 expected; NaN if fewer levels).
    * ``levels``: the per-level :class:`FokkerPlanckLevel` reports -- the grid-convergence
      check behind every number; ``report()`` formats them as a table; ``nll_levels``
      (n_levels, nh) the raw values.
    * ``box`` (d, 2); ``feature_scale``: length scale of the model density near the data
      used to choose the grid; ``flags``: problems detected (mass loss, negative density, box
      too small, not converged, failed levels). Empty if everything passed.
    """

    h: np.ndarray
    nll: np.ndarray
    nll_points: np.ndarray
    error: np.ndarray
    stderr: np.ndarray
    converged: np.ndarray
    observed_order: np.ndarray
    levels: tuple[FokkerPlanckLevel, ...]
    box: np.ndarray
    tol: float
    feature_scale: float
    flags: tuple[str, ...]

    @property
    def cells(self) -> list[int]:
        """Cells per axis of each level."""
        return [lv.cells for lv in self.levels]

    @property
    def n_steps(self) -> list[int]:
        """Time steps of each level."""
        return [lv.n_steps for lv in self.levels]

    @property
    def nll_levels(self) -> np.ndarray:
        """(n_levels, nh) raw per-level mean NLL (NaN where an h was not solved or failed)."""
        return np.array([lv.nll for lv in self.levels])

    @property
    def ok(self) -> bool:
        """True when every h converged and no diagnostic flag was raised."""
        return not self.flags

    def report(self) -> str:
        """Human-readable convergence table: every level's NLL per h, the extrapolation,
        error estimate, order, Peclet number and conservation diagnostics."""
        d = self.box.shape[0]
        lines = [f"Fokker-Planck NLL, d={d}, box={self.box.tolist()}, tol={self.tol:g}, "
                 f"feature scale={self.feature_scale:.3g}"]
        for ih, h in enumerate(self.h):
            lines.append(
                f"h={h:g}: NLL={self.nll[ih]:.8f} +- {self.error[ih]:.2e} (discretisation) "
                f"+- {self.stderr[ih]:.2e} (MC over points), order={self.observed_order[ih]:.2f}, "
                f"converged={bool(self.converged[ih])}"
            )
            for lv in self.levels:
                if lv.failed[ih]:
                    lines.append(f"    cells={lv.cells:5d} steps={lv.n_steps:5d} FAILED (density <= 0 next to a "
                                 f"point; negMass={lv.negative_mass[ih]:.1e})")
                    continue
                if np.isnan(lv.nll[ih]):
                    continue
                lines.append(
                    f"    cells={lv.cells:5d} steps={lv.n_steps:5d} NLL={lv.nll[ih]:.8f} "
                    f"richardson={lv.richardson[ih]:.8f} maxPe={lv.max_peclet[ih]:.3g} "
                    f"massErr={lv.mass_error[ih]:.1e} negMass={lv.negative_mass[ih]:.1e} "
                    f"bndMass={lv.boundary_mass[ih]:.1e} ({lv.seconds:.2f}s)"
                )
        if self.flags:
            lines.append("FLAGS: " + "; ".join(self.flags))
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - formatting
        return self.report()


@dataclasses.dataclass(frozen=True)
class FokkerPlanckDensity:
    """Grid density q^h_{t_min} for plotting. ``centres``: list of d arrays (n_k,) of cell
    centres; ``density``: (nh, n_0) or (nh, n_0, n_1); ``h`` (nh,); diagnostics per h."""

    h: np.ndarray
    centres: list[np.ndarray]
    density: np.ndarray
    mass: np.ndarray
    min_density: np.ndarray
    max_peclet: np.ndarray
    n_steps: int


def _resolve_box(box: Any, d: int, schedule: Schedule, x: np.ndarray | None) -> np.ndarray:
    if box is None:
        L = 6.0 * schedule.prior_std
        if x is not None:
            L = max(L, 1.2 * float(np.abs(x).max()))
        return np.array([[-L, L]] * d, dtype=float)
    arr = np.asarray(box, dtype=float)
    if arr.ndim == 0:
        if not arr > 0:
            raise HbarInputError(f"box half-width must be > 0, got {box}")
        return np.array([[-float(arr), float(arr)]] * d)
    if arr.shape == (2,):
        arr = np.tile(arr, (d, 1))
    if arr.shape != (d, 2) or not np.all(np.isfinite(arr)) or np.any(arr[:, 1] <= arr[:, 0]):
        raise HbarInputError(f"box must be a half-width, (lo, hi) or (d, 2) with lo < hi; got {box}")
    return arr


def _check_common(score: Any, schedule: Schedule, d: int, h: Any, allow_upwind_h0: bool) -> np.ndarray:
    if not callable(score):
        raise HbarInputError("score must be a callable score(x, t) -> (n, d)")
    if not isinstance(schedule, Schedule):
        raise HbarInputError("schedule must be an hbar Schedule")
    if d not in (1, 2):
        raise HbarInputError(f"the Fokker-Planck brute force supports d = 1 and d = 2 only, got d = {d}")
    hs = check_h(h)
    if np.any(hs == 0) and not allow_upwind_h0:
        raise HbarInputError(
            "h = 0 makes the Fokker-Planck equation pure advection: the grid scheme would be first-order "
            "upwind with numerical diffusion that acts like an extra h. Use hbar's exact probability-flow "
            "likelihood for h = 0 (theory.md section 4), or pass allow_upwind_h0=True to accept the "
            "first-order upwind value."
        )
    return hs


def _check_score_output(score_eval: Callable, grid: _Grid, schedule: Schedule) -> None:
    import jax.numpy as jnp

    pts = jnp.asarray(grid.all_face_pts[:3])
    try:
        out = score_eval(pts, float(schedule.T))
    except Exception as err:
        raise HbarInputError(f"score(x, t) failed on a (3, {grid.d}) batch: {err}") from err
    if out.shape != (pts.shape[0], grid.d):
        raise HbarInputError(f"score(x, t) must return shape (n, {grid.d}), got {out.shape}")
    if not np.all(np.isfinite(out)):
        raise HbarInputError("score(x, t) returned NaN or inf")


def fokker_planck_nll(
    score: Callable,
    schedule: Schedule,
    x: Any,
    h: float | Sequence[float] | np.ndarray,
    tol: float = 1e-3,
    grid: int | None = None,
    n_steps: int | None = None,
    *,
    box: Any = None,
    levels: int | None = None,
    min_levels: int = 3,
    max_levels: int = 5,
    max_cells: int | None = None,
    refine: int = 2,
    cells_per_scale: float = 2.0,
    time_floor: float | None = None,
    allow_upwind_h0: bool = False,
    point_eval: str = "quadratic",
    linear_solver: str = "reuse",
    mass_tol: float = 1e-8,
    negative_tol: float = 1e-6,
    boundary_tol: float = 1e-6,
    warn: bool = True,
) -> FokkerPlanckResult:
    """Brute-force NLL(h) = mean_i -log q^h_{t_min}(x_i) for any score in d = 1, 2 (section 8).

    Solves the backward Fokker-Planck equation of the h-process (theory.md section 2)

        d_t q = -div(u q) - (h g^2 / 2) Lap q,   u = f(t) x - (1+h)/2 g(t)^2 s(x, t),

    from q_T = prior density (exact cell averages) at t = T down to t_min, for every h in
    ``h`` at once. No expansion in h: this is the reference the WKB series must match.

    Discretisation (reverse time tau = T - t, d_tau q = -div(v q - D grad q), v = -u,
    D = h g^2/2):

    * space: finite volumes on the box (uniform cell-centred grid, zero-flux walls, so mass is
      conserved to round-off); the score is evaluated once per time step on all interior cell
      faces (one jitted batch shared by all h). Fluxes are Scharfetter-Gummel (exponentially
      fitted): exact for locally constant v, positive (M-matrix), central at small cell Peclet
      number Pe = |v| dx / D and upwind at large Pe; the max Pe is reported per h. Second order
      in dx once Pe is O(1); at large Pe (small h) the error is first order until the grid
      resolves the drift.
    * time: variable-step BDF2 (first step backward Euler), implicit, one linear solve per
      step and h: banded LU in 1-D; in 2-D sparse LU (``splu``) used either fresh per step
      (``linear_solver="splu"``) or, default ``"reuse"``, as preconditioner of GMRES for the
      next steps until it needs more than 6 iterations (relative residual 1e-12; a few times
      faster). Nodes are uniform in a warped time (:func:`_time_nodes`): dense where g^2 is
      fast relative to sigma^2 + floor alpha^2 (near t_min for VP schedules), with
      ``floor = time_floor``, default (box width / 200)^2. BDF2 is not positivity preserving:
      on too coarse grids the tails can undershoot below zero (reported as negative mass); a
      level where that happens next to a data point is marked failed and skipped.
    * output: log q at the points by quadratic interpolation with the cell-average correction
      (``point_eval="quadratic"``, see :meth:`_Grid.eval_logq`) or bilinear ("linear").

    Accuracy control: level k uses ``grid * refine**k`` cells per axis and
    ``n_steps * refine**k`` time steps (nested time grids). By default ``grid`` is chosen so
    that the coarsest cell is 1/``cells_per_scale`` of the feature scale of the model density
    at the data (1/sqrt of the 90 % quantile of the largest eigenvalue of -ds/dx at t_min) and
    ``n_steps = grid``. From the second level on the value is Richardson-extrapolated assuming
    order p = 2 (1 for h = 0), R_k = Q_k + (Q_k - Q_{k-1}) / (refine^p - 1), applied to the mean
    and to every point. Error estimate: with three consecutive levels |R_k - R_{k-1}|, or, if
    the observed order log_r(|Q_{k-1} - Q_{k-2}| / |Q_k - Q_{k-1}|) lies outside [p - 0.5, p + 1]
    (not yet asymptotic), the larger of that and |Q_k - Q_{k-1}|; with two levels
    |Q_k - Q_{k-1}|. An h is converged when the estimate is <= ``tol`` after ``min_levels``
    consecutive usable levels; converged h are not solved again. Refinement stops after
    ``max_levels`` or before a grid of more than ``max_cells`` cells (then ``converged`` is
    False and a flag is set). ``levels=k`` runs exactly k levels instead.

    Args:
        score: any JAX callable score(x (n, d), t scalar) -> (n, d).
        schedule: linear schedule; prior N(0, prior_std^2 I) sets q_T.
        x: (n, d) data points, d = 1 or 2, all inside the box.
        h: scalar or list of h > 0 (h = 0 only with ``allow_upwind_h0``: first-order upwind,
            Richardson with order 1; better use the exact h = 0 likelihood, section 4).
        tol: requested absolute accuracy of the mean NLL (nats).
        grid: cells per axis on the coarsest level (default: from the feature scale).
        n_steps: time steps on the coarsest level (default = grid).
        box: half-width L (box [-L, L]^d), (lo, hi), or (d, 2); default L = max(6 prior_std,
            1.2 max|x|).
        max_cells: total cell limit (default 2e5 in 1-D, 256^2 in 2-D).

    Returns:
        :class:`FokkerPlanckResult`; ``result.report()`` prints the full convergence table.

    Raises:
        HbarInputError: bad inputs (h < 0, h = 0 without opt-in, d not in {1, 2}, points
            outside the box, score of the wrong shape).
        RuntimeError: no usable level for some h (density <= 0 next to a point on every grid).
    """
    xa = check_points(x, "x").astype(np.float64)
    d = xa.shape[1]
    hs = _check_common(score, schedule, d, h, allow_upwind_h0)
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise HbarInputError(f"tol must be > 0, got {tol}")
    if point_eval not in ("quadratic", "linear"):
        raise HbarInputError(f"point_eval must be 'quadratic' or 'linear', got {point_eval!r}")
    if linear_solver not in ("reuse", "splu"):
        raise HbarInputError(f"linear_solver must be 'reuse' or 'splu', got {linear_solver!r}")
    bx = _resolve_box(box, d, schedule, xa)
    outside = np.any((xa < bx[:, 0]) | (xa > bx[:, 1]), axis=1)
    if outside.any():
        i = int(np.nonzero(outside)[0][0])
        raise HbarInputError(
            f"{int(outside.sum())} point(s) lie outside the box {bx.tolist()}, first x[{i}] = {xa[i].tolist()}; "
            "pass a larger box"
        )
    refine = check_positive_int(refine, "refine")
    if refine < 2:
        raise HbarInputError("refine must be >= 2")
    if levels is not None:
        levels = check_positive_int(levels, "levels")
    min_levels = check_positive_int(min_levels, "min_levels")
    max_levels = check_positive_int(max_levels, "max_levels")
    max_cells = int(max_cells) if max_cells is not None else (200_000 if d == 1 else 256 * 256)
    width = float(np.max(bx[:, 1] - bx[:, 0]))
    floor = time_floor if time_floor is not None else (width / 200.0) ** 2

    score_eval = _make_score_eval(score, d)
    _check_score_output(score_eval, _Grid(bx[:, 0], bx[:, 1], (8,) * d), schedule)
    flags: list[str] = []
    scale = _feature_scale(score, schedule, xa)
    if grid is None:
        n0 = int(math.ceil(cells_per_scale * width / min(scale, width)))
        n0 = max(n0, 64 if d == 1 else 24)
        # leave room for min_levels levels below max_cells
        n_cap = int((max_cells ** (1.0 / d)) // refine ** (min_levels - 1))
        if n0 > n_cap:
            if n0 > 1.5 * n_cap:
                flags.append(f"coarsest grid capped at {n_cap} cells/axis by max_cells (feature scale "
                             f"{scale:.3g} wanted {n0}); the result may be under-resolved")
            n0 = max(n_cap, 8)
    else:
        n0 = check_positive_int(grid, "grid")
    if n0 < 5:
        raise HbarInputError("grid must have at least 5 cells per axis")
    s0 = check_positive_int(n_steps, "n_steps") if n_steps is not None else n0

    nh, npts = hs.shape[0], xa.shape[0]
    order = np.where(hs == 0, 1.0, 2.0)
    active = np.ones(nh, bool)
    # per-h history of consecutive usable levels: list of (Q, P, R)
    hist: list[list[tuple[float, np.ndarray, float]]] = [[] for _ in range(nh)]
    level_reports: list[FokkerPlanckLevel] = []
    final_val = np.full(nh, np.nan)
    final_pts = np.full((nh, npts), np.nan)
    err = np.full(nh, np.nan)
    obs = np.full(nh, np.nan)
    converged = np.zeros(nh, bool)
    n_run = levels if levels is not None else max_levels
    for k in range(n_run):
        cells = n0 * refine**k
        steps = s0 * refine**k
        if cells**d > max_cells:
            flags.append(f"stopped refining: {cells}^{d} cells would exceed max_cells={max_cells}")
            break
        g = _Grid(bx[:, 0], bx[:, 1], (cells,) * d)
        tn = _time_nodes(schedule, steps, floor)
        idx = np.nonzero(active)[0]
        out = _solve_fp_level(score_eval, schedule, g, hs[idx], tn, linear_solver)
        Q = np.full(nh, np.nan)
        R = np.full(nh, np.nan)
        lev = {key: np.full(nh, np.nan) for key in ("pe", "me", "nm", "bm")}
        failed = np.zeros(nh, bool)
        for j, ih in enumerate(idx):
            lev["pe"][ih] = out.max_peclet[j]
            lev["me"][ih] = abs(out.mass_final[j] - out.mass_initial)
            lev["nm"][ih] = out.negative_mass[j]
            lev["bm"][ih] = out.boundary_mass[j]
            lq_pts, ok = g.eval_logq(out.q[j], xa, point_eval)
            if not ok.all():
                failed[ih] = True
                hist[ih] = []  # Richardson needs consecutive usable levels
                continue
            P = -lq_pts
            Q[ih] = float(P.mean())
            H = hist[ih]
            if H:
                fac = 1.0 / (refine ** order[ih] - 1.0)
                R[ih] = Q[ih] + (Q[ih] - H[-1][0]) * fac
                RP = P + (P - H[-1][1]) * fac
                dq = abs(Q[ih] - H[-1][0])
                if len(H) >= 2 and np.isfinite(H[-1][2]):
                    dq_prev = abs(H[-1][0] - H[-2][0])
                    obs[ih] = math.log(dq_prev / dq) / math.log(refine) if dq > 0 and dq_prev > 0 else np.nan
                    e_r = abs(R[ih] - H[-1][2])
                    asym = np.isfinite(obs[ih]) and order[ih] - 0.5 <= obs[ih] <= order[ih] + 1.0
                    err[ih] = e_r if asym else max(e_r, dq)
                else:
                    obs[ih] = np.nan
                    err[ih] = dq
                final_val[ih], final_pts[ih] = R[ih], RP
            else:
                final_val[ih], final_pts[ih] = Q[ih], P
                err[ih] = np.nan
            H.append((Q[ih], P, R[ih]))
            if len(H) >= min_levels and err[ih] <= tol:
                converged[ih] = True
                if levels is None:
                    active[ih] = False
            else:
                converged[ih] = False
        level_reports.append(FokkerPlanckLevel(
            cells=cells, n_steps=steps, dx=tuple(float(v) for v in g.dx), nll=Q, richardson=R,
            max_peclet=lev["pe"], mass_error=lev["me"], negative_mass=lev["nm"], boundary_mass=lev["bm"],
            failed=failed, seconds=out.seconds, n_factor=out.n_factor, n_iter=out.n_iter,
        ))
        if not active.any():
            break

    res_levels = tuple(level_reports)
    for ih, h in enumerate(hs):
        solved = [L for L in res_levels if np.isfinite(L.nll[ih])]
        fails = [L.cells for L in res_levels if L.failed[ih]]
        if fails:
            flags.append(f"h={h:g}: levels with cells={fails} failed (density <= 0 next to a point)")
        if not solved:
            tmp = FokkerPlanckResult(h=hs, nll=final_val, nll_points=final_pts, error=err, stderr=np.full(nh, np.nan),
                                     converged=converged, observed_order=obs, levels=res_levels, box=bx,
                                     tol=float(tol), feature_scale=scale, flags=tuple(flags))
            raise RuntimeError(f"fokker_planck_nll: no usable grid for h={h:g}\n" + tmp.report())
        if not converged[ih]:
            flags.append(f"h={h:g}: not converged to tol={tol:g} (estimated error {err[ih]:.2e})")
        lv = solved[-1]
        if lv.mass_error[ih] > mass_tol:
            flags.append(f"h={h:g}: mass changed by {lv.mass_error[ih]:.2e} > {mass_tol:g}")
        if -lv.negative_mass[ih] > negative_tol:
            flags.append(f"h={h:g}: negative density, mass {lv.negative_mass[ih]:.2e}")
        if lv.boundary_mass[ih] > boundary_tol:
            flags.append(f"h={h:g}: mass {lv.boundary_mass[ih]:.2e} in the boundary cells: box may be too small")
        if h == 0:
            flags.append("h=0: first-order upwind scheme (numerical diffusion acts like an extra h)")
    stderr = final_pts.std(axis=1, ddof=1) / np.sqrt(npts) if npts > 1 else np.full(nh, np.nan)
    res = FokkerPlanckResult(
        h=hs, nll=final_val, nll_points=final_pts, error=err, stderr=stderr, converged=converged,
        observed_order=obs, levels=res_levels, box=bx, tol=float(tol), feature_scale=scale, flags=tuple(flags),
    )
    if warn and flags:
        warnings.warn("fokker_planck_nll: " + "; ".join(flags), RuntimeWarning, stacklevel=2)
    return res


def fokker_planck_density(
    score: Callable,
    schedule: Schedule,
    h: float | Sequence[float] | np.ndarray,
    d: int,
    grid: int = 200,
    n_steps: int = 200,
    *,
    box: Any = None,
    time_floor: float | None = None,
    allow_upwind_h0: bool = False,
) -> FokkerPlanckDensity:
    """Grid density q^h_{t_min} of the backward h-process (theory.md section 8), for plotting.

    Same scheme as :func:`fokker_planck_nll` on one fixed grid (``grid`` cells per axis,
    ``n_steps`` BDF2 steps), no refinement. Box default [-6 prior_std, 6 prior_std]^d.
    Returns :class:`FokkerPlanckDensity` with density (nh, grid) or (nh, grid, grid).
    """
    d = check_positive_int(d, "d")
    hs = _check_common(score, schedule, d, h, allow_upwind_h0)
    grid = check_positive_int(grid, "grid")
    n_steps = check_positive_int(n_steps, "n_steps")
    bx = _resolve_box(box, d, schedule, None)
    floor = time_floor if time_floor is not None else (float(np.max(bx[:, 1] - bx[:, 0])) / 200.0) ** 2
    g = _Grid(bx[:, 0], bx[:, 1], (grid,) * d)
    score_eval = _make_score_eval(score, d)
    _check_score_output(score_eval, g, schedule)
    out = _solve_fp_level(score_eval, schedule, g, hs, _time_nodes(schedule, n_steps, floor))
    dens = np.array([qq.reshape(g.n) for qq in out.q])
    return FokkerPlanckDensity(h=hs, centres=g.centres, density=dens, mass=out.mass_final,
                               min_density=out.min_density, max_peclet=out.max_peclet, n_steps=n_steps)
