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


@pytest.mark.parametrize("d,m", [(1, 5), (2, 3), (2, 5), (3, 2)])
def test_jet_polarization_equals_nested_jvps(d, m):
    x = jax.random.normal(jax.random.PRNGKey(4), (3, d))
    J = jet_tensors(field, x, m)
    for i in range(d):
        ref = taylor_tensors(lambda z, i=i: field(z)[:, i], x, m)
        for k in range(m + 1):
            np.testing.assert_allclose(J[k][:, i], ref[k], rtol=1e-9, atol=1e-10)
