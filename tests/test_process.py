"""The h-family object: drift, velocity, h-slope, forward drift (Nelson), affine and divergence use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hbar
from hbar.derivatives import divergence
from hbar.process import HProcess

SCHEDULES = [hbar.SimpleSchedule(), hbar.CosineSchedule(), hbar.OUSchedule(beta=1.3), hbar.VESchedule()]


def _score(x, t):
    return -x / (0.5 + t) + jnp.sin(x)


@settings(max_examples=40, deadline=None)
@given(h=st.floats(0.0, 5.0), t=st.floats(0.05, 0.95), k=st.sampled_from(range(len(SCHEDULES))),
       seed=st.integers(0, 2**16))
def test_drift_is_the_h_family_formula_and_affine_in_h(h, t, k, seed):
    sch = SCHEDULES[k]
    t = sch.t_min + t * (sch.T - sch.t_min)
    proc = HProcess(sch, _score)
    x = jax.random.normal(jax.random.PRNGKey(seed), (4, 3))
    s = _score(x, t)
    f, g2 = float(sch.f(t)), float(sch.g2(t))
    np.testing.assert_allclose(proc.drift(x, t, h), f * x - 0.5 * (1 + h) * g2 * s, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(proc.velocity(x, t), f * x - 0.5 * g2 * s, rtol=1e-12, atol=1e-12)
    # u_h = v0 + h du/dh, and du/dh is the derivative of the drift in h (jvp)
    slope = proc.drift_h_slope_given_score(s, t)
    _, dudh = jax.jvp(lambda hh: proc.drift(x, t, hh), (jnp.asarray(h),), (jnp.asarray(1.0),))
    np.testing.assert_allclose(slope, dudh, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(proc.drift(x, t, h), proc.velocity(x, t) + h * slope, rtol=1e-11, atol=1e-11)
    # Nelson: forward minus backward drift = squared diffusion times the score
    np.testing.assert_allclose(proc.forward_drift(x, t, h) - proc.drift(x, t, h), h * g2 * s, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(proc.diffusion2(t, h), h * g2, rtol=1e-13, atol=1e-300)


def test_affine_map_gives_linear_drift_and_divergence():
    """For s = A x + b: u_h = K x - k with K = drift_given_score(I, A), -k = drift_given_score(0, b),
    and div u_h = drift_given_score(d, div s) equals the trace of K."""
    sch = hbar.SimpleSchedule()
    proc = HProcess(sch, None)
    rng = np.random.default_rng(0)
    A, b = jnp.asarray(rng.normal(size=(3, 3))), jnp.asarray(rng.normal(size=3))
    x = jnp.asarray(rng.normal(size=(5, 3)))
    t, h = 0.3, 0.7
    K = proc.drift_given_score(jnp.eye(3), A, t, h)
    k = -proc.drift_given_score(jnp.zeros(3), b, t, h)
    affine = HProcess(sch, lambda z, tt: z @ A.T + b)
    np.testing.assert_allclose(affine.drift(x, t, h), x @ K.T - k, rtol=1e-12)
    _, div = divergence(lambda z: affine.drift(z, t, h), x)
    np.testing.assert_allclose(div, proc.drift_given_score(3, jnp.trace(A), t, h) * np.ones(5), rtol=1e-12)
    np.testing.assert_allclose(div, jnp.trace(K), rtol=1e-12)


def test_noising_process_needs_no_score_but_other_h_do():
    sch = hbar.SimpleSchedule()
    x = jnp.ones((2, 2))
    np.testing.assert_allclose(HProcess(sch).forward_drift(x, 0.5, 1.0), sch.f(0.5) * x)
    with pytest.raises(hbar.HbarInputError, match="needs a score"):
        HProcess(sch).forward_drift(x, 0.5, 0.5)
    with pytest.raises(hbar.HbarInputError, match="no score"):
        HProcess(sch).drift(x, 0.5, 1.0)
