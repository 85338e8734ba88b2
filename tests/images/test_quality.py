"""hbar.images.quality: feature Fréchet distance against the closed form, invariances, and
the wiring of sample_quality (pixel W2, label histogram, accuracy) with a transparent classifier."""

import json
import math

import numpy as np
import pytest

from hbar.images.quality import feature_frechet_distance, label_entropy, sample_quality
from hbar.validation import HbarInputError


def exact_moments_sample(mean, cov, n, seed):
    """n points whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = np.random.default_rng(seed).normal(size=(n, len(mean)))
    z -= z.mean(axis=0)
    z = z @ np.linalg.inv(np.linalg.cholesky(z.T @ z / (n - 1))).T  # sample covariance = I exactly
    return z @ np.linalg.cholesky(cov).T + mean


def closed_form_fd(m1, c1, m2, c2):
    """|m1 - m2|^2 + tr(C1 + C2) - 2 tr((C1 C2)^{1/2}); C1 C2 is similar to C1^{1/2} C2 C1^{1/2},
    so tr((C1 C2)^{1/2}) = sum of square roots of the eigenvalues of C1 C2."""
    ev = np.linalg.eigvals(c1 @ c2).real
    return float(np.sum((m1 - m2) ** 2) + np.trace(c1) + np.trace(c2) - 2.0 * np.sum(np.sqrt(np.clip(ev, 0, None))))


def random_cov(k, rng):
    a = rng.normal(size=(k, k))
    return a @ a.T / k + 0.1 * np.eye(k)


def test_fd_matches_the_closed_form_for_gaussian_features():
    rng = np.random.default_rng(0)
    k = 6
    m1, m2 = rng.normal(size=k), rng.normal(size=k)
    c1, c2 = random_cov(k, rng), random_cov(k, rng)
    a = exact_moments_sample(m1, c1, 200, 1)
    b = exact_moments_sample(m2, c2, 300, 2)
    assert feature_frechet_distance(a, b) == pytest.approx(closed_form_fd(m1, c1, m2, c2), rel=1e-8)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    a1 = exact_moments_sample(np.array([1.0]), np.array([[4.0]]), 50, 3)
    b1 = exact_moments_sample(np.array([-0.5]), np.array([[0.25]]), 70, 4)
    assert feature_frechet_distance(a1, b1) == pytest.approx(1.5**2 + 1.5**2, rel=1e-10)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(size=(300, 16)) + 0.3
    assert abs(feature_frechet_distance(a, a)) < 1e-8 * np.trace(np.cov(a.T))
    assert feature_frechet_distance(a, b) == pytest.approx(feature_frechet_distance(b, a), rel=1e-8)


def test_fd_is_invariant_under_a_common_rigid_motion_and_scales_quadratically():
    rng = np.random.default_rng(6)
    a = rng.normal(size=(300, 5)) * [1, 2, 3, 0.5, 1]
    b = rng.normal(size=(250, 5)) + [0.5, 0, -1, 0, 0.2]
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    shift = rng.normal(size=5)
    fd = feature_frechet_distance(a, b)
    assert feature_frechet_distance(a @ q + shift, b @ q + shift) == pytest.approx(fd, rel=1e-8)
    assert feature_frechet_distance(3.0 * a, 3.0 * b) == pytest.approx(9.0 * fd, rel=1e-8)
    # the mean term alone: a shift of one set by c adds |c|^2 when the covariances agree
    assert feature_frechet_distance(a + shift, a) == pytest.approx(float(shift @ shift), rel=1e-8)


def test_fd_refuses_bad_input():
    with pytest.raises(HbarInputError, match="dimensions differ"):
        feature_frechet_distance(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(HbarInputError, match="at least 2"):
        feature_frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(HbarInputError, match="NaN"):
        feature_frechet_distance(np.full((4, 3), np.nan), np.zeros((5, 3)))


class PixelClassifier:
    """Features = the pixels themselves; predicted label = the index of the brightest of the first 3 pixels."""

    n_classes = 3

    def features(self, x):
        return np.asarray(x, dtype=np.float32)

    def predict(self, x):
        return np.argmax(np.asarray(x)[:, :3], axis=1)


def test_sample_quality_of_identical_sets_is_zero_and_a_shift_gives_its_length():
    rng = np.random.default_rng(7)
    ref = rng.uniform(-1, 1, (120, 9))
    labels = np.argmax(ref[:, :3], axis=1)
    q = sample_quality(ref, ref, PixelClassifier(), reference_labels=labels, n_w2=120, n_boot=5, seed=0)
    # W2 is the square root of a cost summed in float64: rounding of ~1e-16 shows as ~1e-8
    assert q.fd == pytest.approx(0.0, abs=1e-9) and q.w2_pixels == pytest.approx(0.0, abs=1e-7)
    assert q.n_w2 == 120 and q.w2_floor is None  # the reference cannot give two disjoint sets of 120
    assert q.accuracy == 1.0 and sum(q.label_counts) == 120
    assert q.label_entropy == pytest.approx(label_entropy(np.bincount(labels, minlength=3)))
    assert q.label_entropy_max == pytest.approx(math.log(3))
    assert q.feature_dim == 9 and q.n_samples == q.n_reference == 120 and q.fd_se > 0
    c = np.full(9, 0.1)
    q2 = sample_quality(ref + c, ref, PixelClassifier(), n_w2=120, n_boot=0)
    # translation: the identity coupling is optimal, W2 = |c|; FD = |c|^2
    assert q2.w2_pixels == pytest.approx(float(np.linalg.norm(c)), rel=1e-9)
    assert q2.fd == pytest.approx(float(c @ c), rel=1e-8)
    assert q2.accuracy is None and math.isnan(q2.fd_se)
    json.dumps(q2.to_dict(), allow_nan=False)


def test_sample_quality_floors_and_subsets():
    rng = np.random.default_rng(8)
    ref = rng.normal(size=(400, 4))
    samples = rng.normal(size=(100, 4))
    q = sample_quality(samples, ref, PixelClassifier(), n_w2=50, n_boot=3, seed=1)
    assert q.n_w2 == 50 and q.w2_floor is not None and q.w2_floor > 0
    assert q.fd_floor > 0 and q.fd_floor < 1.0  # same distribution: only the finite-n bias
    assert sum(q.label_counts) == 100 and q.accuracy is None
    one_class = np.zeros((30, 4))
    one_class[:, 0] = 1.0  # PixelClassifier predicts class 0 for every sample
    assert sample_quality(one_class, ref, PixelClassifier(), n_w2=0).label_counts == (30, 0, 0)
    assert label_entropy([5, 5, 5, 5]) == pytest.approx(math.log(4))
    assert label_entropy([7, 0, 0]) == 0.0
    with pytest.raises(HbarInputError, match="d=4"):
        sample_quality(samples[:, :3], ref, PixelClassifier())
    with pytest.raises(HbarInputError, match="n_w2"):
        sample_quality(samples, ref, PixelClassifier(), n_w2=-1)
