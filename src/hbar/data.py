"""Data sets for training and evaluating score models (docs/theory.md section 9).

Every generator has the signature ``fn(key_or_seed, n, **kwargs) -> np.ndarray`` of shape
(n, d), dtype float64. ``key_or_seed`` is a non-negative Python int (the normal case:
the output is then a deterministic function of the seed), a ``numpy.random.Generator``
or a JAX PRNG key (its key data seed a NumPy generator).

The registry :data:`DATASETS` maps a name to a :class:`DatasetSpec`; :func:`load_dataset`
is the validated entry point. Names are matched ignoring case, ``-`` and ``_``
(``"swiss-roll"``, ``"swissroll"`` and ``"swiss_roll"`` are the same data set).

Scalings (all stated per generator):

* ``swiss_roll``: the paper's. ``make_swiss_roll(n, noise=0.5)`` columns [0, 2] / 6.865.
* ``25gaussians``: the paper's. Centres (2i, 2j), i, j in {-2..2}, std 0.05, all / 2.828.
* 2-D benchmarks (8 Gaussians, checkerboard, moons, circles, rings, pinwheel, 2 spirals):
  generated here, scaled to lie roughly in [-3, 3]^2, comparable to N(0, I) priors.
* ``mixture1d``, ``gaussian``, ``gmm``: Gaussian (mixtures) with user parameters.
* ``digits``: scikit-learn's 8x8 digits (64-D, pixel levels 0..16), uniformly dequantised
  and mapped to [-1, 1): y = 2 (k + u) / 17 - 1, u ~ U[0, 1). See :data:`DIGITS_INFO`
  and :func:`digits_bits_per_dim` for the bits/dim convention.

Exact entropies (the best achievable NLL, in nats) are available through
:func:`dataset_entropy` where they are known: swiss roll and 25 Gaussians (docs/theory.md),
Gaussians (closed form 0.5 log det(2 pi e S)), the checkerboard (uniform density: log of
its area), 1-D mixtures (adaptive quadrature) and other Gaussian mixtures (Monte Carlo,
-mean log p(x_i) over 200 000 draws with a fixed seed, with its standard error).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from hbar.gaussian import as_covariance
from hbar.stats import mean_se
from hbar.validation import HbarInputError, check_number, check_points, check_positive_int

__all__ = [
    "DatasetSpec",
    "DATASETS",
    "DIGITS_INFO",
    "load_dataset",
    "load_points",
    "dataset_entropy",
    "dataset_dim",
    "canonical_name",
    "mixture_spec",
    "mixture_entropy",
    "mixture_logpdf",
    "digits_bits_per_dim",
    "swiss_roll",
    "twenty_five_gaussians",
    "eight_gaussians",
    "checkerboard",
    "moons",
    "circles",
    "rings",
    "pinwheel",
    "two_spirals",
    "mixture1d",
    "gaussian",
    "gmm",
    "digits",
]

SWISS_ROLL_SCALE = 6.865
GRID25_SCALE = 2.828

# --------------------------------------------------------------------------------------
# randomness


def _as_rng(key_or_seed: Any) -> np.random.Generator:
    """A NumPy generator from an int seed, a Generator, or a JAX PRNG key."""
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, (bool, np.bool_)):
        raise HbarInputError(f"seed must be a non-negative integer or a PRNG key, got {key_or_seed!r}")
    if isinstance(key_or_seed, (int, np.integer)):
        if int(key_or_seed) < 0:
            raise HbarInputError(f"seed must be a non-negative integer, got {key_or_seed}")
        return np.random.default_rng(int(key_or_seed))
    try:
        import jax

        arr = key_or_seed
        if hasattr(arr, "dtype") and jax.dtypes.issubdtype(arr.dtype, jax.dtypes.prng_key):
            arr = jax.random.key_data(arr)
        data = np.asarray(arr)
    except Exception as err:  # pragma: no cover - exotic inputs
        raise HbarInputError(f"cannot use {key_or_seed!r} as a seed or PRNG key: {err}") from err
    if data.dtype != np.uint32 or data.ndim != 1:
        raise HbarInputError(
            f"key_or_seed must be an int seed, a numpy Generator or a JAX PRNG key, got {key_or_seed!r}"
        )
    return np.random.default_rng([int(v) for v in data])


def _as_seed(key_or_seed: Any) -> int:
    """An int seed for scikit-learn generators (identity for int seeds)."""
    if isinstance(key_or_seed, (int, np.integer)) and not isinstance(key_or_seed, (bool, np.bool_)):
        _as_rng(key_or_seed)  # validation
        return int(key_or_seed)
    return int(_as_rng(key_or_seed).integers(0, 2**31 - 1))


def _n(n: Any) -> int:
    return check_positive_int(n, "n")


def _positive(v: Any, name: str) -> float:
    return check_number(v, name, positive=True)


def _nonneg(v: Any, name: str) -> float:
    return check_number(v, name, nonnegative=True)


# --------------------------------------------------------------------------------------
# Gaussian mixtures (shared by several data sets)


def _normalise_mixture(weights: Any, means: Any, covs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a mixture; returns weights (K,) summing to 1, means (K, d), covs (K, d, d).

    ``covs`` may be stds (K,) (isotropic), per-axis variances (K, d) are NOT accepted to
    avoid ambiguity with (K,) stds when d = 1; give full (K, d, d) covariances instead.
    """
    w = np.asarray(weights, dtype=float).reshape(-1)
    mu = np.asarray(means, dtype=float)
    if mu.ndim == 1:
        mu = mu[:, None]
    if mu.ndim != 2 or mu.shape[0] != w.shape[0]:
        raise HbarInputError(f"mixture: weights (K,) and means (K, d) expected, got shapes {w.shape}, {mu.shape}")
    K, d = mu.shape
    if K == 0:
        raise HbarInputError("mixture needs at least one component")
    if not (np.all(np.isfinite(w)) and np.all(w > 0)):
        raise HbarInputError(f"mixture weights must be finite and positive, got {w.tolist()}")
    if not np.all(np.isfinite(mu)):
        raise HbarInputError("mixture means must be finite")
    cv = np.asarray(covs, dtype=float)
    if cv.ndim == 0:
        cv = np.full(K, float(cv))
    if cv.ndim == 1:
        if cv.shape != (K,):
            raise HbarInputError(f"mixture: stds must have shape (K,) = ({K},), got {cv.shape}")
        if not (np.all(np.isfinite(cv)) and np.all(cv > 0)):
            raise HbarInputError(f"mixture stds must be finite and positive, got {cv.tolist()}")
        cv = (cv**2)[:, None, None] * np.eye(d)[None]
    if cv.shape != (K, d, d):
        raise HbarInputError(f"mixture: covs must be stds (K,) or covariances (K, d, d) = ({K}, {d}, {d}), got {cv.shape}")
    if not np.all(np.isfinite(cv)) or not np.allclose(cv, np.swapaxes(cv, 1, 2), atol=1e-12):
        raise HbarInputError("mixture covariances must be finite and symmetric")
    try:
        np.linalg.cholesky(cv)
    except np.linalg.LinAlgError as err:
        raise HbarInputError("mixture covariances must be positive definite") from err
    return w / w.sum(), mu, cv


def _sample_mixture(rng: np.random.Generator, n: int, w: np.ndarray, mu: np.ndarray, cv: np.ndarray) -> np.ndarray:
    """x = mu_k + L_k z with k ~ Categorical(w), z ~ N(0, I), L_k L_k^T = S_k. Shape (n, d)."""
    comp = rng.choice(w.shape[0], size=n, p=w)
    chol = np.linalg.cholesky(cv)
    z = rng.standard_normal((n, mu.shape[1]))
    return mu[comp] + np.einsum("nij,nj->ni", chol[comp], z)


def mixture_logpdf(x: Any, weights: Any, means: Any, covs: Any) -> np.ndarray:
    """log p(x) = log sum_k w_k N(x; mu_k, S_k) per row of x (n, d); returns (n,)."""
    w, mu, cv = _normalise_mixture(weights, means, covs)
    x = check_points(x, "x", d=mu.shape[1]).astype(float)
    chol = np.linalg.cholesky(cv)
    d = mu.shape[1]
    out = np.empty((x.shape[0], w.shape[0]))
    for k in range(w.shape[0]):
        y = np.linalg.solve(chol[k], (x - mu[k]).T)  # (d, n)
        logdet = 2.0 * np.sum(np.log(np.diag(chol[k])))
        out[:, k] = np.log(w[k]) - 0.5 * np.sum(y**2, axis=0) - 0.5 * logdet - 0.5 * d * math.log(2 * math.pi)
    m = out.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(out - m).sum(axis=1, keepdims=True)))[:, 0]


def mixture_entropy(
    weights: Any, means: Any, covs: Any, n_mc: int = 200_000, seed: int = 0
) -> tuple[float, float]:
    """Entropy H = -E_p[log p] of a Gaussian mixture in nats, with an error estimate.

    d = 1: adaptive quadrature (scipy ``quad``) of -p log p over mu +- 12 std of every
    component, split at the component means; the error is quad's absolute error estimate.
    d > 1: Monte Carlo with ``n_mc`` draws (seed fixed, so repeatable):
    H ~ -(1/N) sum_i log p(x_i), error = std(log p) / sqrt(N) (one standard error).
    """
    w, mu, cv = _normalise_mixture(weights, means, covs)
    if mu.shape[1] == 1:
        from scipy.integrate import quad

        sd = np.sqrt(cv[:, 0, 0])
        lo = float(np.min(mu[:, 0] - 12 * sd))
        hi = float(np.max(mu[:, 0] + 12 * sd))

        def integrand(v: float) -> float:
            lp = float(mixture_logpdf(np.array([[v]]), w, mu, cv)[0])
            return -math.exp(lp) * lp

        pts = sorted({float(m) for m in mu[:, 0]} | {float(m + s) for m, s in zip(mu[:, 0], sd)}
                     | {float(m - s) for m, s in zip(mu[:, 0], sd)})
        pts = [p for p in pts if lo < p < hi]
        val, err = quad(integrand, lo, hi, points=pts, limit=500, epsabs=1e-11, epsrel=1e-11)
        return float(val), float(max(err, 1e-10))
    rng = np.random.default_rng(seed)
    x = _sample_mixture(rng, check_positive_int(n_mc, "n_mc"), w, mu, cv)
    lp = mixture_logpdf(x, w, mu, cv)
    mean, se = mean_se(lp)
    return -mean, se


def gaussian_entropy(cov: Any) -> float:
    """Closed form H = 0.5 log det(2 pi e S) for N(m, S) in nats."""
    S = np.atleast_2d(np.asarray(cov, dtype=float))
    sign, logdet = np.linalg.slogdet(2 * math.pi * math.e * S)
    if sign <= 0:
        raise HbarInputError("covariance must be positive definite")
    return 0.5 * float(logdet)


# --------------------------------------------------------------------------------------
# the paper's data sets


def swiss_roll(key_or_seed: Any, n: int, noise: float = 0.5, scale: float = SWISS_ROLL_SCALE) -> np.ndarray:
    """The paper's swiss roll: ``make_swiss_roll(n, noise=0.5, random_state=seed)``,
    columns [0, 2], divided by 6.865. Shape (n, 2). Exact entropy 1.333 +- 0.004 nats
    (docs/theory.md section 9; only for the default noise and scale)."""
    from sklearn.datasets import make_swiss_roll

    x, _ = make_swiss_roll(_n(n), noise=_nonneg(noise, "noise"), random_state=_as_seed(key_or_seed))
    return np.ascontiguousarray(x[:, [0, 2]] / _positive(scale, "scale"), dtype=np.float64)


def _grid25_spec(std: float = 0.05, spacing: float = 2.0, scale: float = GRID25_SCALE):
    std = _positive(std, "std")
    spacing = _positive(spacing, "spacing")
    scale = _positive(scale, "scale")
    ij = np.array([(i, j) for i in range(-2, 3) for j in range(-2, 3)], dtype=float)
    means = spacing * ij / scale
    stds = np.full(25, std / scale)
    return np.full(25, 1.0 / 25), means, stds


def twenty_five_gaussians(
    key_or_seed: Any, n: int, std: float = 0.05, spacing: float = 2.0, scale: float = GRID25_SCALE
) -> np.ndarray:
    """The paper's 25 Gaussians: equal-weight components centred at (2i, 2j), i, j in
    {-2..2}, std 0.05, every coordinate divided by 2.828. Shape (n, 2).
    Entropy -2.015 +- 0.005 nats (docs/theory.md; for well separated components it is
    log 25 + log(2 pi e (0.05 / 2.828)^2) = -2.0139)."""
    w, mu, sd = _grid25_spec(std, spacing, scale)
    w, mu, cv = _normalise_mixture(w, mu, sd)
    return _sample_mixture(_as_rng(key_or_seed), _n(n), w, mu, cv)


# --------------------------------------------------------------------------------------
# common 2-D benchmarks (generated here)


def _eight_spec(radius: float = 2.0, std: float = 0.1):
    radius = _positive(radius, "radius")
    std = _positive(std, "std")
    ang = 2 * math.pi * np.arange(8) / 8
    means = radius * np.stack([np.cos(ang), np.sin(ang)], axis=1)
    return np.full(8, 1 / 8), means, np.full(8, std)


def eight_gaussians(key_or_seed: Any, n: int, radius: float = 2.0, std: float = 0.1) -> np.ndarray:
    """8 equal-weight isotropic Gaussians centred on a circle of radius 2 at angles
    k pi / 4, std 0.1. Shape (n, 2).

    Conventions differ in the literature: radius 2 is the usual choice (GAN mode-collapse
    benchmarks use radius 2 with std 0.02); the FFJORD-style set corresponds to
    ``radius=4/sqrt(2)`` (about 2.83) and ``std=0.5/sqrt(2)`` (about 0.35)."""
    w, mu, sd = _eight_spec(radius, std)
    w, mu, cv = _normalise_mixture(w, mu, sd)
    return _sample_mixture(_as_rng(key_or_seed), _n(n), w, mu, cv)


def checkerboard(key_or_seed: Any, n: int, scale: float = 1.0) -> np.ndarray:
    """Uniform density on the 8 'black' cells of a 4 x 4 board of unit cells covering
    [-2, 2]^2 (cell (a, b) filled when a + b is even), times ``scale``. Shape (n, 2).
    Exact entropy log(8 scale^2) (uniform density on area 8 scale^2)."""
    rng = _as_rng(key_or_seed)
    n = _n(n)
    scale = _positive(scale, "scale")
    x1 = rng.uniform(-2.0, 2.0, n)
    col = np.floor(x1)  # -2..1
    # choose one of the two filled cells of that column: rows with (col + row) even
    r = rng.integers(0, 2, n) * 2.0 - 2.0  # -2 or 0
    row = r + np.mod(col, 2.0)  # parity matching col
    x2 = row + rng.uniform(0.0, 1.0, n)
    return scale * np.stack([x1, x2], axis=1)


def moons(key_or_seed: Any, n: int, noise: float = 0.05, scale: float = 1.0) -> np.ndarray:
    """scikit-learn's two interleaved half circles (``make_moons``, unit radius, Gaussian
    noise 0.05), shifted by (-0.5, -0.25) to centre them on the origin, times ``scale``.
    Shape (n, 2)."""
    from sklearn.datasets import make_moons

    x, _ = make_moons(_n(n), noise=_nonneg(noise, "noise"), random_state=_as_seed(key_or_seed))
    return _positive(scale, "scale") * (x - np.array([0.5, 0.25]))


def circles(key_or_seed: Any, n: int, noise: float = 0.05, factor: float = 0.5, scale: float = 2.0) -> np.ndarray:
    """scikit-learn's two concentric circles (``make_circles``; outer radius 1, inner
    radius ``factor``, noise 0.05), times ``scale`` = 2 (radii 2 and 1). Shape (n, 2)."""
    from sklearn.datasets import make_circles

    factor = _positive(factor, "factor")
    if factor >= 1:
        raise HbarInputError(f"factor must be in (0, 1), got {factor}")
    x, _ = make_circles(_n(n), noise=_nonneg(noise, "noise"), factor=factor, random_state=_as_seed(key_or_seed))
    return _positive(scale, "scale") * x


def rings(key_or_seed: Any, n: int, n_rings: int = 4, max_radius: float = 2.0, noise: float = 0.05) -> np.ndarray:
    """``n_rings`` concentric rings of radii r_k = max_radius k / n_rings, k = 1..n_rings
    (0.5, 1, 1.5, 2 by default), each chosen with probability 1 / n_rings, angle uniform,
    Gaussian noise of std ``noise`` added to both coordinates. Shape (n, 2)."""
    rng = _as_rng(key_or_seed)
    n = _n(n)
    k = rng.integers(1, check_positive_int(n_rings, "n_rings") + 1, n)
    r = _positive(max_radius, "max_radius") * k / n_rings
    th = rng.uniform(0, 2 * math.pi, n)
    x = np.stack([r * np.cos(th), r * np.sin(th)], axis=1)
    return x + _nonneg(noise, "noise") * rng.standard_normal((n, 2))


def pinwheel(
    key_or_seed: Any,
    n: int,
    n_arms: int = 5,
    radial_std: float = 0.3,
    tangential_std: float = 0.1,
    rate: float = 0.25,
    scale: float = 1.5,
) -> np.ndarray:
    """Pinwheel: for arm k (uniform over ``n_arms``), draw a radial coordinate
    u ~ N(1, radial_std^2) and a tangential one v ~ N(0, tangential_std^2), then rotate
    (u, v) by the angle 2 pi k / n_arms + rate * exp(u) (arms bend outwards), times
    ``scale``. Shape (n, 2)."""
    rng = _as_rng(key_or_seed)
    n = _n(n)
    k = rng.integers(0, check_positive_int(n_arms, "n_arms"), n)
    u = 1.0 + _nonneg(radial_std, "radial_std") * rng.standard_normal(n)
    v = _nonneg(tangential_std, "tangential_std") * rng.standard_normal(n)
    ang = 2 * math.pi * k / n_arms + float(rate) * np.exp(u)
    c, s = np.cos(ang), np.sin(ang)
    return _positive(scale, "scale") * np.stack([c * u - s * v, s * u + c * v], axis=1)


def two_spirals(key_or_seed: Any, n: int, turns: float = 1.5, max_radius: float = 2.0, noise: float = 0.05) -> np.ndarray:
    """Two interleaved Archimedean spirals: angle theta = 2 pi turns sqrt(u), u ~ U[0, 1),
    radius r = max_radius theta / (2 pi turns); arm 1 is r (cos theta, sin theta), arm 2
    its reflection through the origin; Gaussian noise of std ``noise``. Shape (n, 2)."""
    rng = _as_rng(key_or_seed)
    n = _n(n)
    tmax = 2 * math.pi * _positive(turns, "turns")
    th = tmax * np.sqrt(rng.uniform(0, 1, n))
    r = _positive(max_radius, "max_radius") * th / tmax
    sign = np.where(rng.integers(0, 2, n) == 0, 1.0, -1.0)
    x = sign[:, None] * np.stack([r * np.cos(th), r * np.sin(th)], axis=1)
    return x + _nonneg(noise, "noise") * rng.standard_normal((n, 2))


# --------------------------------------------------------------------------------------
# Gaussians and mixtures with user parameters

_DEFAULT_1D = {"weights": (0.5, 0.5), "means": (-1.0, 1.0), "stds": (0.3, 0.3)}


def _mixture1d_spec(weights=_DEFAULT_1D["weights"], means=_DEFAULT_1D["means"], stds=_DEFAULT_1D["stds"]):
    w = np.asarray(weights, dtype=float).reshape(-1)
    mu = np.asarray(means, dtype=float).reshape(-1)
    sd = np.asarray(stds, dtype=float).reshape(-1)
    if not (w.shape == mu.shape == sd.shape):
        raise HbarInputError(f"mixture1d: weights, means, stds must have equal lengths, "
                             f"got {w.shape[0]}, {mu.shape[0]}, {sd.shape[0]}")
    return _normalise_mixture(w, mu[:, None], sd)


def mixture1d(
    key_or_seed: Any,
    n: int,
    weights: Any = _DEFAULT_1D["weights"],
    means: Any = _DEFAULT_1D["means"],
    stds: Any = _DEFAULT_1D["stds"],
) -> np.ndarray:
    """1-D Gaussian mixture sum_k w_k N(mu_k, s_k^2); default bimodal
    0.5 N(-1, 0.3^2) + 0.5 N(1, 0.3^2). Shape (n, 1). Weights are normalised."""
    w, mu, cv = _mixture1d_spec(weights, means, stds)
    return _sample_mixture(_as_rng(key_or_seed), _n(n), w, mu, cv)


def _gaussian_spec(mean: Any = None, cov: Any = None, d: int | None = None):
    """Resolve (mean (d,), cov (d, d)); defaults d = 2, mean 0, cov 0.25 I."""
    if d is not None:
        d = check_positive_int(d, "d")
    m = None if mean is None else np.atleast_1d(np.asarray(mean, dtype=float))
    if m is not None and m.ndim != 1:
        raise HbarInputError(f"gaussian: mean must be a vector, got shape {m.shape}")
    if d is None:
        if m is not None:
            d = m.shape[0]
        elif cov is not None and np.ndim(cov) >= 1:
            d = int(np.shape(cov)[0])
        else:
            d = 2
    if m is None:
        m = np.zeros(d)
    if m.shape != (d,):
        raise HbarInputError(f"gaussian: mean has dimension {m.shape[0]}, expected d={d}")
    c = as_covariance(0.25 if cov is None else cov, d, "gaussian: cov")
    if not np.all(np.isfinite(m)):
        raise HbarInputError("gaussian: mean must be finite")
    if not np.allclose(c, c.T, atol=1e-12):
        raise HbarInputError("gaussian: cov must be symmetric")
    try:
        np.linalg.cholesky(c)
    except np.linalg.LinAlgError as err:
        raise HbarInputError("gaussian: cov must be positive definite") from err
    return m, c


def gaussian(key_or_seed: Any, n: int, mean: Any = None, cov: Any = None, d: int | None = None) -> np.ndarray:
    """N(mean, cov) in any dimension. ``cov`` may be a scalar (times I), a vector of
    variances or a (d, d) matrix. Defaults: d = 2, mean 0, cov 0.25 I. Shape (n, d).
    Exact entropy 0.5 log det(2 pi e cov)."""
    m, c = _gaussian_spec(mean, cov, d)
    z = _as_rng(key_or_seed).standard_normal((_n(n), m.shape[0]))
    return m + z @ np.linalg.cholesky(c).T


def gmm(key_or_seed: Any, n: int, weights: Any = None, means: Any = None, covs: Any = None) -> np.ndarray:
    """General Gaussian mixture sum_k w_k N(mu_k, S_k): weights (K,), means (K, d),
    covs as stds (K,) or covariances (K, d, d). All three are required. Shape (n, d)."""
    if weights is None or means is None or covs is None:
        raise HbarInputError("gmm needs weights, means and covs")
    w, mu, cv = _normalise_mixture(weights, means, covs)
    return _sample_mixture(_as_rng(key_or_seed), _n(n), w, mu, cv)


# --------------------------------------------------------------------------------------
# scikit-learn digits

DIGITS_INFO: dict[str, Any] = {
    "dim": 64,
    "levels": 17,  # raw pixel values are the integers 0..16
    "raw_range": (0, 16),
    "scaled_range": (-1.0, 1.0),
    "bin_width": 2.0 / 17.0,  # width of one dequantisation bin after scaling
    "transform": "y = 2 (k + u) / 17 - 1 with u ~ U[0, 1) (dequantize=True) or u = 1/2",
    "n_images": 1797,
    "split": "fixed permutation (seed 0) of the 1797 images: first 1500 'train', last 297 'test'",
}
_DIGITS_N_TRAIN = 1500


@functools.lru_cache(maxsize=1)
def _digits_raw_labelled() -> tuple[np.ndarray, np.ndarray]:
    """Pixels (1797, 64) float64 and labels (1797,) int64 in the fixed split order (seed 0)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    perm = np.random.default_rng(0).permutation(bunch.data.shape[0])
    return bunch.data.astype(np.float64)[perm], bunch.target.astype(np.int64)[perm]


def _digits_raw() -> np.ndarray:
    return _digits_raw_labelled()[0]


def digits(
    key_or_seed: Any, n: int, dequantize: bool = True, part: str = "all", replace: bool | None = None
) -> np.ndarray:
    """scikit-learn's 8x8 digits, 64-D, scaled to [-1, 1).

    Raw pixel k in {0..16}; output y = 2 (k + u) / 17 - 1 with u ~ U[0, 1) (uniform
    dequantisation) or u = 1/2 (bin centres, ``dequantize=False``). ``part`` is 'all'
    (1797 images), 'train' (1500) or 'test' (297) of a fixed split. Images are drawn
    without replacement while n <= pool size (``replace=None``), else with replacement
    (fresh dequantisation noise keeps repeated images distinct). Shape (n, 64).
    For bits/dim use :func:`digits_bits_per_dim`.
    """
    rng = _as_rng(key_or_seed)
    n = _n(n)
    raw = _digits_raw()
    pools = {"all": raw, "train": raw[:_DIGITS_N_TRAIN], "test": raw[_DIGITS_N_TRAIN:]}
    if part not in pools:
        raise HbarInputError(f"digits: part must be one of {sorted(pools)}, got {part!r}")
    pool = pools[part]
    if replace is None:
        replace = n > pool.shape[0]
    if not replace and n > pool.shape[0]:
        raise HbarInputError(f"digits: asked for {n} images without replacement but part {part!r} has {pool.shape[0]}")
    idx = rng.choice(pool.shape[0], size=n, replace=bool(replace))
    k = pool[idx]
    u = rng.uniform(0.0, 1.0, k.shape) if dequantize else 0.5
    return 2.0 * (k + u) / 17.0 - 1.0


def digits_bits_per_dim(nll_nats: float, d: int = 64) -> float:
    """Bits per dimension of the 17-level pixel data from the NLL (nats per image) of the
    continuous density on the [-1, 1) scaling.

    With v = k + u (bin width 1) and y = 2 v / 17 - 1, p_v = p_y (2/17)^d, so the
    dequantisation bound -log P(k) <= -E_u log p_v gives
    bits/dim = nll_nats / (d ln 2) + log2(17 / 2)."""
    from hbar.likelihood import bits_per_dim

    return float(bits_per_dim(float(nll_nats), d, levels=17, data_range=(-1.0, 1.0)))


# --------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """A registered data set.

    ``fn(key_or_seed, n, **kwargs)`` generates points; ``dim`` is the dimension for the
    default kwargs (None if it depends on them); ``entropy(**kwargs)`` returns
    (value, error) in nats or None; ``mixture(**kwargs)`` returns (weights, means, covs)
    for Gaussian-mixture data sets; ``has_split`` marks data sets with a fixed
    train/test split selected by ``part``."""

    name: str
    fn: Callable[..., np.ndarray]
    description: str
    dim: int | None
    entropy: Callable[..., tuple[float, float] | None] | None = None
    mixture: Callable[..., tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None
    has_split: bool = False

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments accepted by ``fn`` and their defaults."""
        sig = inspect.signature(self.fn)
        return {k: p.default for k, p in list(sig.parameters.items())[2:]}


def _is_default(spec_fn: Callable, kw: dict[str, Any]) -> bool:
    defaults = {k: p.default for k, p in list(inspect.signature(spec_fn).parameters.items())[2:]}
    for k, v in kw.items():
        try:
            if not np.array_equal(np.asarray(v, dtype=float), np.asarray(defaults[k], dtype=float)):
                return False
        except (TypeError, ValueError):
            return False
    return True


def _entropy_swiss(**kw):
    return (1.333, 0.004) if _is_default(swiss_roll, kw) else None


def _entropy_grid25(**kw):
    if _is_default(twenty_five_gaussians, kw):
        return (-2.015, 0.005)
    return mixture_entropy(*_mixture_grid25(**kw))


def _mixture_grid25(**kw):
    return _normalise_mixture(*_grid25_spec(**kw))


def _mixture_eight(**kw):
    return _normalise_mixture(*_eight_spec(**kw))


def _mixture_1d(**kw):
    return _mixture1d_spec(**kw)


def _mixture_gauss(**kw):
    m, c = _gaussian_spec(**kw)
    return np.ones(1), m[None], c[None]


def _mixture_gmm(**kw):
    if any(kw.get(k) is None for k in ("weights", "means", "covs")):
        raise HbarInputError("gmm needs weights, means and covs")
    return _normalise_mixture(kw["weights"], kw["means"], kw["covs"])


def _entropy_checker(scale: float = 1.0):
    return (math.log(8.0 * _positive(scale, "scale") ** 2), 0.0)


def _entropy_gauss(**kw):
    _, c = _gaussian_spec(**kw)
    return (gaussian_entropy(c), 0.0)


def _entropy_from_mixture(mix: Callable) -> Callable[..., tuple[float, float]]:
    @functools.wraps(mix)
    def ent(**kw):
        return mixture_entropy(*mix(**kw))

    return ent


DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in [
        DatasetSpec("swiss_roll", swiss_roll, "paper's swiss roll (sklearn, cols [0,2] / 6.865)", 2, _entropy_swiss),
        DatasetSpec("25gaussians", twenty_five_gaussians, "paper's 5x5 grid of Gaussians / 2.828", 2,
                    _entropy_grid25, _mixture_grid25),
        DatasetSpec("8gaussians", eight_gaussians, "8 Gaussians on a circle of radius 2, std 0.1", 2,
                    _entropy_from_mixture(_mixture_eight), _mixture_eight),
        DatasetSpec("checkerboard", checkerboard, "uniform on 8 cells of a 4x4 board on [-2,2]^2", 2, _entropy_checker),
        DatasetSpec("moons", moons, "two interleaved half circles (sklearn), centred", 2),
        DatasetSpec("circles", circles, "two concentric circles of radii 2 and 1 (sklearn)", 2),
        DatasetSpec("rings", rings, "4 concentric rings of radii 0.5..2", 2),
        DatasetSpec("pinwheel", pinwheel, "5-arm pinwheel", 2),
        DatasetSpec("2spirals", two_spirals, "two interleaved spirals of radius 2", 2),
        DatasetSpec("mixture1d", mixture1d, "1-D Gaussian mixture (default 0.5 N(-1,.09) + 0.5 N(1,.09))", 1,
                    _entropy_from_mixture(_mixture_1d), _mixture_1d),
        DatasetSpec("gaussian", gaussian, "N(mean, cov) in any dimension (default 2-D, cov 0.25 I)", None,
                    _entropy_gauss, _mixture_gauss),
        DatasetSpec("gmm", gmm, "Gaussian mixture with user weights, means, covs", None,
                    _entropy_from_mixture(_mixture_gmm), _mixture_gmm),
        DatasetSpec("digits", digits, "sklearn 8x8 digits, dequantised to [-1,1), 64-D", 64, has_split=True),
    ]
}


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_ALIASES: dict[str, str] = {_key(k): k for k in DATASETS}
_ALIASES.update({"25gaussian": "25gaussians", "8gaussian": "8gaussians", "twospirals": "2spirals",
                 "spirals": "2spirals", "mixture": "mixture1d", "gauss": "gaussian", "normal": "gaussian"})


def canonical_name(name: str) -> str:
    """The registry name for ``name`` (case, '-' and '_' ignored); HbarInputError if unknown."""
    if not isinstance(name, str) or _key(name) not in _ALIASES:
        raise HbarInputError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return _ALIASES[_key(name)]


def _check_kwargs(spec: DatasetSpec, kw: dict[str, Any]) -> None:
    allowed = spec.kwargs
    unknown = set(kw) - set(allowed)
    if unknown:
        raise HbarInputError(
            f"unknown parameter(s) {sorted(unknown)} for data set {spec.name!r}; allowed: {sorted(allowed)}"
        )


def load_dataset(name: str, n: int, seed: Any = 0, **kwargs: Any) -> np.ndarray:
    """n points of the registered data set ``name`` as a float64 array (n, d).

    Deterministic for a fixed integer ``seed``. Unknown names or keyword arguments raise
    :class:`HbarInputError`."""
    spec = DATASETS[canonical_name(name)]
    _check_kwargs(spec, kwargs)
    x = spec.fn(seed, _n(n), **kwargs)
    return check_points(np.asarray(x, dtype=np.float64), name=f"data set {spec.name!r}")


def dataset_dim(name: str, **kwargs: Any) -> int:
    """Dimension d of the data set ``name`` with these parameters."""
    spec = DATASETS[canonical_name(name)]
    _check_kwargs(spec, kwargs)
    if spec.dim is not None and not kwargs:
        return spec.dim
    return int(spec.fn(0, 1, **kwargs).shape[1])


def dataset_entropy(name: str, **kwargs: Any) -> tuple[float, float] | None:
    """Exact (or numerically computed) differential entropy of the data distribution,
    (value, error) in nats, or None when unknown. The entropy is the lowest achievable
    expected NLL. Sources: docs/theory.md (swiss roll 1.333 +- 0.004, 25 Gaussians
    -2.015 +- 0.005; default parameters), closed forms (Gaussian, checkerboard; error 0),
    quadrature (1-D mixtures) or Monte Carlo with its standard error (other mixtures,
    see :func:`mixture_entropy`)."""
    spec = DATASETS[canonical_name(name)]
    _check_kwargs(spec, kwargs)
    if spec.entropy is None:
        return None
    return spec.entropy(**kwargs)


def mixture_spec(name: str, **kwargs: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights (K,), means (K, d), covs (K, d, d)) of a Gaussian-mixture data set
    (25gaussians, 8gaussians, mixture1d, gaussian, gmm), ready for
    ``hbar.scores.GaussianMixtureScore(weights, means, covs, schedule)``."""
    spec = DATASETS[canonical_name(name)]
    if spec.mixture is None:
        mixtures = sorted(k for k, s in DATASETS.items() if s.mixture is not None)
        raise HbarInputError(f"data set {spec.name!r} is not a Gaussian mixture; mixtures: {mixtures}")
    _check_kwargs(spec, kwargs)
    w, mu, cv = spec.mixture(**kwargs)
    return np.asarray(w, float), np.asarray(mu, float), np.asarray(cv, float)


# --------------------------------------------------------------------------------------
# user data files


_INDEX_NAMES = {"", "unnamed: 0", "index", "idx", "id", "#"}


def _read_text_table(path: str) -> tuple[np.ndarray, list[str] | None]:
    """Parse a comma (or whitespace) separated table of numbers; lines starting with '#' and
    blank lines are skipped. The first line is the header (returned) only if none of its fields
    is a number, or if its first field is empty (pandas' index header, e.g. ",0,1"); a first line
    mixing numbers and text (a data row with a typo) is an error naming the line and the field,
    never silently dropped as a header."""
    rows: list[list[float]] = []
    header: list[str] | None = None
    ncol = None
    with open(path, encoding="utf-8") as fh:
        try:
            lines = fh.readlines()
        except UnicodeDecodeError as err:
            raise HbarInputError(f"{path}: not a text file ({err})") from err
    first_data = True
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        tokens = [t.strip() for t in (line.split(",") if "," in line else line.split())]
        try:
            vals = [float(t) for t in tokens]
        except ValueError:
            numeric = [_is_float(t) for t in tokens]
            if first_data and not rows and (not any(numeric) or tokens[0] == ""):
                first_data = False  # header line
                header = tokens
                continue
            col = numeric.index(False)
            hint = ("; a header line must have no numeric field (comment it out with '#' if it is one)"
                    if first_data and not rows else "")
            raise HbarInputError(f"{path}, line {lineno}, field {col + 1}: cannot read {tokens[col]!r} as a "
                                 f"number{hint}") from None
        first_data = False
        if ncol is None:
            ncol = len(vals)
        elif len(vals) != ncol:
            raise HbarInputError(f"{path}, line {lineno}: {len(vals)} columns, expected {ncol} like the first row")
        rows.append(vals)
    if not rows:
        raise HbarInputError(f"{path}: no data rows found")
    return np.asarray(rows, dtype=np.float64), header


def _looks_like_index(arr: np.ndarray, header: list[str] | None) -> str | None:
    """Why the first column looks like a row index (pandas' ``to_csv`` writes one), or None."""
    if header is not None and len(header) == arr.shape[1] and header[0].strip().strip('"').lower() in _INDEX_NAMES:
        return f"its header is {header[0]!r}"
    if header is not None and len(header) == arr.shape[1] - 1:
        return "the header has one name fewer than the rows have columns"
    col = arr[:, 0]
    if arr.shape[1] > 1 and arr.shape[0] > 2 and (np.array_equal(col, np.arange(arr.shape[0]))
                                                   or np.array_equal(col, np.arange(1, arr.shape[0] + 1))):
        return "it counts the rows (0, 1, 2, ... or 1, 2, 3, ...)"
    return None


def _is_float(t: str) -> bool:
    try:
        float(t)
        return True
    except ValueError:
        return False


def load_points(path: str | os.PathLike, d: int | None = None, index_col: int | bool | None = None) -> np.ndarray:
    """Read user data points from ``.npy``, ``.npz`` (a single array, or key 'x' / 'data'),
    ``.csv`` or ``.txt`` (comma or whitespace separated, optional header line).

    Text tables: a first line that is not numeric is the header. Nothing is guessed
    silently about an index column: ``index_col=None`` (default) reads every column as data
    but raises HbarInputError when the first column looks like a row index (pandas'
    ``to_csv`` default: an empty or 'Unnamed: 0' header, or values 0, 1, 2, ...);
    ``index_col=k`` drops column k; ``index_col=False`` keeps every column without checking.

    Returns a float64 (n, d) array (a 1-D array is read as (n, 1)). Missing or unreadable
    files, non-numeric entries, NaN/inf, wrong rank, or a dimension different from ``d``
    raise :class:`HbarInputError` with the file name and the problem."""
    p = os.fspath(path)
    if not os.path.exists(p):
        raise HbarInputError(f"data file not found: {p}")
    if os.path.isdir(p):
        raise HbarInputError(f"data path is a directory, expected a .npy/.npz/.csv/.txt file: {p}")
    ext = os.path.splitext(p)[1].lower()
    if ext == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except Exception as err:
            raise HbarInputError(f"{p}: not a readable .npy file ({type(err).__name__}: {err})") from err
    elif ext == ".npz":
        try:
            with np.load(p, allow_pickle=False) as z:
                keys = list(z.keys())
                key = next((k for k in ("x", "data") if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise HbarInputError(f"{p}: .npz holds several arrays {keys}; name the data 'x' or 'data'")
                arr = z[key]
        except HbarInputError:
            raise
        except Exception as err:
            raise HbarInputError(f"{p}: not a readable .npz file ({type(err).__name__}: {err})") from err
    elif ext in (".csv", ".txt", ".tsv", ".dat"):
        arr, header = _read_text_table(p)
        if index_col is None:
            why = _looks_like_index(arr, header)
            if why is not None:
                raise HbarInputError(
                    f"{p}: the first column looks like a row index ({why}); pass index_col=0 (CLI: --index-col 0) "
                    "to drop it, or index_col=False (CLI: --index-col -1) to read it as data")
        elif index_col is not False:
            k = int(index_col)
            if not 0 <= k < arr.shape[1] or arr.shape[1] < 2:
                raise HbarInputError(f"{p}: index_col={k} but the table has {arr.shape[1]} column(s)")
            arr = np.delete(arr, k, axis=1)
    else:
        raise HbarInputError(f"{p}: unsupported file type {ext!r}; use .npy, .npz, .csv or .txt")
    if arr.dtype.kind not in "fiu":
        raise HbarInputError(f"{p}: numeric data expected, got dtype {arr.dtype}")
    return check_points(arr, name=f"data in {p}", d=d).astype(np.float64)
