"""The h-sampler: marginals shared by every h with the exact score, weak order, direction, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbar
from hbar.metrics import w2_empirical
from hbar.process import HProcess
from hbar.sampling import sample


@pytest.fixture(scope="module")
def mixture():
    s = hbar.SimpleSchedule()
    sc = hbar.GaussianMixtureScore([1.0, 2.0], [[-1.0, 0.0], [1.0, 1.0]], [0.3, 0.4], s)
    return s, sc


@pytest.mark.parametrize("h", [0.0, pytest.param(0.5, marks=pytest.mark.slow), 1.0,
                               pytest.param(2.0, marks=pytest.mark.slow)])
def test_exact_score_samples_match_data_for_every_h(mixture, h):
    s, sc = mixture
    n = 4500
    res = sample(sc, s, jax.random.PRNGKey(1), n, h, steps=1000)
    assert res.n_failed == 0 and res.nfe == 1000
    # the model at t_min is the data diffused to t_min: moments of p_{t_min}
    ref = np.asarray(sc.sample_data(jax.random.PRNGKey(2), 200_000))
    a, s2 = float(s.alpha(s.t_min)), float(s.sigma2(s.t_min))
    mean_ref, cov_ref = a * ref.mean(0), a**2 * np.cov(ref.T) + s2 * np.eye(2)
    x = res.samples
    se_mean = np.sqrt(np.diag(cov_ref) / n)
    assert np.all(np.abs(x.mean(0) - mean_ref) < 5 * se_mean)
    se_cov = np.sqrt((cov_ref**2 + np.outer(np.diag(cov_ref), np.diag(cov_ref))) / n)
    assert np.all(np.abs(np.cov(x.T) - cov_ref) < 5 * se_cov)
    # exact-EMD W2 to fresh data no larger than data-to-data W2 plus a small margin
    fresh1 = np.asarray(sc.sample_data(jax.random.PRNGKey(3), 1500))
    # W2 between 1500-point samples of a two-component mixture fluctuates strongly (the
    # component fractions differ by ~1 % and that mass must cross ~2 units), so compare the
    # mean over three independent model chunks with the mean over three data-data pairs
    w_model = np.mean([w2_empirical(x[k * 1500:(k + 1) * 1500], fresh1) for k in range(3)])
    w_data = np.mean([w2_empirical(np.asarray(sc.sample_data(jax.random.PRNGKey(k), 1500)), fresh1)
                      for k in (4, 5, 6)])
    assert w_model <= w_data + 0.04, (w_model, w_data)


def _variance_error(method, steps, n=400_000):
    """|Var(samples) - Var(p_{t_min})| for 1-D Gaussian data with its exact score, h = 1."""
    s = hbar.OUSchedule(beta=1.0, t_min=1e-3, T=6.0)
    v0 = 0.2
    sc = hbar.gaussian_score(0.0, v0, s)
    res = sample(sc, s, jax.random.PRNGKey(steps), n, 1.0, steps=steps, method=method)
    exact_var = float(s.alpha(s.t_min)) ** 2 * v0 + float(s.sigma2(s.t_min))
    # p_T differs from pi: its variance alpha_T^2 v0 + sigma_T^2, propagated exactly
    return abs(res.samples.var() - exact_var) - 0.0, exact_var


def test_euler_maruyama_weak_order_one():
    errs = [_variance_error("euler", k)[0] for k in (24, 48, 96)]
    # Monte Carlo noise of the variance ~ var * sqrt(2/n) ~ 5e-4, far below these errors
    assert errs[0] > 10 * 5e-4
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert 1.6 < r1 < 2.6 and 1.5 < r2 < 2.8, errs


def test_stochastic_heun_weak_order_two():
    """Measured: errors 0.0208 (48 steps) and 0.0053 (96 steps) against Euler's 0.070 and 0.032."""
    e48, e96 = _variance_error("heun", 48)[0], _variance_error("heun", 96)[0]
    assert 3.0 < e48 / e96 < 5.5
    assert e48 < 0.5 * _variance_error("euler", 48)[0]


def test_adaptive_ode_matches_fine_euler_at_h0(mixture):
    s, sc = mixture
    xT = s.prior_sample(jax.random.PRNGKey(5), 64, 2)
    a = sample(sc, s, jax.random.PRNGKey(0), 64, 0.0, method="adaptive", x_T=xT,
               ode_options=hbar.ode.ODEOptions(rtol=1e-9, atol=1e-9))
    e = sample(sc, s, jax.random.PRNGKey(0), 64, 0.0, steps=4000, x_T=xT)
    np.testing.assert_allclose(a.samples, e.samples, atol=5e-3)
    assert a.nfe > 0


def test_direction_runs_from_T_to_tmin():
    """A drift that only depends on t: with f = 0 (VE) and score = c, the h = 0 sampler gives
    x(t_min) = x(T) + (1/2) c int_{t_min}^T g^2 dt = x_T + c (sigma^2(T) - sigma^2(t_min)) / 2."""
    s = hbar.VESchedule(sigma_min=0.1, sigma_max=2.0)
    c = 0.7
    score = lambda x, t: jnp.full_like(x, c)
    xT = jnp.zeros((3, 1))
    res = sample(score, s, jax.random.PRNGKey(0), 3, 0.0, steps=20000, x_T=xT)
    expect = 0.5 * c * (float(s.sigma2(s.T)) - float(s.sigma2(s.t_min)))
    np.testing.assert_allclose(res.samples, expect, rtol=1e-3)
    assert float(HProcess(s, score).drift(xT, 0.5, 1.0)[0, 0]) == pytest.approx(-float(s.g2(0.5)) * c)


def test_blowups_are_counted_not_dropped():
    s = hbar.SimpleSchedule()
    bad = lambda x, t: -1e3 * x**3  # explodes in the backward run
    with pytest.warns(UserWarning, match="blew up"):
        res = sample(bad, s, jax.random.PRNGKey(0), 50, 1.0, steps=50, d=2)
    assert res.n_failed > 0 and res.samples.shape == (50, 2)
    assert res.valid.sum() + res.n_failed == 50
    with pytest.warns(UserWarning, match="left the bound"):
        res = sample(lambda x, t: -x, s, jax.random.PRNGKey(0), 200, 1.0, steps=50, d=2, bound=2.0,
                     return_path=True)
    expect = int((np.abs(res.path) > 2.0).any(axis=(0, 2)).sum())
    assert 0 < expect < 200 and res.n_failed == expect
    np.testing.assert_array_equal(res.valid, ~(np.abs(res.path) > 2.0).any(axis=(0, 2)))


def test_bad_inputs(mixture):
    s, sc = mixture
    key = jax.random.PRNGKey(0)
    with pytest.raises(hbar.HbarInputError, match=">= 0"):
        sample(sc, s, key, 10, -0.1)
    with pytest.raises(hbar.HbarInputError, match="needs h = 0"):
        sample(sc, s, key, 10, 0.5, method="adaptive")
    with pytest.raises(hbar.HbarInputError, match="unknown sampling method"):
        sample(sc, s, key, 10, 0.5, method="rk4")
    with pytest.raises(hbar.HbarInputError, match="x_T"):
        sample(sc, s, key, 10, 0.5, x_T=np.zeros((3, 2)))
    with pytest.raises(hbar.HbarInputError, match="dimension"):
        sample(lambda x, t: -x, s, key, 10, 0.5)
    from hbar.sampling import time_grid

    with pytest.raises(hbar.HbarInputError, match="outside the schedule"):
        time_grid(s, 10, t_start=1.5)
    with pytest.raises(hbar.HbarInputError, match="t_start != t_end"):
        time_grid(s, 10, t_start=0.5, t_end=0.5)


# --- time-dependent h(t) and diffrax SDE solvers (issue: sampler knobs of the ecosystem) -----------

def _mixture_cdf_at_tmin(w, mu, sd, sch):
    from scipy.stats import norm

    a, s2 = float(sch.alpha(sch.t_min)), float(sch.sigma2(sch.t_min))
    w, mu, sd = map(np.asarray, (w, mu, sd))
    scale = np.sqrt(a**2 * sd**2 + s2)
    return lambda x: np.sum(w[None] * norm.cdf((np.asarray(x)[:, None] - a * mu[None]) / scale[None]), axis=1)


@pytest.mark.parametrize("method,kw", [("heun", {}), pytest.param("sde", {}, marks=pytest.mark.slow)],  # budget
                         ids=["scan-heun", "diffrax-shark-adaptive"])
def test_h_of_t_sampler_has_exact_marginals(method, kw):
    """With the exact mixture score every h(t) >= 0 leaves the marginals exact: a windowed
    h(t) (EDM-style churn) sampled by the scan and by diffrax matches p_{t_min} (KS test)."""
    from scipy.stats import kstest

    from hbar.sampling import h_window

    sch = hbar.SimpleSchedule()
    w, mu, sd = [0.4, 0.6], [[-1.0], [1.0]], [0.3, 0.4]
    exact = hbar.GaussianMixtureScore(w, mu, sd, sch)
    hw = h_window(3.0, 0.2, 0.7, h_out=0.2)
    n = 2000 if method == "heun" else 400  # diffrax's virtual Brownian tree is the slow part
    res = hbar.sample(exact, sch, jax.random.PRNGKey(3), n=n, h=hw, steps=100, method=method, **kw)
    assert res.n_failed == 0 and res.nfe > 0
    cdf = _mixture_cdf_at_tmin(w, [m[0] for m in mu], sd, sch)
    p = kstest(res.samples[:, 0], cdf).pvalue
    assert p > 1e-3, p


def test_h_of_t_goes_through_hprocess(monkeypatch):
    """The drift takes h(t) from the sampler: an HProcess that ignores h (drift of h = 0 with
    noise h(t)) gives wrong marginals, so the test above would catch a second drift formula."""
    from scipy.stats import kstest

    from hbar.process import HProcess
    from hbar.sampling import h_window

    orig = HProcess.drift
    monkeypatch.setattr(HProcess, "drift", lambda self, x, t, h: orig(self, x, t, 0.0 * h))
    sch = hbar.SimpleSchedule()
    w, mu, sd = [0.4, 0.6], [[-1.0], [1.0]], [0.3, 0.4]
    exact = hbar.GaussianMixtureScore(w, mu, sd, sch)
    # n differs from the test above: a new shape compiles afresh with the patched drift
    res = hbar.sample(exact, sch, jax.random.PRNGKey(3), n=1500, h=h_window(3.0, 0.2, 0.7, h_out=0.2), steps=100,
                      method="heun")
    assert kstest(res.samples[:, 0], _mixture_cdf_at_tmin(w, [m[0] for m in mu], sd, sch)).pvalue < 1e-3


def test_h_of_t_and_sde_options_errors():
    from hbar.sampling import SDEOptions, h_window

    sch = hbar.SimpleSchedule()
    score = hbar.GaussianMixtureScore([1.0], [[0.0]], [0.5], sch)
    with pytest.raises(hbar.HbarInputError, match="h\\(t\\)"):
        hbar.sample(score, sch, jax.random.PRNGKey(0), n=4, h=lambda t: -t, steps=5)
    with pytest.raises(hbar.HbarInputError, match="SDE solver"):
        hbar.sample(score, sch, jax.random.PRNGKey(0), n=4, h=1.0, method="sde", sde_options=SDEOptions(solver="x"))
    with pytest.raises(hbar.HbarInputError, match="t_lo <= t_hi"):
        h_window(1.0, 0.5, 0.2)


# --- reliability (issue 15; docs/theory.md sections 14.1-14.2) ------------------------------------

@pytest.mark.parametrize("method", ["euler", "heun", pytest.param("sde", marks=pytest.mark.slow)])
def test_default_bound_flags_blowups_without_an_explicit_bound(method):
    """h = 1e6 (audit: samples of size 9e57 with n_failed = 0) and a score that explodes for
    x > 1 are flagged by the default bound 100 (prior_std + 1), every trajectory ended there."""
    s = hbar.SimpleSchedule()
    sc = hbar.gaussian_score(np.zeros(2), np.eye(2), s)
    steps = 40
    with pytest.warns(UserWarning, match="blew up"):
        res = sample(sc, s, jax.random.PRNGKey(0), 16, 1e6, steps=steps, method=method)
    assert res.n_failed == 16 and not res.valid.any()
    explode = lambda x, t: jnp.where(x > 1.0, jnp.exp(30.0 * x), -x)
    with pytest.warns(UserWarning, match="blew up"):
        res = sample(explode, s, jax.random.PRNGKey(1), 16, 1.0, steps=steps, method=method, d=2)
    assert res.n_failed > 0
    assert np.all(np.abs(res.valid_samples) <= 200.0)
    if method != "sde":  # fixed steps: a failed row is frozen at its first state beyond the bound
        np.testing.assert_array_equal(res.valid, np.all(np.abs(res.samples) <= 200.0, axis=1))
    # (adaptive "sde": the huge drift also collapses the step size -> solver failure, state in bound)


def test_nan_score_ends_a_trajectory_at_once():
    """Fixed-step methods freeze a failing row at its first non-finite state; the other rows
    are not affected (same values as with a clean score)."""
    s = hbar.SimpleSchedule()
    sc = hbar.gaussian_score(np.zeros(2), np.eye(2), s)
    bad = lambda x, t: jnp.where(x[:, :1] > 1.5, jnp.nan, sc(x, t))
    clean = sample(sc, s, jax.random.PRNGKey(3), 32, 0.5, steps=30, method="heun")
    with pytest.warns(UserWarning, match="blew up"):
        res = sample(bad, s, jax.random.PRNGKey(3), 32, 0.5, steps=30, method="heun", d=2, return_path=True)
    assert 0 < res.n_failed < 32
    np.testing.assert_array_equal(res.samples[res.valid], clean.samples[res.valid])
    for i in np.nonzero(~res.valid)[0]:  # once non-finite, the row stays at that state
        first = int(np.argmax(~np.all(np.isfinite(res.path[:, i]), axis=1)))
        assert first > 0
        np.testing.assert_array_equal(res.path[first:, i], np.broadcast_to(res.path[first, i], res.path[first:, i].shape))


@pytest.mark.parametrize("method", ["euler", "heun", "adaptive", pytest.param("sde", marks=pytest.mark.slow)])
def test_samples_do_not_depend_on_batch_size(method):
    """Point i's noise is drawn from fold_in(key, i) and its adaptive steps are its own, so the
    batch size changes nothing (fixed-step and ODE methods to rounding, the adaptive SDE to its
    tolerance: a rounding-level change may move one accepted step)."""
    s = hbar.SimpleSchedule()
    sc = hbar.gaussian_score(np.zeros(2), np.eye(2), s, scale_eps=0.2)
    h = 0.0 if method == "adaptive" else 0.5
    a = sample(sc, s, jax.random.PRNGKey(7), 10, h, steps=30, method=method)
    b = sample(sc, s, jax.random.PRNGKey(7), 10, h, steps=30, method=method, batch_size=3)
    tol = 1e-2 if method == "sde" else 1e-5
    np.testing.assert_allclose(a.samples, b.samples, rtol=tol, atol=tol)
    assert not np.allclose(a.samples[0], a.samples[1])  # the points' noises differ


def test_reliability_input_errors(mixture):
    s, sc = mixture
    key = jax.random.PRNGKey(0)
    with pytest.raises(hbar.HbarInputError, match="h must be a number"):
        sample(sc, s, key, 4, [0.1, 0.9])
    with pytest.raises(hbar.HbarInputError, match="h must be a number"):
        sample(sc, s, key, 4, np.array([0.5]))
    for b in (0.0, -2.0, float("nan")):
        with pytest.raises(hbar.HbarInputError, match="bound must be"):
            sample(sc, s, key, 4, 0.5, bound=b)
    with pytest.raises(hbar.HbarInputError, match=r"\(2, 2\) to \(2, 2\), got \(2, 1\)"):
        sample(lambda x, t: -x[:, :1], s, key, 4, 0.5, d=2)
    with pytest.raises(hbar.HbarInputError, match="score is for d = 2"):
        sample(sc, s, key, 4, 0.5, d=3)
