"""Batched derivative routines against per-point jax.jacfwd / jax.hessian."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.derivatives import divergence, divergence_hutchinson, jacobian_rows, jet_tensors, taylor_tensors


def field(x):
    """A row-wise nonlinear map (n, d) -> (n, d) with all derivatives nonzero."""
    w = jnp.arange(1.0, 1.0 + x.shape[1] ** 2).reshape(x.shape[1], x.shape[1]) / 7.0
    return jnp.tanh(x @ w) * jnp.sin(x) + x**3 / 5


def test_jacobian_and_divergence():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    val, J = jacobian_rows(field, x)
    ref = jnp.stack([jax.jacfwd(lambda z: field(z[None])[0])(xi) for xi in x])
    np.testing.assert_allclose(J, ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(divergence(field, x)[1], jnp.trace(ref, axis1=1, axis2=2), rtol=1e-12)
    np.testing.assert_allclose(val, field(x))


def test_hutchinson_is_unbiased():
    x = jnp.tile(jax.random.normal(jax.random.PRNGKey(1), (1, 4)), (20000, 1))
    probe = jax.random.rademacher(jax.random.PRNGKey(2), x.shape, dtype=x.dtype)
    est = divergence_hutchinson(field, x, probe)[1]
    exact = divergence(field, x[:1])[1][0]
    assert abs(float(est.mean()) - float(exact)) < 4 * float(est.std()) / np.sqrt(est.size)


def test_taylor_tensors_match_hessian_and_third_derivative():
    x = jax.random.normal(jax.random.PRNGKey(3), (4, 2))
    phi = lambda z: jnp.sum(field(z) ** 2, axis=1) + jnp.prod(z, axis=1)
    T = taylor_tensors(phi, x, 3)
    one = lambda z: phi(z[None])[0]
    for i in range(x.shape[0]):
        np.testing.assert_allclose(T[1][i], jax.grad(one)(x[i]), rtol=1e-11)
        np.testing.assert_allclose(T[2][i], jax.hessian(one)(x[i]), rtol=1e-11)
        np.testing.assert_allclose(T[3][i], jax.jacfwd(jax.hessian(one))(x[i]), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("d,m", [pytest.param(1, 5, marks=pytest.mark.slow), (2, 3), (2, 5), (3, 2)])  # budget
def test_jet_polarization_equals_nested_jvps(d, m):
    x = jax.random.normal(jax.random.PRNGKey(4), (3, d))
    J = jet_tensors(field, x, m)
    for i in range(d):
        ref = taylor_tensors(lambda z, i=i: field(z)[:, i], x, m)
        for k in range(m + 1):
            np.testing.assert_allclose(J[k][:, i], ref[k], rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("reverse_first", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_taylor_tensors_column_orders_keep_only_the_wanted_derivatives(reverse_first):
    """column_orders=[3, 1, 0, 2]: the k-th tensor holds exactly the columns with K_j >= k, equal
    to the full computation's (no derivative beyond a column's order is returned)."""
    x = jax.random.normal(jax.random.PRNGKey(5), (3, 3))
    phi = lambda z: field(z) ** 2 + jnp.sum(z, axis=1, keepdims=True) * field(z)[:, ::-1]  # (n, 3)
    phi4 = lambda z: jnp.concatenate([phi(z), jnp.prod(z, axis=1, keepdims=True)], axis=1)  # (n, 4)
    orders = [3, 1, 0, 2]
    full = taylor_tensors(phi4, x, 3, reverse_first=reverse_first)
    part = taylor_tensors(phi4, x, 3, reverse_first=reverse_first, column_orders=orders)
    assert len(part) == 4
    for k in range(4):
        cols = [j for j, K in enumerate(orders) if K >= k]
        assert part[k].shape == (3, len(cols)) + (3,) * k
        np.testing.assert_allclose(part[k], full[k][:, cols], rtol=1e-12, atol=1e-12)
