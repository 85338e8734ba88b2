"""hbar.path.pimc: the path-integral Monte Carlo likelihood against the exact density of the
Euler chain and the continuous-time closed form (docs/theory.md section 3)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _path_cases import OU, SIMPLE, _discrete_moments, _gauss_case, _ode_moments
from scipy.stats import multivariate_normal

from hbar.path import path_log_likelihood, path_nll
from hbar.scores import AffineScore, GaussianMixtureScore


@pytest.mark.parametrize("d,h", [(1, 0.1), (1, 1.0), (16, 0.5)])
def test_pimc_matches_exact_discrete_density(d, h):
    """The estimator targets the Euler chain's density at t_min, computed here exactly."""
    m0, S0, rng = _gauss_case(d, 4)
    shift = 0.05 * np.ones(d)
    sc = AffineScore(m0, S0, OU, scale_eps=0.1, shift=shift)
    x = rng.multivariate_normal(m0, S0, size=6)
    steps = 50
    m, C = _discrete_moments(OU, m0, S0, 0.1, shift, h, steps)
    ref = multivariate_normal(m, C).logpdf(x)
    r = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(11), n_paths=512, steps=steps, grid="uniform")
    assert r.log_q.shape == (6,) and r.n_paths == 512 and np.all(r.ess > 0.05 * 512)
    z = (r.log_q - ref) / r.se
    assert np.all(np.abs(z) < 4.5), z
    np.testing.assert_allclose(r.bias, -0.5 * r.se**2)
    assert np.all(r.khat < 0.5) and np.all(r.reliable), r.khat  # light-tailed weights: the s.e. is trusted


def test_pimc_on_the_log_snr_grid_matches_the_exact_chain():
    """The default grid: the estimate targets the Euler chain on the log-SNR grid, whose exact
    density is hbar.references.gaussian_chain_nll."""
    from hbar.references import gaussian_chain_nll

    m0, S0, rng = _gauss_case(2, 6)
    sc = AffineScore(m0, S0, SIMPLE, scale_eps=0.1, shift=0.05 * np.ones(2))
    x = rng.multivariate_normal(m0, S0, size=4)
    r = path_log_likelihood(sc, SIMPLE, x, 0.5, jax.random.PRNGKey(2), n_paths=512, steps=30)
    assert r.grid == "log-snr"
    z = (-r.log_q - gaussian_chain_nll(sc, SIMPLE, 0.5, x, steps=30)) / r.se
    assert np.all(np.abs(z) < 4.5), z


def test_discretisation_bias_halves_with_step():
    """Exact Euler-chain density vs the continuous-time model: first order in dt."""
    d, h = 2, 0.5
    m0, S0, rng = _gauss_case(d, 5)
    x = rng.multivariate_normal(m0, S0, size=5)
    mc, Cc = _ode_moments(SIMPLE, m0, S0, 0.1, np.zeros(d), h)
    ref = multivariate_normal(mc, Cc).logpdf(x)
    errs = []
    for steps in (25, 50, 100, 200):
        m, C = _discrete_moments(SIMPLE, m0, S0, 0.1, np.zeros(d), h, steps)
        errs.append(np.max(np.abs(multivariate_normal(m, C).logpdf(x) - ref)))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert np.all((ratios > 1.6) & (ratios < 2.5)), (errs, ratios)
    # cross-check the continuous moments against the oracle of hbar.references
    from hbar.references import gaussian_backward_moments

    mom = gaussian_backward_moments(AffineScore(m0, S0, SIMPLE, scale_eps=0.1), SIMPLE, h)
    np.testing.assert_allclose(mom["mean"][0, 0], mc, atol=1e-8)
    np.testing.assert_allclose(mom["cov"][0, 0], Cc, atol=1e-8)


@pytest.mark.parametrize("d", [1, 16])
def test_pimc_matches_continuous_gaussian(d):
    """Richardson extrapolation of the estimates at steps N and 2N removes the O(dt) bias; the
    result agrees with the continuous-time closed form within its standard error."""
    h = 0.5
    m0, S0, rng = _gauss_case(d, 6)
    sc = AffineScore(m0, S0, SIMPLE, scale_eps=0.1)
    x = rng.multivariate_normal(m0, S0, size=4)
    mc, Cc = _ode_moments(SIMPLE, m0, S0, 0.1, np.zeros(d), h)
    ref = multivariate_normal(mc, Cc).logpdf(x)
    r1 = path_log_likelihood(sc, SIMPLE, x, h, jax.random.PRNGKey(20), n_paths=1024, steps=50)
    r2 = path_log_likelihood(sc, SIMPLE, x, h, jax.random.PRNGKey(21), n_paths=1024, steps=100)
    ext = 2 * (r2.log_q - r2.bias) - (r1.log_q - r1.bias)
    se = np.sqrt(4 * r2.se**2 + r1.se**2)
    assert np.all(np.abs(ext - ref) < 4 * se + 2e-3), (ext - ref, se)


def test_pimc_exact_mixture_score_recovers_marginal():
    """With the exact score, q^h_{t_min} = p_{t_min} for every h (up to the tiny p_T vs pi
    mismatch of SIMPLE); checked after Richardson extrapolation in the step."""
    mix = GaussianMixtureScore([0.3, 0.7], [[-1.0], [1.0]], [0.4, 0.4], SIMPLE)
    x = jnp.array([[-1.2], [0.0], [0.9], [2.0]])
    ref = np.asarray(mix.log_density(x, SIMPLE.t_min))
    for i, h in enumerate([0.2, 1.0]):
        r1 = path_log_likelihood(mix, SIMPLE, x, h, jax.random.PRNGKey(30 + i), n_paths=1024, steps=50)
        r2 = path_log_likelihood(mix, SIMPLE, x, h, jax.random.PRNGKey(40 + i), n_paths=1024, steps=100)
        ext = 2 * (r2.log_q - r2.bias) - (r1.log_q - r1.bias)
        se = np.sqrt(4 * r2.se**2 + r1.se**2)
        assert np.all(np.abs(ext - ref) < 4 * se + 5e-3), (h, ext - ref, se)
        assert np.all(r2.ess > 0.5 * 1024)


def test_reverse_proposal_beats_forward():
    d, h = 2, 0.2
    m0, S0, rng = _gauss_case(d, 7)
    sc = AffineScore(m0, S0, OU)
    x = rng.multivariate_normal(m0, S0, size=3)
    rev = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(0), n_paths=128, steps=40)
    fwd = path_log_likelihood(sc, OU, x, h, jax.random.PRNGKey(0), n_paths=128, steps=40, proposal="forward")
    assert np.all(rev.ess > 10 * fwd.ess)
    m, C = _discrete_moments(OU, m0, S0, 0.0, np.zeros(d), h, 40)
    assert np.all(np.abs(rev.log_q - multivariate_normal(m, C).logpdf(x)) < 5 * rev.se)


_CHUNK_CASE = {}


def _chunk_case():
    """Three points, eight paths, ten steps; the unchunked weights are computed once."""
    if not _CHUNK_CASE:
        m0, S0, rng = _gauss_case(2, 7)
        sc = AffineScore(m0, S0, OU, scale_eps=0.1)
        x = rng.multivariate_normal(m0, S0, size=3)
        full = path_log_likelihood(sc, OU, x, 0.3, jax.random.PRNGKey(1), n_paths=8, steps=10, keep_weights=True)
        _CHUNK_CASE.update(sc=sc, x=x, full=full)
    return _CHUNK_CASE


@pytest.mark.parametrize("chunk_rows", [5, 16])
def test_chunking_does_not_change_the_weights(chunk_rows):
    """Path j of point i gets the same noise whatever the chunking: with 3 points x 8 paths,
    chunk_rows = 5 gives path blocks of 5 and a short last block of 3, chunk_rows = 16 point
    blocks of 2 with a padded last block; the weights equal the unchunked ones."""
    c = _chunk_case()
    a = path_log_likelihood(c["sc"], OU, c["x"], 0.3, jax.random.PRNGKey(1), n_paths=8, steps=10,
                            chunk_rows=chunk_rows, keep_weights=True)
    assert a.log_weights.shape == (3, 8)
    np.testing.assert_allclose(a.log_weights, c["full"].log_weights, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(a.log_q, c["full"].log_q, rtol=1e-12)


def test_path_nll_summary():
    d = 2
    m0, S0, rng = _gauss_case(d, 8)
    sc = AffineScore(m0, S0, OU, scale_eps=0.1)
    x = rng.multivariate_normal(m0, S0, size=6)
    res = path_nll(sc, OU, x, [0.5, 1.0], jax.random.PRNGKey(2), n_paths=128, steps=40)
    assert res.nll.shape == (2,) and np.all(res.se > 0) and np.all(res.bias >= 0)
    assert np.all((res.ess_min > 0) & (res.ess_min <= res.ess_median) & (res.ess_mean <= 1))
    for i, h in enumerate([0.5, 1.0]):
        m, C = _discrete_moments(OU, m0, S0, 0.1, np.zeros(d), h, 40)
        ref = -np.mean(multivariate_normal(m, C).logpdf(x))
        assert abs(res.nll[i] - ref) < 5 * res.mc_se[i] + 1e-3
    assert len(res.rows()) == 2


def test_path_nll_counts_failed_points():
    """A score that is NaN near some data points fails exactly those points: they are counted in
    n_failed, flagged in results[i].valid and left out of the NLL and s.e. (audit: NaN on 6 of 16
    points made the whole NLL NaN without a count)."""
    d = 2
    m0, S0, rng = _gauss_case(d, 8)
    sc = AffineScore(m0, S0, OU, scale_eps=0.1)
    x = rng.multivariate_normal(m0, S0, size=8)
    far = np.abs(x[:, 0] - m0[0]) > 0.5 * np.sqrt(S0[0, 0])
    assert 0 < far.sum() < 8
    # NaN in a small ball around each "far" point at the smallest times only: only their paths see it
    centres = jnp.asarray(x[far])

    def bad(z, t):
        near = jnp.min(jnp.sum((z[:, None, :] - centres[None]) ** 2, -1), 1) < 1e-4
        return jnp.where((near & (t < 0.05))[:, None], jnp.nan, sc(z, t))

    clean = path_nll(sc, OU, x, [0.5], jax.random.PRNGKey(2), n_paths=64, steps=20)
    with pytest.warns(UserWarning, match="left out"):
        res = path_nll(bad, OU, x, [0.5], jax.random.PRNGKey(2), n_paths=64, steps=20)
    assert list(res.n_failed) == [int(far.sum())]
    np.testing.assert_array_equal(res.results[0].valid, ~far)
    ok = ~far
    np.testing.assert_allclose(res.results[0].nll[ok], clean.results[0].nll[ok], rtol=1e-12)
    np.testing.assert_allclose(res.nll[0], np.mean(clean.results[0].nll[ok]), rtol=1e-12)
    assert np.isfinite(res.se[0]) and res.rows()[0]["n_failed"] == int(far.sum())
    assert clean.n_failed.tolist() == [0]
