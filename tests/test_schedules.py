"""Schedules: closed forms of alpha, sigma against numerical integration of f and g^2."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.integrate import quad

import hbar
from hbar.schedules import SCHEDULES, DDPMSchedule, EDMSchedule, LinearSchedule, schedule_from_config

SMOOTH = [hbar.SimpleSchedule(), hbar.CosineSchedule(), hbar.VPLinearSchedule(), hbar.VESchedule(),
          hbar.OUSchedule(beta=2.0, T=5.0), EDMSchedule()]
ALL = SMOOTH + [DDPMSchedule(beta_start=0.05, beta_end=0.3, n_steps=8)]  # closed forms: quadrature below is SMOOTH only


def numerical_alpha_sigma2(s, t):
    """alpha = exp(int_0^t f), sigma^2 = alpha^2 int_0^t g^2/alpha^2 by adaptive quadrature."""
    la = lambda u: quad(lambda r: float(s.f(r)), 0.0, u, epsabs=1e-14, epsrel=1e-13, limit=200)[0]
    log_alpha = la(t)
    integrand = lambda u: float(s.g2(u)) * math.exp(2.0 * (log_alpha - la(u)))
    s2 = quad(integrand, 0.0, t, epsabs=1e-14, epsrel=1e-12, limit=200)[0]
    return log_alpha, s2


@pytest.mark.parametrize("s", SMOOTH, ids=lambda s: s.name)
def test_closed_forms_match_quadrature(s):
    for t in np.linspace(s.t_min, s.T, 3):
        la, s2 = numerical_alpha_sigma2(s, float(t))
        assert abs(float(s.log_alpha(t)) - la) < 1e-8 * max(1.0, abs(la))
        assert abs(float(s.sigma2(t)) - s2) < 1e-8 * max(1.0, abs(s2))


@pytest.mark.parametrize("s", SMOOTH, ids=lambda s: s.name)
def test_user_linear_schedule_reproduces_closed_form(s):
    user = LinearSchedule(f_fn=s.f, g2_fn=s.g2, t_min=s.t_min, T=s.T, std_prior=s.prior_std)
    tt = np.linspace(s.t_min, s.T, 37)
    np.testing.assert_allclose(np.asarray(user.alpha(tt)), np.asarray(s.alpha(tt)), rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(np.asarray(user.sigma2(tt)), np.asarray(s.sigma2(tt)), rtol=1e-8, atol=1e-10)


def test_paper_schedules_are_exact():
    s = hbar.SimpleSchedule()
    assert (s.t_min, s.T) == (0.01, 1.0)
    assert float(s.alpha(1.0)) == pytest.approx(math.exp(-5.0))
    c = hbar.CosineSchedule()
    assert c.T == pytest.approx(1 - 1e-3)
    assert float(c.sigma2(0.5)) == pytest.approx(0.5)


def test_marginal_sample_moments():
    import jax

    s = hbar.SimpleSchedule()
    x0 = jnp.full((200_000, 1), 2.0)
    xt, _ = s.marginal_sample(jax.random.PRNGKey(0), x0, 0.3)
    assert float(xt.mean()) == pytest.approx(2.0 * float(s.alpha(0.3)), abs=9e-3)  # 5 standard errors
    assert float(xt.var()) == pytest.approx(float(s.sigma2(0.3)), rel=1e-2)


def test_prior_logp_is_normalised_gaussian():
    s = hbar.VESchedule(sigma_min=0.1, sigma_max=3.0)
    x = jnp.array([[0.5, -1.0]])
    expect = -0.5 * (0.25 + 1.0) / 9.0 - math.log(2 * math.pi * 9.0)
    assert float(s.prior_logp(x)[0]) == pytest.approx(expect)


def test_config_roundtrip_and_errors():
    for s in ALL:
        assert schedule_from_config(s.to_config()) == s
    with pytest.raises(hbar.HbarInputError, match="unknown schedule"):
        schedule_from_config({"name": "nope"})
    with pytest.raises(hbar.HbarInputError, match="unknown parameters"):
        schedule_from_config({"name": "simple", "beta": 1.0})
    with pytest.raises(hbar.HbarInputError, match="t_min < T"):
        hbar.SimpleSchedule(t_min=0.5, T=0.2)
    with pytest.raises(hbar.HbarInputError, match="outside the schedule"):
        hbar.SimpleSchedule().check_time(1.5)
    assert set(SCHEDULES) == {"simple", "cosine", "vp-linear", "ve", "ou", "ddpm", "edm"}
    with pytest.raises(hbar.HbarInputError, match="integer"):
        schedule_from_config({"name": "ddpm", "n_steps": 10.5})


@pytest.mark.parametrize("kind", ["linear", "scaled_linear"])
def test_ddpm_matches_discrete_closed_form(kind):
    """alpha(t_k)^2 = prod_{i<=k} (1 - beta_i) at t_k = k/N, betas as DDPM / diffusers define them."""
    s = DDPMSchedule(beta_start=1e-4, beta_end=0.02, n_steps=1000, beta_schedule=kind)
    if kind == "linear":
        betas = np.linspace(1e-4, 0.02, 1000)
    else:
        betas = np.linspace(1e-2, math.sqrt(0.02), 1000) ** 2
    abar = np.cumprod(1 - betas)
    k = np.array([1, 2, 10, 500, 999, 1000])
    with jax_x64():
        np.testing.assert_allclose(np.asarray(s.alpha(k / 1000.0)) ** 2, abar[k - 1], rtol=1e-10)
        np.testing.assert_allclose(np.asarray(s.sigma2(k / 1000.0)), 1 - abar[k - 1], rtol=1e-10)
        np.testing.assert_allclose(s.betas, betas, rtol=1e-10)
        np.testing.assert_allclose(np.asarray(s.timestep(k / 1000.0)), k - 1, atol=1e-9)
    assert s.t_min == pytest.approx(1e-3) and s.T == 1.0
    assert schedule_from_config(s.to_config()) == s


def test_edm_closed_form():
    """sigma(t) = t, alpha = 1, g^2 = 2 t, prior N(0, sigma_max^2)."""
    s = EDMSchedule()
    t = np.array([0.002, 0.5, 7.0, 80.0])
    np.testing.assert_allclose(np.asarray(s.sigma(t)), t, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s.alpha(t)), 1.0)
    np.testing.assert_allclose(np.asarray(s.g2(t)), 2 * t, rtol=1e-6)
    assert (s.t_min, s.T, s.prior_std) == (0.002, 80.0, 80.0)


def jax_x64():
    import jax

    return jax.enable_x64(True)
