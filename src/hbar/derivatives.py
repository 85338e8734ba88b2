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
    """All derivative tensors of a row-wise map phi: (n, d) -> (n, ...) at x, up to ``order``.

    Returns [phi (n, ...), D phi (n, ..., d), D^2 phi (n, ..., d, d), ...] (order + 1
    entries). Every order is one layer of forward-mode basis-vector jvps (the primal of each
    layer is computed once, not per direction), so the k-th tensor costs d^k directional
    passes. Forward-over-forward was measured 6-8x faster here than forward-over-reverse
    for third derivatives of a 3 x 128 MLP on CPU.
    """
    fn: Callable[[Array], tuple] = lambda y: (phi(y),)
    for _ in range(order):
        fn = _add_order(fn)
    return list(fn(x))


def _add_order(fn: Callable[[Array], tuple]) -> Callable[[Array], tuple]:
    """Given y -> (T0, ..., Tk), return y -> (T0, ..., Tk, T_{k+1}) with T_{k+1} the
    row-wise derivative of Tk (new last axis)."""

    def new(y):
        def one(e):
            return jax.jvp(fn, (y,), (e,))

        prim, tang = jax.vmap(one, out_axes=(None, 0))(_basis(y))
        return (*prim, jnp.moveaxis(tang[-1], 0, -1))

    return new
