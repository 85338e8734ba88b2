"""h = 0 likelihood: closed forms in any dimension, direction of integration, Hutchinson, failures."""

import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hbar
from _cases import gaussian_case
from hbar.likelihood import bits_per_dim, nll
from hbar.ode import ODEOptions, solve_ode
from hbar.probability_flow import velocity_field
from hbar.process import HProcess
from hbar.references import gaussian_oracle

TIGHT = ODEOptions(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [1, 3, 16])
def test_nll0_matches_closed_form_with_wrong_score(d):
    """Order 0 alone (no backward solve); the WKB tests check C1 and C2 on the same cases."""
    s, score, m0, S0, x = gaussian_case(d, eps=0.15)
    res = nll(score, s, x, options=TIGHT)
    ref = gaussian_oracle(score, s, m0, S0, 0.0, x=x)
    np.testing.assert_allclose(res.nll0, ref.nll_points[0], rtol=1e-6)
    assert res.n_failed == 0 and res.valid.all() and res.c1 is None


def test_exact_score_gives_the_diffused_data_density():
    """With the exact mixture score the flow maps p_{t_min} onto p_T, so
    log q^0_{t_min}(x) = log p_{t_min}(x) + log pi(x_T) - log p_T(x_T) exactly."""
    s = hbar.OUSchedule(beta=1.0, t_min=1e-2, T=5.0)
    sc = hbar.GaussianMixtureScore([0.4, 0.6], [[-1.0, 0.5], [1.0, -0.5]], [0.3, 0.5], s)
    x = np.asarray(sc.sample_data(jax.random.PRNGKey(0), 20))
    res = nll(sc, s, x, options=TIGHT)
    xT = jnp.asarray(res.extras["x_T"])
    expect = -np.asarray(sc.log_density(jnp.asarray(x), s.t_min) + s.prior_logp(xT) - sc.log_density(xT, s.T))
    np.testing.assert_allclose(res.nll0, expect, rtol=1e-7)
    assert np.abs(np.asarray(s.prior_logp(xT) - sc.log_density(xT, s.T))).max() > 1e-3  # mismatch is real


def test_integration_direction_matters():
    """A data point sits at t_min and is pushed towards noise (t_min -> T). Integrating the same
    flow the other way (the point taken as x_T, solved T -> t_min) is a real solve of the same
    length with a different, wrong answer; ours equals the closed form."""
    s, score, m0, S0, x = gaussian_case(1, eps=0.3)
    res = nll(score, s, x, options=TIGHT)
    ref = gaussian_oracle(score, s, m0, S0, 0.0, x=x).nll_points[0]
    np.testing.assert_allclose(res.nll0, ref, rtol=1e-7)
    with jax.enable_x64(True):
        proc = HProcess(s, score)
        xj = jnp.asarray(x, dtype=jnp.float64)
        sol = solve_ode(velocity_field(proc), (xj, jnp.zeros(x.shape[0])), s.T, s.t_min, TIGHT)
        wrong = -np.asarray(s.prior_logp(xj) - sol["y1"][1])
    assert bool(sol["ok"]) and int(sol["evals"]) > 20  # a genuine solve over [t_min, T]
    assert np.all(np.abs(wrong - ref) > 1e-2)


def test_hutchinson_is_unbiased_in_d16():
    s, score, m0, S0, x = gaussian_case(16, eps=0.2, seed=3)
    xs = np.repeat(x[:1], 400, axis=0)
    opts = ODEOptions(rtol=1e-7, atol=1e-7)
    hut = nll(score, s, xs, divergence="hutchinson", key=jax.random.PRNGKey(1), options=opts, batch_size=400)
    exact = nll(score, s, x[:1], options=TIGHT).nll0[0]
    mean, se = hut.nll0_mean
    assert se > 1e-3  # the estimator really is noisy ...
    assert abs(mean - exact) < 4 * se  # ... and unbiased


def test_bits_per_dim_convention():
    # uniform density on [0,1]^d has NLL 0 nats; 8-bit data then costs exactly 8 bits/dim
    assert bits_per_dim(0.0, d=10) == pytest.approx(8.0)
    assert bits_per_dim(0.0, d=10, data_range=(-1.0, 1.0)) == pytest.approx(7.0)
    with pytest.raises(hbar.HbarInputError):
        bits_per_dim(0.0, d=2, levels=1)


def test_failed_trajectories_are_flagged_not_dropped():
    s = hbar.SimpleSchedule()
    score = lambda x, t: jnp.where(x[:, :1] > 1.0, jnp.nan, -x)  # NaN for some points
    x = np.array([[0.0, 0.0], [2.0, 0.0], [0.5, 0.1]])
    with pytest.warns(UserWarning, match="1 of 3 trajectories failed"):
        res = nll(score, s, x)
    assert res.n_failed == 1 and list(res.valid) == [True, False, True]
    assert np.isfinite(res.nll0_mean[0])
    # s = -x is the exact score of N(0, I) data under this VP schedule, whose prior is N(0, I):
    # the flow is the identity (v0 = f x + g^2 x / 2 = 0), so x_T = x and exactly the two
    # points outside [-0.1, 0.1]^2 leave the bound
    with pytest.warns(UserWarning, match="2 of 3 trajectories failed"):
        bounded = nll(lambda x, t: -x, s, x, bound=0.1)
    np.testing.assert_allclose(bounded.extras["x_T"], x, atol=1e-9)
    assert bounded.n_failed == 2 and list(bounded.valid) == [True, False, False]


def test_bad_inputs():
    s = hbar.SimpleSchedule()
    score = lambda x, t: -x
    with pytest.raises(hbar.HbarInputError, match="NaN"):
        nll(score, s, np.array([[0.0, np.nan]]))
    with pytest.raises(hbar.HbarInputError, match="shape"):
        nll(score, s, np.zeros((2, 2, 2)))
    with pytest.raises(hbar.HbarInputError, match="order"):
        nll(score, s, np.zeros((2, 2)), order=3)
    with pytest.raises(hbar.HbarInputError, match="key"):
        nll(score, s, np.zeros((2, 2)), divergence="hutchinson")
    with pytest.raises(hbar.HbarInputError, match=">= 0"):
        nll(score, s, np.zeros((2, 2)), order=1).nll(-1.0)


def test_likelihoods_are_float64_when_the_caller_runs_float32():
    """The caller's JAX default is float32 (conftest turns x64 on for the other tests, so switch
    it off here): a float32 network's NLL0 is still computed in float64, equals the value of a
    float64 session, and the caller's setting is left as it was."""
    s = hbar.SimpleSchedule()
    x = np.array([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]])
    with jax.enable_x64(False):
        net = hbar.networks.PaperMLP(2, width=16, depth=2, key=0, dtype="float32")
        res32 = nll(net, s, x, options=ODEOptions(rtol=1e-8, atol=1e-8))
        assert jnp.zeros(1).dtype == jnp.float32  # the caller's mode is untouched
        smp = hbar.sample(net, s, jax.random.PRNGKey(0), n=4, h=0.5, steps=20)
    assert res32.nll0.dtype == np.float64 and np.isfinite(res32.nll0).all()
    assert smp.samples.dtype == np.float32  # sampling follows the caller's precision
    res64 = nll(net, s, x, options=ODEOptions(rtol=1e-8, atol=1e-8))
    np.testing.assert_allclose(res32.nll0, res64.nll0, rtol=1e-12)


# --- reliability (issue 15; docs/theory.md sections 14.1-14.3) -----------------------------------

class _NaNAbove(eqx.Module):
    """A wrong affine score that returns NaN wherever x_0 > 1 (some trajectories only)."""

    base: object
    dim: int = 2

    def __call__(self, x, t):
        return jnp.where(x[:, :1] > 1.0, jnp.nan, self.base(x, t))


def _nan_case():
    s = hbar.SimpleSchedule()
    base = hbar.gaussian_score(np.zeros(2), 0.5 * np.eye(2), s, scale_eps=0.1)
    x = np.array([[0.0, 0.0], [0.95, 0.2], [1.5, 0.0], [-0.7, 0.4], [0.3, -1.2], [1.2, 1.0]])
    return s, base, _NaNAbove(base), x


# rows 2 and 5 start at x_0 > 1, row 1 drifts past x_0 = 1 on its way to T
NAN_CASE_VALID = np.array([True, False, False, True, True, False])


def test_nan_score_fails_fast_and_flags_only_its_trajectories():
    """A NaN score ends a trajectory after a few dozen evaluations (not max_steps = 20000 steps),
    and only that trajectory: the others keep their clean values (order 1, NLL0 and C1)."""
    s, base, bad, x = _nan_case()
    clean = nll(base, s, x, order=1)
    with pytest.warns(UserWarning, match="3 of 6 trajectories failed"):
        res = nll(bad, s, x, order=1)
    np.testing.assert_array_equal(res.valid, NAN_CASE_VALID)
    assert res.extras["failures"]["solver"] + res.extras["failures"]["non-finite"] == 3
    per_point = res.extras["evals_forward_per_point"]
    assert np.all(per_point[~res.valid] < 1000), per_point  # max_steps would be 120 000 evaluations
    assert res.evals_forward < 2000
    ok = res.valid
    np.testing.assert_allclose(res.nll0[ok], clean.nll0[ok], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(res.c1[ok], clean.c1[ok], rtol=1e-3, atol=1e-3)
    assert np.isfinite(res.nll0_mean[0]) and np.isfinite(res.c1_mean[0])


@settings(max_examples=4, deadline=None)
@given(bs=st.sampled_from([1, 4]), batching=st.sampled_from(["batch", "per-point"]))
def test_a_points_nll_does_not_depend_on_its_batch(bs, batching):
    """Property: whatever the batch split and whichever neighbours fail (NaN score), a valid point's
    NLL0 equals its clean single-batch value to the solver tolerance ("per-point": to rounding)
    and the failed points are the same."""
    s, base, bad, x = _nan_case()
    opts = ODEOptions(rtol=1e-7, atol=1e-7)
    ref = nll(base, s, x, options=opts, batch_size=6, batching="per-point")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = nll(bad, s, x, options=opts, batch_size=bs, batching=batching)
    np.testing.assert_array_equal(res.valid, NAN_CASE_VALID)
    tol = 1e-10 if batching == "per-point" else 1e-5
    np.testing.assert_allclose(res.nll0[res.valid], ref.nll0[res.valid], rtol=tol, atol=tol)


def test_default_bound_flags_a_score_that_explodes():
    """s = -x - 50 x makes the flow dx/dt = 25 g^2 x: x_T ~ x e^{25 int g^2} is huge but finite.
    The default bound 100 (prior_std + max|x|) flags it; bound=inf keeps only the finite check."""
    s = hbar.SimpleSchedule()
    score = lambda x, t: -51.0 * x
    x = np.array([[0.0, 0.0], [0.3, 0.1]])
    with pytest.warns(UserWarning, match="out of bound"):
        res = nll(score, s, x)
    assert list(res.valid) == [True, False] and res.extras["bound"] == pytest.approx(100 * (1 + 0.3))
    assert res.extras["failures"]["out of bound"] == 1
    assert np.isfinite(res.nll0_mean[0])
    unbounded = nll(score, s, x, bound=math.inf)
    assert unbounded.n_failed == 0 and np.max(np.abs(unbounded.extras["x_T"])) > 1e3


def test_reliability_input_errors():
    s = hbar.SimpleSchedule()
    score = hbar.gaussian_score(np.zeros(2), np.eye(2), s)
    x = np.zeros((3, 2))
    for b in (0.0, -1.0, float("nan"), "big"):
        with pytest.raises(hbar.HbarInputError, match="bound must be"):
            nll(score, s, x, bound=b)
    with pytest.raises(hbar.HbarInputError, match="fd_step"):
        nll(score, s, x, order=1, method="finite-difference", fd_step=0)
    with pytest.raises(hbar.HbarInputError, match=r"dimension 1 .*d = 2.*1-D"):
        nll(score, s, np.zeros(3))
    with pytest.raises(hbar.HbarInputError, match=r"\(2, 2\) to \(2, 2\), got \(2, 1\)"):
        nll(lambda x, t: -x[:, :1], s, x)
    with pytest.raises(hbar.HbarInputError, match="shape"):
        nll(lambda x, t: -x @ jnp.ones((3, 3)), s, x)
    with pytest.raises(hbar.HbarInputError, match="rtol must be finite"):
        nll(score, s, x, options=ODEOptions(rtol=float("inf")))
