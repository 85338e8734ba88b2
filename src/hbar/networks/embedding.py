"""Sinusoidal time embedding shared by :class:`hbar.networks.TimeEmbedMLP` and
:class:`hbar.networks.UNet` (docs/theory.md section 13.4).

For a time column t (n, 1) and K = embed_dim / 2 fixed, geometrically spaced frequencies

    w_k = max_freq^((k-1)/(K-1)),  k = 1..K   (w = (1,) when K = 1),

the embedding is concat(sin(w_k t), cos(w_k t)), shape (n, embed_dim). The frequencies are
not trained: with t in [0, 1] the slowest mode resolves the whole range, the fastest times
~ 1/max_freq.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.validation import HbarInputError

__all__ = ["check_embedding", "geometric_frequencies", "sinusoidal_embedding", "time_column"]


def check_embedding(embed_dim: Any, max_freq: Any) -> tuple[int, float]:
    """Validate (embed_dim even >= 2, max_freq finite >= 1); HbarInputError otherwise."""
    if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 2 or embed_dim % 2:
        raise HbarInputError(f"embed_dim must be an even integer >= 2, got {embed_dim!r}")
    try:
        max_freq = float(max_freq)
    except (TypeError, ValueError) as err:
        raise HbarInputError(f"max_freq must be a number >= 1, got {max_freq!r}") from err
    if not (math.isfinite(max_freq) and max_freq >= 1.0):
        raise HbarInputError(f"max_freq must be a finite number >= 1, got {max_freq!r}")
    return int(embed_dim), max_freq


def geometric_frequencies(embed_dim: int, max_freq: float, dtype: Any = jnp.float32) -> Array:
    """The K = embed_dim / 2 frequencies w_k = max_freq^((k-1)/(K-1)), shape (K,)."""
    K = embed_dim // 2
    if K == 1:
        return jnp.ones((1,), dtype)
    return jnp.asarray(max_freq ** (np.arange(K) / (K - 1)), dtype=dtype)


def sinusoidal_embedding(tcol: Array, embed_dim: int, max_freq: float) -> Array:
    """concat(sin(w t), cos(w t)) for a time column tcol (n, 1) -> (n, embed_dim)."""
    ang = tcol * geometric_frequencies(embed_dim, max_freq, tcol.dtype)[None, :]
    return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=1)


def time_column(t: Array | float, n: int, dtype: Any) -> Array:
    """Broadcast a scalar time or a per-row time (n,) / (n, 1) to a column (n, 1)."""
    t = jnp.asarray(t, dtype=dtype)
    if t.ndim == 0:
        return jnp.full((n, 1), t, dtype=dtype)
    return jnp.broadcast_to(t.reshape(-1, 1), (n, 1))
