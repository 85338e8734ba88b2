"""Gaussian building blocks shared by scores, data, metrics, references and path densities."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from hbar.validation import HbarInputError

__all__ = ["as_covariance", "isotropic_logpdf"]


def as_covariance(c: Any, d: int, name: str = "cov") -> np.ndarray:
    """A (d, d) covariance from a scalar variance, a (d,) diagonal or a (d, d) matrix.

    Raises :class:`HbarInputError` for any other shape or a non-finite entry; symmetry and
    definiteness are the caller's to check where they matter."""
    arr = np.asarray(c, dtype=float)
    if arr.ndim == 0:
        arr = float(arr) * np.eye(d)
    elif arr.ndim == 1:
        if arr.shape[0] != d:
            raise HbarInputError(f"{name}: a diagonal must have length d={d}, got {arr.shape[0]}")
        arr = np.diag(arr)
    if arr.shape != (d, d):
        raise HbarInputError(f"{name} must be a scalar, (d,) or (d, d) with d={d}, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise HbarInputError(f"{name} contains NaN or inf")
    return arr


def isotropic_logpdf(resid: Any, var: Any) -> Any:
    """log N(resid; 0, var I) per row: -|r|^2/(2 var) - (d/2) log(2 pi var).

    resid (..., d); var broadcastable to resid[..., 0]. Traceable (jnp)."""
    d = resid.shape[-1]
    return -0.5 * jnp.sum(resid**2, axis=-1) / var - 0.5 * d * jnp.log(2 * jnp.pi * var)
