"""Batched derivatives of row-wise functions: the one divergence routine of hbar.

All functions here act on *row-wise* maps F: (n, d) -> (n, ...) whose row i depends only
on row i of the input (a score network applied to a batch is such a map). Per-row
derivatives are then obtained in batched form, without vmapping nested Jacobians over
points (which is several times slower on CPU):

* Jacobian columns J[:, :, j] = jvp(F, x, e_j) for the d basis vectors e_j;
* gradients of scalar row functions phi: (n, d) -> (n,) as grad of sum_i phi_i;
* higher derivative tensors by jvps of those with basis vectors again.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import Array

__all__ = ["jacobian_rows", "divergence", "divergence_hutchinson", "taylor_tensors"]


def _basis(x: Array) -> Array:
    """(d, n, d): the d basis directions, each broadcast over the n rows of x."""
    n, d = x.shape
    return jnp.broadcast_to(jnp.eye(d, dtype=x.dtype)[:, None, :], (d, n, d))


def jacobian_rows(F: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
    """Row-wise Jacobian of F: (n, d) -> (n, m). Returns (F(x) (n, m), J (n, m, d))."""
    def col(e):
        return jax.jvp(F, (x,), (e,))

    value, cols = jax.vmap(col, out_axes=(None, 0))(_basis(x))  # cols (d, n, m)
    return value, jnp.moveaxis(cols, 0, -1)


def divergence(F: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
    """Exact divergence of F: (n, d) -> (n, d) per row, with d jvps.
    Returns (F(x) (n, d), div F (n,))."""
    value, J = jacobian_rows(F, x)
    return value, jnp.trace(J, axis1=-2, axis2=-1)


def divergence_hutchinson(F: Callable[[Array], Array], x: Array, probe: Array) -> tuple[Array, Array]:
    """Hutchinson–Skilling estimate eps^T (dF/dx) eps per row, one jvp.
    ``probe``: (n, d) with E[eps eps^T] = I (Rademacher or Gaussian).
    Returns (F(x) (n, d), estimate (n,)), unbiased for the divergence."""
    value, jv = jax.jvp(F, (x,), (probe,))
    return value, jnp.sum(probe * jv, axis=-1)


def taylor_tensors(phi: Callable[[Array], Array], x: Array, order: int) -> list[Array]:
    """All derivative tensors of a row-wise scalar map phi: (n, d) -> (n,) at x, up to ``order``.

    Returns [phi (n,), grad (n, d), Hessian (n, d, d), third (n, d, d, d), ...] (order + 1
    entries). The gradient is reverse-mode of sum_i phi_i; every further order is one layer
    of basis-vector jvps, so the k-th tensor costs d^(k-1) directional passes.
    """
    if order == 0:
        return [phi(x)]

    def grad_with_value(y):
        val, pullback = jax.vjp(phi, y)
        return (val, pullback(jnp.ones_like(val))[0])

    fn: Callable[[Array], tuple] = grad_with_value
    for _ in range(order - 1):
        fn = _add_order(fn, x)
    return list(fn(x))


def _add_order(fn: Callable[[Array], tuple], x: Array) -> Callable[[Array], tuple]:
    """Given y -> (T0, ..., Tk), return y -> (T0, ..., Tk, T_{k+1}) with T_{k+1} the
    row-wise derivative of Tk (last axis appended)."""

    def new(y):
        def one(e):
            return jax.jvp(fn, (y,), (e,))

        prim, tang = jax.vmap(one, out_axes=(None, 0))(_basis(y))
        return (*prim, jnp.moveaxis(tang[-1], 0, -1))

    return new
