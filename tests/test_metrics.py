"""Tests of hbar.metrics: exact empirical W2, Bures W2, sample moments."""

import numpy as np
import pytest

from hbar.metrics import gaussian_w2, sample_moments, w2_empirical
from hbar.validation import HbarInputError


def test_w2_empirical_1d_equals_sorted_matching():
    # In 1-D with equal sizes the optimal coupling is the monotone one: an exact, independent check.
    rng = np.random.default_rng(0)
    x = rng.normal(size=400)
    y = rng.normal(1.0, 1.3, size=400)
    exact_sq = np.mean((np.sort(x) - np.sort(y)) ** 2)
    assert w2_empirical(x, y, squared=True) == pytest.approx(exact_sq, rel=1e-10)
    assert w2_empirical(x, y) == pytest.approx(np.sqrt(exact_sq), rel=1e-10)


def test_w2_empirical_same_and_shifted_gaussian():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(1000, 2))
    b = rng.normal(size=(1000, 2))
    c = rng.normal(size=(1000, 2)) + np.array([1.0, 0.0])
    same = w2_empirical(a, b)
    shifted = w2_empirical(a, c)
    assert same < 0.25  # finite-sample W2 between two samples of one law
    assert shifted == pytest.approx(1.0, abs=0.1)
    assert w2_empirical(a, a, squared=True) == pytest.approx(0.0, abs=1e-14)


def test_w2_empirical_1d_unit_shift():
    rng = np.random.default_rng(2)
    x = rng.normal(size=2000)
    y = rng.normal(size=2000) + 1.0
    # W2 >= |difference of sample means|; the rest is finite-sample noise O(n^-1/2)
    dmean = abs(y.mean() - x.mean())
    assert w2_empirical(x, y) >= dmean - 1e-12
    assert w2_empirical(x, y) == pytest.approx(1.0, abs=abs(dmean - 1.0) + 0.08)


def test_w2_empirical_unequal_sizes_and_symmetry():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 2))
    y = rng.normal(size=(200, 2)) + 0.5
    assert w2_empirical(x, y) == pytest.approx(w2_empirical(y, x), rel=1e-10)


@pytest.mark.slow
def test_w2_empirical_3000_converges():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3000, 2))
    y = rng.normal(size=(3000, 2)) * 1.1
    val = w2_empirical(x, y, squared=True)  # raises if POT did not reach the optimum
    assert 0.0 < val < 0.2


def test_w2_empirical_errors():
    with pytest.raises(HbarInputError):
        w2_empirical(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(HbarInputError):
        w2_empirical(np.array([[0.0, np.nan]]), np.zeros((1, 2)))
    with pytest.raises(HbarInputError):
        w2_empirical(np.zeros((0, 2)), np.zeros((3, 2)))
    with pytest.raises(RuntimeError):
        rng = np.random.default_rng(0)
        w2_empirical(rng.normal(size=(200, 2)), rng.normal(size=(200, 2)), num_iter_max=5)


def test_gaussian_w2_1d_formula():
    for m1, s1, m2, s2 in [(0.0, 1.0, 1.0, 1.0), (0.3, 0.5, -1.2, 2.0), (2.0, 1.5, 2.0, 1.5)]:
        expected_sq = (m1 - m2) ** 2 + (s1 - s2) ** 2
        assert gaussian_w2([m1], [[s1**2]], [m2], [[s2**2]], squared=True) == pytest.approx(expected_sq, abs=1e-12)
        assert gaussian_w2(m1, s1**2, m2, s2**2) == pytest.approx(np.sqrt(expected_sq), abs=1e-9)


def test_gaussian_w2_commuting_and_general():
    # diagonal (commuting) covariances: W2^2 = |dm|^2 + sum (sqrt(a_i) - sqrt(b_i))^2
    a = np.array([0.5, 2.0, 1.0])
    b = np.array([1.5, 0.3, 1.0])
    m1 = np.array([0.0, 1.0, -1.0])
    m2 = np.array([1.0, 1.0, 0.0])
    expected = np.sum((m1 - m2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert gaussian_w2(m1, np.diag(a), m2, np.diag(b), squared=True) == pytest.approx(expected, rel=1e-12)
    # a rotation of both covariances leaves W2 unchanged; symmetry; zero distance to itself
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    A, B = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    assert gaussian_w2(q @ m1, A, q @ m2, B, squared=True) == pytest.approx(expected, rel=1e-10)
    M = rng.normal(size=(3, 3))
    C1 = M @ M.T + 0.1 * np.eye(3)
    N = rng.normal(size=(3, 3))
    C2 = N @ N.T + 0.1 * np.eye(3)
    assert gaussian_w2(m1, C1, m2, C2) == pytest.approx(gaussian_w2(m2, C2, m1, C1), rel=1e-9)
    assert gaussian_w2(m1, C1, m1, C1) == pytest.approx(0.0, abs=1e-6)


def test_gaussian_w2_matches_large_sample():
    rng = np.random.default_rng(5)
    C1 = np.array([[1.0, 0.6], [0.6, 0.8]])
    C2 = np.array([[0.4, -0.1], [-0.1, 1.2]])
    m2 = np.array([0.5, -0.3])
    exact = gaussian_w2(np.zeros(2), C1, m2, C2)
    x = rng.multivariate_normal(np.zeros(2), C1, size=1500)
    y = rng.multivariate_normal(m2, C2, size=1500)
    assert w2_empirical(x, y) == pytest.approx(exact, abs=0.1)


def test_gaussian_w2_errors():
    with pytest.raises(HbarInputError):
        gaussian_w2([0.0, 0.0], np.eye(2), [0.0], np.eye(1))
    with pytest.raises(HbarInputError):
        gaussian_w2([0.0, 0.0], np.array([[1.0, 2.0], [0.0, 1.0]]), [0.0, 0.0], np.eye(2))
    with pytest.raises(HbarInputError):
        gaussian_w2([0.0, 0.0], -np.eye(2), [0.0, 0.0], np.eye(2))


def test_sample_moments_standard_errors():
    rng = np.random.default_rng(6)
    C = np.array([[1.0, 0.5], [0.5, 2.0]])
    zs_m, zs_c = [], []
    for _ in range(40):
        x = rng.multivariate_normal([1.0, -1.0], C, size=2000)
        mom = sample_moments(x)
        zs_m.append(mom.mean_z([1.0, -1.0]))
        zs_c.append(mom.cov_z(C))
    # z-scores of the true values are ~ N(0, 1): the standard errors are calibrated
    assert np.std(np.array(zs_m)) == pytest.approx(1.0, abs=0.2)
    assert np.std(np.array(zs_c)) == pytest.approx(1.0, abs=0.2)
    assert mom.cov.shape == (2, 2) and mom.mean_se.shape == (2,)
    with pytest.raises(HbarInputError):
        sample_moments(np.zeros((1, 2)))


def test_gaussian_w2_with_rank_deficient_covariances_is_finite_and_exact():
    """Fewer samples than dimensions (classifier features in the Fréchet distance): the covariances are
    singular; the Bures W2 is still finite, and for commuting (diagonal) ones equals the closed form
    sum (sqrt a_i - sqrt b_i)^2."""
    a = np.array([2.0, 0.0, 1.0, 0.0])
    b = np.array([0.5, 3.0, 0.0, 0.0])
    got = gaussian_w2(np.zeros(4), np.diag(a), np.ones(4), np.diag(b), squared=True)
    assert got == pytest.approx(4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2), rel=1e-12)
    x = np.random.default_rng(0).normal(size=(10, 30))
    c = np.cov(x.T)
    assert np.isfinite(gaussian_w2(x.mean(0), c, x.mean(0) + 1.0, 2.0 * c))
    assert gaussian_w2(x.mean(0), c, x.mean(0), c) == pytest.approx(0.0, abs=1e-6)
