"""The Gaussian (probabilistic PCA) baseline for image likelihoods, in closed form
(docs/theory.md section 13.3).

Fit on model-space points x_i in R^d (dequantised training images): mean mu = mean_i x_i,
maximum-likelihood covariance S = (1/n) sum_i (x_i - mu)(x_i - mu)^T with eigen-decomposition
S = sum_j lambda_j u_j u_j^T (lambda_1 >= ... >= lambda_d). The probabilistic-PCA model
(Tipping & Bishop 1999) with k components keeps the top k directions and replaces the rest by
an isotropic residual variance, the mean of the discarded eigenvalues:

    C = U_k diag(lambda_1..k) U_k^T + sigma^2 (I - U_k U_k^T),
    sigma^2 = (1 / (d - k)) sum_{j > k} lambda_j                 (no residual when k = d),

every variance floored at ``floor``. This is the maximum-likelihood PPCA fit; k = d (with a
floor below the smallest eigenvalue) is the full-covariance Gaussian MLE. In closed form

    -log N(x; mu, C) = 1/2 [ d log 2 pi + sum_{j<=k} log lambda_j + (d - k) log sigma^2
                             + sum_{j<=k} a_j^2 / lambda_j + (|x - mu|^2 - sum_{j<=k} a_j^2) / sigma^2 ],
    a_j = u_j . (x - mu).

Dequantisation average, exact: for x = x_c + w (u - 1/2), u ~ U[0, 1)^d (bin width w = 2 / levels
in model space, x_c the bin centres), E_u[-log N(x)] = -log N(x_c) + (w^2 / 24) tr C^{-1}.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

from hbar.validation import HbarInputError, check_number, check_points, check_positive_int

__all__ = ["GaussianBaseline", "DEFAULT_FLOOR", "select_k", "image_baseline"]

#: Default eigenvalue floor (model-space variance). Dequantisation alone gives every pixel a
#: variance of at least (2 / levels)^2 / 12 (2.0e-5 for 256 levels), so the floor is inactive
#: on dequantised data and only guards degenerate inputs.
DEFAULT_FLOOR = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianBaseline:
    """A fitted (P)PCA Gaussian: ``mean`` (d,), ``components`` (d, k) orthonormal columns,
    ``variances`` (k,) (descending, floored), ``residual_variance`` sigma^2 (0 when k = d)."""

    mean: np.ndarray
    components: np.ndarray
    variances: np.ndarray
    residual_variance: float
    floor: float

    @property
    def d(self) -> int:
        return int(self.mean.shape[0])

    @property
    def k(self) -> int:
        return int(self.variances.shape[0])

    @classmethod
    def fit(cls, x: Any, k: int | str = "all", floor: float = DEFAULT_FLOOR) -> GaussianBaseline:
        """Maximum-likelihood fit to points x (n, d): mean, covariance S with 1/n, top ``k``
        eigen-directions (``"all"``: k = d) and residual variance = mean of the rest; all
        variances floored at ``floor`` (> 0)."""
        x = check_points(x, "x").astype(np.float64)
        d = x.shape[1]
        floor = check_number(floor, "floor", positive=True)
        kk = d if (isinstance(k, str) and k == "all") else None
        if kk is None:
            if isinstance(k, str):
                raise HbarInputError(f"k must be a positive integer <= d or 'all', got {k!r}")
            kk = check_positive_int(k, "k")
            if kk > d:
                raise HbarInputError(f"k = {kk} exceeds the dimension d = {d}")
        return cls._from_spectrum(*_spectrum(x), kk, floor)

    @classmethod
    def _from_spectrum(cls, mu: np.ndarray, lam: np.ndarray, vec: np.ndarray, k: int, floor: float) -> GaussianBaseline:
        d = mu.shape[0]
        resid = max(float(lam[k:].mean()), floor) if k < d else 0.0
        return cls(mean=mu, components=np.ascontiguousarray(vec[:, :k]), variances=np.maximum(lam[:k], floor),
                   residual_variance=resid, floor=floor)

    # ---------------------------------------------------------------------------------

    def covariance(self) -> np.ndarray:
        """The implied covariance C (d, d) (for checks; O(d^2) memory)."""
        u = self.components
        c = (u * self.variances) @ u.T
        if self.k < self.d:
            c = c + self.residual_variance * (np.eye(self.d) - u @ u.T)
        return c

    def logdet(self) -> float:
        """log det C = sum_j log lambda_j + (d - k) log sigma^2."""
        out = float(np.sum(np.log(self.variances)))
        if self.k < self.d:
            out += (self.d - self.k) * math.log(self.residual_variance)
        return out

    def trace_precision(self) -> float:
        """tr C^{-1} = sum_j 1 / lambda_j + (d - k) / sigma^2."""
        out = float(np.sum(1.0 / self.variances))
        if self.k < self.d:
            out += (self.d - self.k) / self.residual_variance
        return out

    def nll(self, x: Any) -> np.ndarray:
        """-log N(x; mu, C) in nats per row of x (n, d); shape (n,). Closed form (module doc)."""
        x = check_points(x, "x", d=self.d).astype(np.float64)
        r = x - self.mean
        a = r @ self.components  # (n, k)
        quad = np.sum(a**2 / self.variances, axis=1)
        if self.k < self.d:
            quad = quad + (np.sum(r**2, axis=1) - np.sum(a**2, axis=1)) / self.residual_variance
        return 0.5 * (self.d * math.log(2 * math.pi) + self.logdet() + quad)

    def expected_nll(self, x_centre: Any, bin_width: float) -> np.ndarray:
        """E_u[-log N(x_c + w (u - 1/2))] over u ~ U[0, 1)^d, exactly:
        nll(x_c) + (w^2 / 24) tr C^{-1}. ``x_centre`` (n, d) are bin centres; shape (n,)."""
        w = check_number(bin_width, "bin_width", positive=True)
        return self.nll(x_centre) + (w**2 / 24.0) * self.trace_precision()

    def bits_per_dim(self, x_test: Any, levels: int) -> float:
        """Mean bits/dim of (dequantised) model-space test points x_test (n, d):
        mean nll / (d ln 2) + log2(levels / 2) (:func:`hbar.images.preprocess.bits_per_dim`)."""
        from hbar.images.preprocess import bits_per_dim

        return float(bits_per_dim(float(np.mean(self.nll(x_test))), self.d, levels))

    def sample(self, key_or_rng: Any, n: int) -> np.ndarray:
        """n draws (n, d): mu + U_k (sqrt(lambda) z_1) + sigma (I - U_k U_k^T) z_2, z ~ N(0, I).
        ``key_or_rng``: int seed, numpy Generator or JAX key."""
        from hbar.data import _as_rng

        rng = _as_rng(key_or_rng)
        n = check_positive_int(n, "n")
        u = self.components
        out = self.mean + (rng.standard_normal((n, self.k)) * np.sqrt(self.variances)) @ u.T
        if self.k < self.d:
            z = rng.standard_normal((n, self.d))
            out = out + math.sqrt(self.residual_variance) * (z - (z @ u) @ u.T)
        return out


def _spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (d,), eigenvalues (d,) descending (clipped at 0) and eigenvectors (d, d) of the
    1/n covariance of x (n, d)."""
    mu = x.mean(axis=0)
    xc = x - mu
    lam, vec = np.linalg.eigh((xc.T @ xc) / x.shape[0])
    order = np.argsort(lam)[::-1]
    return mu, np.clip(lam[order], 0.0, None), vec[:, order]


def select_k(x: Any, candidates: Any = None, val_fraction: float = 0.1, seed: int = 0,
             floor: float = DEFAULT_FLOOR) -> tuple[int, dict[int, float]]:
    """Choose the number of PPCA components by held-out likelihood on the training data only:
    fit on a random (1 - val_fraction) part of x (n, d), score the mean NLL (nats) of the rest
    for every candidate k (default: a grid from 1 to d), return the best k and all scores."""
    x = check_points(x, "x").astype(np.float64)
    n, d = x.shape
    f = check_number(val_fraction, "val_fraction", positive=True)
    floor = check_number(floor, "floor", positive=True)
    n_val = int(round(f * n))
    if not 1 <= n_val < n - 1:
        raise HbarInputError(f"val_fraction {f} leaves no validation or training points for n = {n}")
    if candidates is None:
        candidates = sorted({k for k in (1, 2, 5, 10, 20, 50, 100, 150, 200, 300, 400, 500, 600, 700) if k < d} | {d})
    ks = [check_positive_int(k, "k") for k in candidates]
    if max(ks) > d:
        raise HbarInputError(f"candidate k = {max(ks)} exceeds the dimension d = {d}")
    perm = np.random.default_rng(seed).permutation(n)
    fit_part, val_part = x[perm[n_val:]], x[perm[:n_val]]
    mu, lam, vec = _spectrum(fit_part)
    scores = {k: float(GaussianBaseline._from_spectrum(mu, lam, vec, k, floor).nll(val_part).mean()) for k in ks}
    return min(scores, key=scores.__getitem__), scores


def image_baseline(name: str, k: int | str = "cv", floor: float = DEFAULT_FLOOR, seed: int = 0,
                   n_train: int | None = None) -> dict[str, Any]:
    """The baseline numbers for an image data set: fit on the training split dequantised once
    with ``default_rng(seed)`` (first ``n_train`` of the seeded permutation, or all) with ``k``
    components (an int, ``"all"``, or ``"cv"``: chosen by :func:`select_k` on the training
    split, 10 % held out), then the
    test bits/dim exactly averaged over dequantisation noise (:meth:`GaussianBaseline.expected_nll`)
    and, as a check, on one dequantised draw. Returns a JSON-able dict."""
    import time

    from hbar.images.datasets import load_images
    from hbar.images.preprocess import bits_per_dim, to_model_space
    from hbar.stats import mean_se

    t0 = time.perf_counter()
    k_rule = k if isinstance(k, str) else int(k)
    train = load_images(name, "train", n=n_train, seed=seed)
    test = load_images(name, "test")
    rng = np.random.default_rng(seed)
    x_train = to_model_space(train.images, train.levels, rng)
    val_scores = None
    if isinstance(k, str) and k == "cv":
        k, val_scores = select_k(x_train, seed=seed, floor=floor)
    model = GaussianBaseline.fit(x_train, k=k, floor=floor)
    nll_exact = model.expected_nll(to_model_space(test.images, test.levels), 2.0 / test.levels)
    nll_draw = model.nll(to_model_space(test.images, test.levels, rng))
    m, se = mean_se(nll_exact)
    m1, se1 = mean_se(nll_draw)
    to_bpd = 1.0 / (model.d * math.log(2.0))
    return {
        "dataset": train.name, "k": model.k, "k_rule": k_rule, "floor": model.floor, "seed": seed,
        "validation_nll_by_k": val_scores,
        "n_train": train.n, "n_test": test.n, "d": model.d, "levels": test.levels,
        "residual_variance": model.residual_variance,
        "floored_variances": int(np.sum(model.variances <= model.floor)),
        "test_nll_nats": float(m), "test_nll_se": float(se),
        "test_bits_per_dim": float(bits_per_dim(m, model.d, test.levels)), "test_bits_per_dim_se": float(se * to_bpd),
        "test_bits_per_dim_one_draw": float(bits_per_dim(m1, model.d, test.levels)),
        "test_bits_per_dim_one_draw_se": float(se1 * to_bpd),
        "train_bits_per_dim": float(bits_per_dim(float(np.mean(model.expected_nll(
            to_model_space(train.images, train.levels), 2.0 / train.levels))), model.d, train.levels)),
        "seconds": time.perf_counter() - t0,
    }
