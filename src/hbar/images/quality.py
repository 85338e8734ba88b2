"""Sample quality of image models without downloads (docs/theory.md section 13.6).

* :func:`feature_frechet_distance` -- the Fréchet distance between Gaussians fitted to two sets
  of classifier features (the FID recipe with hbar's own small classifier instead of Inception):

      FD = |m_a - m_b|^2 + tr( C_a + C_b - 2 (C_a^{1/2} C_b C_a^{1/2})^{1/2} ),

  i.e. the squared Bures W2 of :func:`hbar.metrics.gaussian_w2` (``squared=True``) of the
  feature means and covariances; no second formula here.
* :func:`sample_quality` -> :class:`QualityResult`: feature FD with a bootstrap standard error
  and its noise floor, the classifier's accuracy on real test images, the predicted-label
  histogram and entropy of the samples (mode coverage), and the exact-EMD W2 on pixels
  (:func:`hbar.metrics.w2_empirical`) for a small, stated sample count.

Bias: the plug-in FD is biased upwards at finite n (each sample covariance carries O(k/n)
noise, k = feature dimension, which the trace term does not cancel): FD between two
independent samples of the *same* distribution is about tr(C) (1/n_a + 1/n_b) at leading
order, not 0. Compare FDs only at equal (n_a, n_b); ``fd_floor`` (FD between two disjoint
halves of the reference) shows the size of this bias.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hbar.metrics import gaussian_w2, w2_empirical
from hbar.serialization import to_jsonable
from hbar.validation import HbarInputError, check_points, check_positive_int

__all__ = ["feature_frechet_distance", "feature_moments", "sample_quality", "QualityResult", "label_entropy"]


def feature_moments(feats: Any, name: str = "features") -> tuple[np.ndarray, np.ndarray]:
    """(mean (k,), unbiased covariance (k, k)) of features (n, k), n >= 2, in float64."""
    f = check_points(feats, name).astype(np.float64)
    if f.shape[0] < 2:
        raise HbarInputError(f"{name} need at least 2 rows for a covariance, got {f.shape[0]}")
    m = f.mean(axis=0)
    fc = f - m
    c = fc.T @ fc / (f.shape[0] - 1)
    return m, 0.5 * (c + c.T)


def feature_frechet_distance(feats_a: Any, feats_b: Any) -> float:
    """Fréchet distance between Gaussians fitted to features (n_a, k) and (n_b, k):
    ``gaussian_w2(m_a, C_a, m_b, C_b, squared=True)`` (squared Bures W2, FID convention).

    Plug-in estimate, biased upwards at finite n by about tr(C) (1/n_a + 1/n_b) (module
    docstring); compare values at equal sample sizes."""
    ma, ca = feature_moments(feats_a, "feats_a")
    mb, cb = feature_moments(feats_b, "feats_b")
    if ma.shape != mb.shape:
        raise HbarInputError(f"feature dimensions differ: {ma.shape[0]} and {mb.shape[0]}")
    return gaussian_w2(ma, ca, mb, cb, squared=True)


def label_entropy(counts: Any) -> float:
    """Entropy (nats) of the label distribution given by ``counts`` (k,): -sum p log p."""
    c = np.asarray(counts, dtype=np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass(frozen=True)
class QualityResult:
    """Sample-quality figures of one sample set against real reference images.

    Attributes:
        n_samples, n_reference: rows used for the feature statistics.
        feature_dim: k, the classifier's feature width.
        fd: feature Fréchet distance samples vs reference (squared Bures W2 of feature Gaussians).
        fd_se: bootstrap standard error of fd (both sets resampled with replacement, ``n_boot`` times).
        n_boot: bootstrap replicates.
        fd_floor: FD between two disjoint random halves of the reference, each of min(n_samples,
            n_reference // 2) rows: the finite-sample bias level (a perfect model scores about
            this at that size; NaN if the reference has < 4 rows).
        accuracy: the classifier's accuracy on the labelled reference images (None without labels).
        label_counts: (n_classes,) histogram of the labels the classifier predicts for the samples.
        label_entropy: entropy (nats) of that histogram; log(n_classes) = every class equally often.
        label_entropy_max: log(n_classes).
        w2_pixels: exact-EMD W2 (not squared) between ``n_w2`` samples and ``n_w2`` reference
            images in pixel model space [-1, 1)^d (None when n_w2 = 0).
        w2_floor: the same between two disjoint sets of ``n_w2`` reference images (None when the
            reference has fewer than 2 n_w2 rows).
        n_w2: points per side of the W2 figures.
    """

    n_samples: int
    n_reference: int
    feature_dim: int
    fd: float
    fd_se: float
    n_boot: int
    fd_floor: float
    accuracy: float | None
    label_counts: tuple[int, ...]
    label_entropy: float
    label_entropy_max: float
    w2_pixels: float | None
    w2_floor: float | None
    n_w2: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict of every field (NaN -> None)."""
        return to_jsonable(dataclasses.asdict(self))


def _rng(seed: Any) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise HbarInputError(f"seed must be an integer >= 0 or a numpy Generator, got {seed!r}")
    return np.random.default_rng(int(seed))


def sample_quality(
    samples_x: Any,
    reference_x: Any,
    classifier: Any,
    *,
    reference_labels: Any = None,
    n_w2: int = 500,
    n_boot: int = 20,
    seed: Any = 0,
) -> QualityResult:
    """Score model samples against real images with a trained classifier.

    Args:
        samples_x: model samples, (n, d) in model space (see :mod:`hbar.images.preprocess`).
        reference_x: real images, (m, d) in model space (test split; bin centres or dequantised).
        classifier: a :class:`hbar.images.classifier.Classifier` for the same image shape
            (anything with ``features(x)``, ``predict(x)``, ``n_classes``).
        reference_labels: (m,) labels of the reference images: gives ``accuracy``.
        n_w2: points per side for the pixel W2 (exact EMD costs O(n_w2^2) memory and about
            n_w2^3 time; 500 takes well under a second); 0 skips it.
        n_boot: bootstrap replicates for ``fd_se`` (0: NaN).
        seed: int or numpy Generator for the bootstrap and the random subsets.

    Returns:
        :class:`QualityResult`.
    """
    xs = check_points(samples_x, "samples_x")
    xr = check_points(reference_x, "reference_x")
    if xs.shape[1] != xr.shape[1]:
        raise HbarInputError(f"samples have d={xs.shape[1]} but the reference images have d={xr.shape[1]}")
    if xs.shape[0] < 2 or xr.shape[0] < 2:
        raise HbarInputError("sample_quality needs at least 2 samples and 2 reference images")
    n_w2 = 0 if n_w2 == 0 else check_positive_int(n_w2, "n_w2")
    n_boot = 0 if n_boot == 0 else check_positive_int(n_boot, "n_boot")
    rng = _rng(seed)
    fs = classifier.features(xs).astype(np.float64)
    fr = classifier.features(xr).astype(np.float64)
    fd = feature_frechet_distance(fs, fr)
    boots = [feature_frechet_distance(fs[rng.integers(0, len(fs), len(fs))], fr[rng.integers(0, len(fr), len(fr))])
             for _ in range(n_boot)]
    fd_se = float(np.std(boots, ddof=1)) if n_boot >= 2 else math.nan
    if xr.shape[0] >= 4:
        half = min(xs.shape[0], xr.shape[0] // 2)
        perm = rng.permutation(xr.shape[0])
        fd_floor = feature_frechet_distance(fr[perm[:half]], fr[perm[half:2 * half]])
    else:
        fd_floor = math.nan
    accuracy = None
    if reference_labels is not None:
        from hbar.images.classifier import classifier_accuracy

        accuracy = classifier_accuracy(classifier, xr, reference_labels)
    n_classes = int(classifier.n_classes)
    counts = np.bincount(classifier.predict(xs), minlength=n_classes)
    w2 = w2_floor = None
    n_used = 0
    if n_w2:
        n_used = min(n_w2, xs.shape[0], xr.shape[0])
        perm_s = rng.permutation(xs.shape[0])[:n_used]
        perm_r = rng.permutation(xr.shape[0])
        w2 = w2_empirical(xs[perm_s], xr[perm_r[:n_used]])
        if xr.shape[0] >= 2 * n_used:
            w2_floor = w2_empirical(xr[perm_r[n_used:2 * n_used]], xr[perm_r[:n_used]])
    return QualityResult(
        n_samples=int(xs.shape[0]), n_reference=int(xr.shape[0]), feature_dim=int(fs.shape[1]),
        fd=fd, fd_se=fd_se, n_boot=n_boot, fd_floor=fd_floor, accuracy=accuracy,
        label_counts=tuple(int(c) for c in counts), label_entropy=label_entropy(counts),
        label_entropy_max=math.log(n_classes), w2_pixels=w2, w2_floor=w2_floor, n_w2=n_used,
    )
