"""WKB expansion of log q^h in the noise strength h, by autodiff along characteristics.

ell^h_t = log q^h_t obeys (docs/theory.md section 5)

    d_t ell = - div u - u . grad ell - (h g^2/2)(Lap ell + |grad ell|^2),   ell_T = log pi,

with u = v0 - (h/2) g^2 s, v0 = f x - (g^2/2) s (:class:`hbar.process.HProcess`). Writing ell = psi0 + h psi1 + h^2 psi2 + ...
and following the probability-flow characteristic X(t) (dX/dt = v0(X), X(t_min) = data),
each psi_j is transported along X with a source:

    d/dt psi0(X) = - div v0,
    d/dt psi1(X) = R1 = (g^2/2)[div s + s . grad psi0 - Lap psi0 - |grad psi0|^2],
    d/dt psi2(X) = R2 = (g^2/2)[(s - 2 grad psi0) . grad psi1 - Lap psi1].

Their derivatives along X follow from differentiating the transport equation. We carry
the Taylor polynomial of psi_j around X(t) in the offset y,

    P_j(y) = sum_{k <= K_j} c_{j,k}[y, ..., y] / k!,     c_{j,k}: (n, d^k),

which obeys dP_j/dt(y) = F_j(y) with

    F_0(y) = - div v0(X + y) - (v0(X + y) - v0(X)) . grad P_0(y),
    F_1(y) = - (v0(X + y) - v0(X)) . grad P_1(y) + R1 evaluated with P_0 at X + y,

so d c_{j,k}/dt is the k-th derivative tensor of F_j at y = 0, obtained exactly by nested
basis-vector jvps (:func:`hbar.derivatives.taylor_tensors`). The system closes at
K_0 = 2 for order 1 (c_{0,1} = G = grad ell0 and c_{0,2} = H = Hess ell0: this is exactly
dG/dt = -grad div v0 - J^T G, dH/dt = -Hess div v0 - J^T H - H J - sum_k G_k Hess v0_k of
docs/theory.md section 5) and at (K_0, K_1) = (4, 2) for order 2 (docs/theory.md section 6).
One forward solve (for X_T) and one backward solve from T (c_{0,0} = log pi(X_T),
c_{0,1} = grad log pi(X_T), c_{0,2} = Hess log pi, higher tensors and psi1, psi2 zero).
No nested solves, no finite differences.

Cost. Each source F_j is differentiated only to its own order K_j (``column_orders`` of
:func:`hbar.derivatives.taylor_tensors`; F_1 of order 1 is needed at y = 0 only); the step size
of the backward solve is controlled on X and the psi_j only (:func:`returned_part`,
``ODEOptions.error_on``), not on the auxiliary tensors G, H, ...; the right-hand side is jitted
once (diffrax traces the vector field three times; order 2 in 2-D then compiles in about 10 s
instead of 13.4 s, measured). benchmarks/run.py measures each of these.

The paper's algorithm (finite differences of nested solves) is implemented by
:func:`finite_difference_ell1` as a baseline.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from hbar.derivatives import divergence, jet_tensors, taylor_tensors
from hbar.ode import ODEOptions, solve_ode
from hbar.probability_flow import pf_log_likelihood
from hbar.process import HProcess

__all__ = ["backward_characteristic", "finite_difference_ell1", "poly_grad", "poly_laplacian"]

# Taylor orders (K_0, K_1, K_2) carried for each WKB order
_ORDERS = {1: (2, 0), 2: (4, 2, 0)}


def _contract(c: Array, y: Array, times: int) -> Array:
    """Contract the last ``times`` axes of c (n, d, ..., d) with y (n, d)."""
    for _ in range(times):
        c = jnp.einsum("n...j,nj->n...", c, y)
    return c


def poly_grad(cs: list[Array], y: Array) -> Array:
    """grad P(y) = sum_{k>=1} c_k[., y, ..., y] / (k-1)!, shape (n, d)."""
    out = jnp.zeros_like(y)
    for k in range(1, len(cs)):
        out = out + _contract(cs[k], y, k - 1) / math.factorial(k - 1)
    return out


def poly_laplacian(cs: list[Array], y: Array) -> Array:
    """Lap P(y) = sum_{k>=2} tr_{12} c_k[., ., y, ..., y] / (k-2)!, shape (n,)."""
    out = jnp.zeros(y.shape[0], dtype=y.dtype)
    for k in range(2, len(cs)):
        tr = jnp.trace(cs[k], axis1=1, axis2=2)
        out = out + _contract(tr, y, k - 2) / math.factorial(k - 2)
    return out


def _score_div(score: Callable, z: Array, t: Array) -> tuple[Array, Array]:
    return divergence(lambda w: score(w, t), z)


# For d <= JET_MAX_DIM and Taylor order m >= JET_MIN_ORDER the score's derivative tensors at X
# come from Taylor-mode jets with polarization (C(d+m-1, m) jets of order m) instead of d^m
# nested jvps. Measured on the paper's MLP, d = 2, 200 points, one right-hand side:
# order 2 (m = 5): 34 ms with jets vs 278 ms nested; order 1 (m = 3): 15 ms vs 5.9 ms nested,
# so jets are used for order 2 only.
JET_MAX_DIM = 4
JET_MIN_ORDER = 4
# Above this dimension the first derivative layer of the source terms is reverse mode (one
# pullback per level instead of d jvps): the Hessian then costs d, not d^2, passes of the
# divergence. Below it all-forward is faster (measured 5.8 vs 44 ms in d = 2).
REVERSE_MIN_DIM = 4


def local_score(score: Callable, X: Array, t: Array, m: int) -> Callable[[Array], tuple[Array, Array]]:
    """Y -> (s(X + Y, t), div s(X + Y, t)), each exact to order m - 1 in Y at least.

    For d <= JET_MAX_DIM and m >= JET_MIN_ORDER the score is replaced by its Taylor polynomial
    of degree m around X,
    S(Y) = sum_k D^k s(X)[Y, ..., Y] / k!, whose tensors come from one batched jet call
    (:func:`hbar.derivatives.jet_tensors`); derivatives of S at Y = 0 up to order m (of div S
    up to m - 1) equal those of the score. Otherwise (or if jet has no rule for a primitive
    the score uses) the score itself is evaluated at X + Y and differentiated by nested jvps."""
    d = X.shape[1]
    if d > JET_MAX_DIM or m < JET_MIN_ORDER:
        return lambda Y: _score_div(score, X + Y, t)
    try:
        Ds = jet_tensors(lambda z: score(z, t), X, m)
    except (KeyError, NotImplementedError, TypeError):
        # jax.experimental.jet has no rule for some primitive the score uses (for example
        # triangular_solve in the analytic mixture score): use nested jvps instead
        return lambda Y: _score_div(score, X + Y, t)

    def S(Y):
        val = Ds[0]
        div = jnp.zeros(X.shape[0], X.dtype)
        for k in range(1, m + 1):
            val = val + _contract(Ds[k], Y, k) / math.factorial(k)
            part = _contract(Ds[k], Y, k - 1)  # (n, d_out, d)
            div = div + jnp.trace(part, axis1=1, axis2=2) / math.factorial(k - 1)
        return val, div

    return S


def _rhs(proc: HProcess, t: Array, X: Array, P: list[list[Array]]):
    """Time derivatives of (X, P_0, P_1[, P_2]) along the characteristic (see module doc).

    In terms of the process (docs/theory.md sections 5, 6): v0 = u_0 the velocity, w = du_h/dh
    its h-slope and D1 = d(h g^2/2)/dh the h-slope of the diffusion coefficient,

        F_0 = -div v0 - (v0(X+Y) - v0(X)) . grad P_0,
        R_1 = -div w - w . grad P_0 - D1 (Lap P_0 + |grad P_0|^2),
        R_2 = -w . grad P_1 - D1 (Lap P_1 + 2 grad P_0 . grad P_1).

    All source terms are stacked into one row-wise map Y -> (F_0, F_1[, R_2]) (n, L) so the
    score's derivatives are shared; its Taylor tensors up to K_0 give every update."""
    d = X.shape[1]
    levels = len(P)
    K0 = len(P[0]) - 1
    S = local_score(proc.score, X, t, K0 + 1)
    s0 = S(jnp.zeros_like(X))[0]
    v_at_X = proc.drift_given_score(X, s0, t, 0.0)
    D1 = 0.5 * proc.diffusion2(t, 1.0)

    def sources(Y):
        s, divs = S(Y)
        dv = proc.drift_given_score(X + Y, s, t, 0.0) - v_at_X
        div_v = proc.drift_given_score(d, divs, t, 0.0)  # the affine map also gives div v0
        w = proc.drift_h_slope_given_score(s, t)
        div_w = proc.drift_h_slope_given_score(divs, t)
        gp0 = poly_grad(P[0], Y)
        gp1 = poly_grad(P[1], Y)
        F0 = -div_v - jnp.sum(dv * gp0, -1)
        R1 = -div_w - jnp.sum(w * gp0, -1) - D1 * (poly_laplacian(P[0], Y) + jnp.sum(gp0**2, -1))
        F1 = -jnp.sum(dv * gp1, -1) + R1
        out = [F0, F1]
        if levels > 2:
            out.append(-jnp.sum(w * gp1, -1) - D1 * (poly_laplacian(P[1], Y) + 2 * jnp.sum(gp0 * gp1, -1)))
        return jnp.stack(out, axis=1)

    # each source only to the order its level carries (F1 of order 1 is needed at Y = 0 only):
    # no derivative is computed and thrown away
    Ks = [len(Pj) - 1 for Pj in P]
    tensors = taylor_tensors(sources, jnp.zeros_like(X), K0, reverse_first=d > REVERSE_MIN_DIM,
                             column_orders=Ks)
    dP = [[tensors[k][:, sum(1 for i in range(j) if Ks[i] >= k)] for k in range(Ks[j] + 1)]
          for j in range(levels)]
    return v_at_X, dP


# diffrax traces the vector field three times (first-same-as-last start, initial step size,
# step); a jitted right-hand side is traced once and its jaxpr reused
_JIT_RHS = True
_rhs_jit = eqx.filter_jit(_rhs)


def returned_part(state):
    """The part of the backward state (X, P) that the solve returns -- X and the values
    psi_j = c_{j,0} -- whose error controls the step size (``ODEOptions.error_on``); the
    Taylor tensors c_{j,k>=1} (G, H, ...) are auxiliary."""
    X, P = state
    return (X, [Pj[0] for Pj in P])


def backward_characteristic(proc: HProcess, x_T: Array, order: int, options: ODEOptions,
                            bound: Array | float | None = None) -> dict[str, Array]:
    """Backward solve from T to t_min of the characteristic and the Taylor data of
    psi0 (and psi1, psi2), starting from the forward solve's end points ``x_T`` (n, d).

    Returns dict(x (n, d) the characteristic at t_min (equals the data up to solver
    error), ell0 (n,) from the backward solve (a consistency check of the forward one),
    ell1 (n,), ell2 (n,) when order == 2, ok, evals, steps, rejected). The step size is
    controlled on X and the psi_j only (:func:`returned_part`) unless
    ``options.error_on == "all"``. The solve fails at once when the state turns non-finite
    or |X| exceeds ``bound`` (docs/theory.md section 14.1).
    """
    schedule = proc.schedule
    n, d = x_T.shape
    orders = _ORDERS[order]
    dtype = x_T.dtype
    s2 = schedule.prior_std ** 2
    p0 = [proc.prior_logp(x_T), proc.prior_score(x_T), jnp.broadcast_to(-jnp.eye(d, dtype=dtype) / s2, (n, d, d))]
    for k in range(3, orders[0] + 1):
        p0.append(jnp.zeros((n,) + (d,) * k, dtype=dtype))
    P = [p0] + [[jnp.zeros((n,) + (d,) * k, dtype=dtype) for k in range(K + 1)] for K in orders[1:]]

    def field(t, state):
        X, P_ = state
        if _JIT_RHS:
            return _rhs_jit(proc, t, X, P_)
        return _rhs(proc, t, X, P_)

    sol = solve_ode(field, (x_T, P), schedule.T, schedule.t_min, options, controlled=returned_part,
                    stage_loop="scan", bound=bound, bounded=lambda st: st[0])
    X, Pm = sol["y1"]
    out = dict(x=X, ell0=Pm[0][0], ell1=Pm[1][0], ok=sol["ok"], evals=sol["evals"],
               steps=sol["num_steps"], rejected=sol["num_rejected"])
    if order >= 2:
        out["ell2"] = Pm[2][0]
    return out


def finite_difference_ell1(proc: HProcess, x: Array, options: ODEOptions, inner_options: ODEOptions,
                           step: float = 0.01, bound: Array | float | None = None) -> dict[str, Array]:
    """The paper's first-order algorithm ("1st-logqSolver"), written from docs/theory.md section 5.

    Along the forward characteristic from t_min to T it carries a perturbation dx,

        d(dx)/dt = (dx . grad) v0 + w + D1 G,                     dx(t_min) = 0,
        ell1 = dx_T . grad log pi(x_T) + int [(dx . grad)(div v0) + div w + D1 tr H] dt,

    (w = du_h/dh = -(g^2/2) s, D1 = g^2/2), where G ~ grad ell0 and tr H ~ Lap ell0 at (x, t)
    come from central differences with step ``step`` of nested probability-flow likelihood
    solves from t to T: 2d + 1 inner solves per point and per outer right-hand-side
    evaluation. Returns dict(ell1 (n,), ok, evals) with evals the outer vector-field evaluations.
    """
    schedule = proc.schedule
    n, d = x.shape
    shifts = jnp.concatenate([jnp.zeros((1, d), x.dtype), step * jnp.eye(d, dtype=x.dtype),
                              -step * jnp.eye(d, dtype=x.dtype)])  # (2d+1, d)

    def field(t, state):
        X, dx, _ = state
        D1 = 0.5 * proc.diffusion2(t, 1.0)
        pts = (X[None, :, :] + shifts[:, None, :]).reshape(-1, d)
        inner = pf_log_likelihood(proc, pts, t, inner_options, bound=bound)
        ell = jnp.where(inner["ok"], inner["ell0"], jnp.nan).reshape(2 * d + 1, n)
        G = (ell[1:d + 1] - ell[d + 1:]).T / (2 * step)  # (n, d)
        lapH = jnp.sum(ell[1:d + 1] + ell[d + 1:] - 2 * ell[0][None], axis=0) / step**2

        def v_and_div(z):
            s, divs = _score_div(proc.score, z, t)
            return proc.drift_given_score(z, s, t, 0.0), proc.drift_given_score(d, divs, t, 0.0), s, divs

        (v, div_v, s, divs), (jv, jdiv, _, _) = jax.jvp(v_and_div, (X,), (dx,))
        ddx = jv + proc.drift_h_slope_given_score(s, t) + D1 * G
        dacc = jdiv + proc.drift_h_slope_given_score(divs, t) + D1 * lapH
        return (v, ddx, dacc)

    y0 = (x, jnp.zeros_like(x), jnp.zeros(n, x.dtype))
    sol = solve_ode(field, y0, schedule.t_min, schedule.T, options, bound=bound, bounded=lambda y: y[0])
    X_T, dx_T, acc = sol["y1"]
    ell1 = jnp.sum(dx_T * proc.prior_score(X_T), -1) + acc
    return dict(ell1=ell1, ok=sol["ok"], evals=sol["evals"])
