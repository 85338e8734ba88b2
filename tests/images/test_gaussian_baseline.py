"""Tests for hbar.images.gaussian_baseline: the closed-form (P)PCA Gaussian against scipy, the
PPCA formula against the full Gaussian with the same implied covariance, k = d as the
full-covariance MLE, the exact dequantisation average, sampling, and bits/dim."""

import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from hbar.images.gaussian_baseline import GaussianBaseline, image_baseline, select_k
from hbar.images.preprocess import bits_per_dim
from hbar.validation import HbarInputError


def _data(n=400, d=6, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d)) * np.linspace(0.1, 1.5, d)
    return rng.standard_normal((n, d)) @ a.T + rng.standard_normal(d)


def test_full_covariance_is_the_mle_and_matches_scipy():
    x = _data()
    g = GaussianBaseline.fit(x, k="all", floor=1e-12)
    assert g.k == g.d == 6 and g.residual_variance == 0.0
    s = np.cov(x, rowvar=False, bias=True)
    np.testing.assert_allclose(g.mean, x.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(g.covariance(), s, atol=1e-12)
    xt = _data(50, seed=1)
    np.testing.assert_allclose(g.nll(xt), -multivariate_normal(x.mean(axis=0), s).logpdf(xt), rtol=1e-10)
    # MLE: the training NLL is 1/2 [d (1 + log 2 pi) + log det S], and any other Gaussian fits worse
    want = 0.5 * (6 * (1 + math.log(2 * math.pi)) + np.linalg.slogdet(s)[1])
    assert g.nll(x).mean() == pytest.approx(want, rel=1e-12)
    assert -multivariate_normal(x.mean(axis=0), 1.05 * s).logpdf(x).mean() > want
    assert GaussianBaseline.fit(x, k=6, floor=1e-12).nll(xt) == pytest.approx(g.nll(xt), rel=1e-12)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_ppca_formula_matches_full_gaussian_with_implied_covariance(k):
    x = _data(d=7)
    g = GaussianBaseline.fit(x, k=k)
    c = g.covariance()
    lam = np.sort(np.linalg.eigvalsh(np.cov(x, rowvar=False, bias=True)))[::-1]
    assert g.residual_variance == pytest.approx(lam[k:].mean(), rel=1e-10)
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(c))[::-1], np.r_[lam[:k], np.full(7 - k, lam[k:].mean())], rtol=1e-9)
    xt = _data(30, d=7, seed=2)
    np.testing.assert_allclose(g.nll(xt), -multivariate_normal(g.mean, c).logpdf(xt), rtol=1e-10)
    assert g.logdet() == pytest.approx(np.linalg.slogdet(c)[1], rel=1e-10)
    assert g.trace_precision() == pytest.approx(np.trace(np.linalg.inv(c)), rel=1e-10)
    # PPCA is nested: more components never fit the training data worse
    assert GaussianBaseline.fit(x, k=k + 1).nll(x).mean() <= g.nll(x).mean() + 1e-12


def test_eigenvalue_floor_on_degenerate_data():
    rng = np.random.default_rng(0)
    x = np.c_[rng.standard_normal((100, 2)), np.zeros(100)]  # a constant pixel
    g = GaussianBaseline.fit(x, floor=1e-4)
    assert g.variances.min() == pytest.approx(1e-4) and np.all(np.isfinite(g.nll(x)))
    g2 = GaussianBaseline.fit(x, k=2, floor=1e-4)
    assert g2.residual_variance == pytest.approx(1e-4)


def test_expected_nll_over_dequantisation_is_exact():
    """E_u[-log N(x_c + w (u - 1/2))] = -log N(x_c) + (w^2 / 24) tr C^-1, checked by Monte Carlo."""
    x = _data(d=4)
    g = GaussianBaseline.fit(x, k=2)
    xc, w = x[:3], 0.3
    rng = np.random.default_rng(5)
    u = rng.random((200_000, 1, 4))
    mc = g.nll((xc[None] + w * (u - 0.5)).reshape(-1, 4)).reshape(200_000, 3)
    np.testing.assert_allclose(g.expected_nll(xc, w), mc.mean(axis=0), atol=4 * mc.std(axis=0).max() / math.sqrt(2e5))


def test_sample_has_the_model_moments():
    x = _data(d=5)
    for k in (2, "all"):
        g = GaussianBaseline.fit(x, k=k)
        y = g.sample(np.random.default_rng(1), 100_000)
        c = g.covariance()
        se = math.sqrt(2.0 / y.shape[0]) * np.diag(c).max()  # bound on the standard error of a covariance entry
        np.testing.assert_allclose(y.mean(axis=0), g.mean, atol=5 * math.sqrt(np.diag(c).max() / y.shape[0]))
        np.testing.assert_allclose(np.cov(y, rowvar=False), c, atol=5 * se)
    np.testing.assert_array_equal(g.sample(3, 4), g.sample(3, 4))


def test_bits_per_dim_uses_the_image_offset():
    x = _data(d=4)
    g = GaussianBaseline.fit(x)
    assert g.bits_per_dim(x, 256) == pytest.approx(float(bits_per_dim(g.nll(x).mean(), 4, 256)), rel=1e-14)
    assert g.bits_per_dim(x, 256) == pytest.approx(g.nll(x).mean() / (4 * math.log(2)) + 7.0, rel=1e-14)


def test_select_k_finds_the_rank_of_low_rank_data():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 3)) @ rng.standard_normal((3, 20)) + 0.05 * rng.standard_normal((300, 20))
    k, scores = select_k(x, candidates=range(1, 21), seed=1)
    assert k == 3 and set(scores) == set(range(1, 21))
    perm = np.random.default_rng(1).permutation(300)
    direct = GaussianBaseline.fit(x[perm[30:]], k=5).nll(x[perm[:30]]).mean()
    assert scores[5] == pytest.approx(direct, rel=1e-12)
    with pytest.raises(HbarInputError, match="exceeds"):
        select_k(x, candidates=[21])


def test_bad_arguments():
    x = _data(d=3)
    with pytest.raises(HbarInputError, match="k = 4 exceeds"):
        GaussianBaseline.fit(x, k=4)
    with pytest.raises(HbarInputError):
        GaussianBaseline.fit(x, k="some")
    with pytest.raises(HbarInputError):
        GaussianBaseline.fit(x, floor=0.0)
    with pytest.raises(HbarInputError, match="dimension"):
        GaussianBaseline.fit(x).nll(np.zeros((2, 4)))


def test_image_baseline_on_digits():
    out = image_baseline("digits", k="all")
    assert out["n_train"] == 1500 and out["n_test"] == 297 and out["d"] == 64 and out["levels"] == 17
    # a Gaussian beats the uniform density on [-1, 1)^64 (log2 17 = 4.09 bits/dim) but not by all
    assert 1.0 < out["test_bits_per_dim"] < math.log2(17)
    assert out["train_bits_per_dim"] < out["test_bits_per_dim"]
    assert abs(out["test_bits_per_dim_one_draw"] - out["test_bits_per_dim"]) < 5 * out["test_bits_per_dim_one_draw_se"]
