"""The one-loop estimator of C1 (hbar.one_loop, docs/theory.md section 5.7) against closed forms
(Gaussian oracle, factorised oracle) and the exact characteristics."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hbar
from hbar.one_loop import fluctuation_grid, one_loop_samples
from hbar.probability_flow import pf_log_likelihood
from hbar.references import factorised_oracle, gaussian_oracle
from hbar.scores import DiagonalGaussianScore

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _cases import gaussian_case  # noqa: E402

OU = hbar.OUSchedule(beta=1.0, t_min=1e-2, T=8.0)


def factorised_case(d, eps=0.2, n=100, groups=6, seed=0, schedule=OU):
    """Factorised Gaussian data N(m0, diag s0) in d dimensions (coordinates cycling through
    ``groups`` parameter sets), a scaled and shifted diagonal affine score, n data points."""
    rng = np.random.default_rng(seed)
    gm, gv, gs = 0.5 * rng.normal(size=groups), rng.uniform(0.2, 1.5, groups), 0.1 * rng.normal(size=groups)
    idx = np.arange(d) % groups
    m0, s0 = gm[idx], gv[idx]
    score = DiagonalGaussianScore(m0, s0, schedule, scale_eps=eps, shift=gs[idx])
    x = m0 + np.sqrt(s0) * rng.normal(size=(n, d))
    return schedule, score, m0, s0, x


def check_honest(res, truth, label):
    """Mean C1 within 3 estimator s.e. of the truth; per-point z-scores with spread 1 +- 0.2."""
    v = res.valid
    z = (res.c1[v] - truth[v]) / res.c1_se[v]
    dev = (res.c1[v].mean() - truth[v].mean()) / res.c1_estimator_se
    print(f"{label}: mean C1 {res.c1[v].mean():.4f} truth {truth[v].mean():.4f} ({dev:+.2f} s.e.), "
          f"z mean {z.mean():+.3f} sd {z.std(ddof=1):.3f} (n = {z.size}, K = {res.probes})")
    assert v.sum() >= 0.95 * v.size
    assert abs(dev) < 3.0
    assert 0.8 < z.std(ddof=1) < 1.2


# --- pieces ----------------------------------------------------------------------------------


def test_factorised_oracle_matches_full_oracle():
    s, score, m0, s0, x = factorised_case(5, n=5, groups=2)
    fac = factorised_oracle(score, s, m0, s0, [0.0, 0.3], x=x)
    full = gaussian_oracle(score, s, m0, np.diag(s0), [0.0, 0.3], x=x)
    for name in ("nll", "c1", "c2", "nll_points", "c1_points", "c2_points", "mean", "cov", "w2"):
        np.testing.assert_allclose(getattr(fac, name), getattr(full, name), rtol=1e-8, atol=1e-10, err_msg=name)


def test_diagonal_score_is_its_affine_form():
    s, score, *_ , x = factorised_case(5, n=4)
    A, b = score.affine(0.3)
    np.testing.assert_allclose(score(jnp.asarray(x), 0.3), x @ np.asarray(A).T + np.asarray(b), rtol=1e-12)


def test_grid_resolves_t_min():
    g = fluctuation_grid(OU, 64)
    assert g.shape == (65,) and g[0] == OU.t_min and g[-1] == OU.T and np.all(np.diff(g) > 0)
    lam = 2 * np.asarray(OU.log_alpha(g)) - np.log(np.asarray(OU.sigma2(g)))
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)  # uniform in log-SNR
    assert g[1] - g[0] < 0.05 * (g[-1] - g[-2])  # fine near t_min, coarse near T
    np.testing.assert_allclose(fluctuation_grid(OU, 8, "uniform"), np.linspace(OU.t_min, OU.T, 9))


def test_input_errors():
    s, score, m0, S0, x = gaussian_case(2, 0.1)
    with pytest.raises(hbar.HbarInputError, match="key"):
        hbar.nll(score, s, x, order=1, method="one-loop")
    with pytest.raises(hbar.HbarInputError, match="order=1"):
        hbar.nll(score, s, x, order=2, method="one-loop", key=jax.random.PRNGKey(0))
    with pytest.raises(hbar.HbarInputError, match="grid"):
        hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(0), grid="nope")


def test_auto_switches_on_dimension():
    from hbar.likelihood import ONE_LOOP_MIN_DIM

    s, score, m0, S0, x = gaussian_case(2, 0.1)
    assert hbar.nll(score, s, x, order=1, method="auto").method == "characteristics"
    s, score, m0, s0, x = factorised_case(ONE_LOOP_MIN_DIM, n=3)
    r = hbar.nll(score, s, x, order=1, method="auto", key=jax.random.PRNGKey(0), probes=4, steps=16)
    assert r.method == "one-loop" and r.c1_se.shape == (3,) and r.divergence == "exact"


# --- Gaussian oracle: unbiased, honest error bars -------------------------------------------------


@pytest.mark.parametrize("d, n, probes", [(2, 100, 64), pytest.param(64, 100, 32, marks=pytest.mark.slow)])
def test_gaussian_oracle_full_affine(d, n, probes):
    s, score, m0, S0, _ = gaussian_case(d, 0.2)
    x = np.random.default_rng(d).multivariate_normal(m0, S0, size=n)
    truth = gaussian_oracle(score, s, m0, S0, 0.0, x=x).c1_points[0]
    res = hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(d), probes=probes)
    check_honest(res, truth, f"affine d={d}")


@pytest.mark.parametrize("d", [784, pytest.param(3072, marks=pytest.mark.slow)])
def test_gaussian_oracle_factorised(d):
    s, score, m0, s0, x = factorised_case(d, n=100)
    truth = factorised_oracle(score, s, m0, s0, 0.0, x=x).c1_points[0]
    res = hbar.nll(score, s, x, order=1, method="one-loop", key=jax.random.PRNGKey(d), probes=16)
    assert res.divergence == "hutchinson"
    check_honest(res, truth, f"factorised d={d}")


# --- unbiasedness at one point, against the exact characteristics ----------------------------------


def _single_point_samples(score, schedule, x, R, steps=128, seed=0):
    proc = hbar.HProcess(schedule, score)
    xj = jnp.asarray(x[None])
    fwd = pf_log_likelihood(proc, xj, schedule.t_min, hbar.ODEOptions(rtol=1e-9, atol=1e-9))
    keys = jax.random.split(jax.random.PRNGKey(seed), R)
    fn = jax.jit(lambda a, b, k, g: one_loop_samples(proc, a, b, k, g))
    out = fn(jnp.repeat(xj, R, 0), jnp.repeat(fwd["x_T"], R, 0), keys, jnp.asarray(fluctuation_grid(schedule, steps)))
    return -np.asarray(out["ell1"])


def check_unbiased_rate(c1_samples, exact, label):
    """The mean converges to the exact value; the RMS error of means of K samples is sd/sqrt(K)."""
    R = c1_samples.size
    sd = c1_samples.std(ddof=1)
    dev = (c1_samples.mean() - exact) / (sd / np.sqrt(R))
    ratios = []
    for K in (4, 16, 64):
        means = c1_samples[: R - R % K].reshape(-1, K).mean(axis=1)
        ratios.append(np.sqrt(np.mean((means - exact) ** 2)) / (sd / np.sqrt(K)))
    print(f"{label}: exact {exact:.4f}, mean of {R} samples {c1_samples.mean():.4f} ({dev:+.2f} s.e.), "
          f"sd {sd:.3f}, RMS error x sqrt(K)/sd at K = 4, 16, 64: {np.round(ratios, 3)}")
    assert abs(dev) < 3.0
    assert all(0.8 < r < 1.2 for r in ratios)


def mixture_case():
    s = hbar.SimpleSchedule()
    base = hbar.GaussianMixtureScore([0.3, 0.7], [[-1.0, 0.5], [1.0, -0.3]], [0.4, 0.6], s)
    return s, hbar.PerturbedScore(base, eps=0.15, shift=jnp.asarray([0.2, -0.1]))


@pytest.mark.slow
def test_unbiased_nonlinear_score_d2():
    s, score = mixture_case()
    x = np.array([[0.4, 0.2]])
    exact = hbar.nll(score, s, x, order=1, options=hbar.ODEOptions(rtol=1e-9, atol=1e-9)).c1[0]
    check_unbiased_rate(_single_point_samples(score, s, x[0], 8192), exact, "mixture d=2")


# --- trained networks: one-loop vs exact characteristics -----------------------------------------


@pytest.fixture(scope="session")
def models():
    from _one_loop_models import trained_model

    return trained_model


@pytest.mark.slow
@pytest.mark.parametrize("d, probes", [(2, 64), (8, 32), (64, 32)])
def test_trained_network_against_characteristics(models, d, probes):
    score, schedule, x = models(d)
    x = x[:100]
    exact = hbar.nll(score, schedule, x, order=1, method="characteristics")
    res = hbar.nll(score, schedule, x, order=1, method="one-loop", key=jax.random.PRNGKey(d), probes=probes)
    ok = exact.valid & res.valid
    assert ok.sum() >= 95
    np.testing.assert_allclose(res.nll0[ok], exact.nll0[ok], rtol=1e-4, atol=1e-4)
    res.valid = ok
    check_honest(res, exact.c1, f"trained d={d}")


@pytest.mark.slow
def test_unbiased_trained_d8(models):
    score, schedule, x = models(8)
    exact = hbar.nll(score, schedule, x[:1], order=1, options=hbar.ODEOptions(rtol=1e-9, atol=1e-9)).c1[0]
    check_unbiased_rate(_single_point_samples(score, schedule, x[0], 8192), exact, "trained d=8")
