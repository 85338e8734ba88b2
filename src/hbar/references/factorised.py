"""Closed-form oracle for factorised Gaussian data and a diagonal affine score in any d
(docs/theory.md section 7), as a sum of 1-D oracles.

With a diagonal affine score (:class:`hbar.scores.DiagonalGaussianScore`), an isotropic prior
and a schedule with scalar f, g, the backward h-process acts on each coordinate separately:
every q^h_t is a product of 1-D Gaussians, so the per-point NLL(h) and its h-derivatives are
sums over coordinates of the 1-D values of :func:`hbar.references.gaussian_oracle`. The
coordinates are grouped by their 1-D parameters (score mean, variance, shift; data mean,
variance), so a d = 3072 problem built from a few parameter groups costs a few 1-D solves,
each with all the x values of its group.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hbar.references.gaussian import GaussianOracleResult, gaussian_oracle
from hbar.schedules import Schedule
from hbar.validation import HbarInputError, check_points

__all__ = ["factorised_oracle"]


def factorised_oracle(score: Any, schedule: Schedule, m0: Any, s0: Any, h: Any, x: Any = None,
                      **kwargs: Any) -> GaussianOracleResult:
    """Exact NLL(h), C1, C2 (per point with ``x``) for data N(m0, diag(s0)) and a
    :class:`hbar.scores.DiagonalGaussianScore` ``score``, in any d.

    m0, s0: (d,) data mean and variances; h, x, kwargs as in
    :func:`hbar.references.gaussian_oracle`. Returns a :class:`GaussianOracleResult` whose
    ``nll``, ``c1``, ``c2`` (and ``*_points``) are the sums of the 1-D results over coordinates,
    ``mean`` (nh, d) and ``cov`` (nh, d, d) diagonal; ``w2`` is the root of the summed squares.
    """
    from hbar.scores import AffineScore, DiagonalGaussianScore

    if not isinstance(score, DiagonalGaussianScore):
        raise HbarInputError("factorised_oracle needs a hbar.scores.DiagonalGaussianScore")
    d = score.dim
    m0a = np.broadcast_to(np.asarray(m0, dtype=np.float64), (d,))
    s0a = np.broadcast_to(np.asarray(s0, dtype=np.float64), (d,))
    xa = None if x is None else check_points(x, "x", d=d).astype(np.float64)
    params = np.stack([np.asarray(score.mean), np.asarray(score.var), np.asarray(score.shift), m0a, s0a], axis=1)
    groups, inverse = np.unique(params, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    acc: dict[str, Any] = {}
    mean = cov = None
    for gi, (m, v, sh, dm, dv) in enumerate(groups):
        cols = np.flatnonzero(inverse == gi)
        s1 = AffineScore([m], [[v]], schedule, scale_eps=score.scale_eps, shift=[sh])
        xg = None if xa is None else xa[:, cols].reshape(-1, 1)
        r = gaussian_oracle(s1, schedule, [dm], [[dv]], h, x=xg, **kwargs)
        if mean is None:
            nh = r.h.shape[0]
            mean, cov = np.zeros((nh, d)), np.zeros((nh, d))
        mean[:, cols] = r.mean[:, :1]
        cov[:, cols] = r.cov[:, 0, :1]
        for name in ("nll", "c1", "c2"):
            acc[name] = acc.get(name, 0.0) + len(cols) * getattr(r, name)
        acc["w2sq"] = acc.get("w2sq", 0.0) + len(cols) * r.w2**2
        if xa is not None:
            for name in ("nll_points", "c1_points", "c2_points"):
                per = getattr(r, name).reshape(nh, xa.shape[0], len(cols)).sum(axis=2)
                acc[name] = acc.get(name, 0.0) + per
    covm = np.zeros((mean.shape[0], d, d))
    covm[:, np.arange(d), np.arange(d)] = cov
    return GaussianOracleResult(
        h=r.h, nll=acc["nll"], c1=acc["c1"], c2=acc["c2"], w2=np.sqrt(acc["w2sq"]), mean=mean, cov=covm,
        nll_points=acc.get("nll_points"), c1_points=acc.get("c1_points"), c2_points=acc.get("c2_points"),
    )
