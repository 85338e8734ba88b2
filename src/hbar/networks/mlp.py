"""MLP score networks (docs/theory.md section 13.4 for the shared time embedding).

Every network is called as ``net(x, t)`` with ``x`` of shape (n, d) and ``t`` a scalar
(also accepted: a time per row, shape (n,) or (n, 1), which training uses), and returns
an (n, d) array, the model score s(x, t). The time is broadcast to a column and
concatenated with x.

* :class:`PaperMLP` is the network of Hirono, Tanaka & Fukushima (2024):
  concat(x, t) -> 3 x [Dense 128, swish] -> Dense d, raw t input.
* :class:`TimeEmbedMLP` feeds concat(x, t, sin(w_k t), cos(w_k t)) with fixed
  geometrically spaced frequencies w_k (:mod:`hbar.networks.embedding`) into the same kind
  of swish MLP.

Dense layers compute y = x W + b with W of shape (in, out), initialised W ~ N(0, 1/in)
(LeCun normal), b = 0. ``dtype`` (default float32) is the dtype of every parameter; the
forward pass computes in the promoted dtype of x and the parameters, so a float32 network
evaluated on float64 points returns float64.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from hbar.networks.embedding import check_embedding, geometric_frequencies, sinusoidal_embedding, time_column
from hbar.networks.layers import DTYPES, Dense, as_key, dtype_name
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["PaperMLP", "TimeEmbedMLP"]


def _check_arch(d: Any, width: Any, depth: Any) -> tuple[int, int, int]:
    return (check_positive_int(d, "network d"), check_positive_int(width, "network width"),
            check_positive_int(depth, "network depth"))


class _MLPBase(eqx.Module):
    """Shared forward pass: features(x, t) -> depth x [Dense width, swish] -> Dense d."""

    layers: tuple[Dense, ...]
    d: int = eqx.field(static=True)
    width: int = eqx.field(static=True)
    depth: int = eqx.field(static=True)
    dtype_name: str = eqx.field(static=True)

    # the training code may pass one time per row instead of a scalar
    accepts_time_vector: ClassVar[bool] = True
    kind: ClassVar[str] = "base"

    @abc.abstractmethod
    def _features(self, x: Array, tcol: Array) -> Array:
        """The input features of the first layer from x (n, d) and the time column (n, 1)."""

    def __call__(self, x: Array, t: Array | float) -> Array:
        """Model score s(x, t): x (n, d), t scalar or (n,) -> (n, d)."""
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise HbarInputError(f"{type(self).__name__} expects x of shape (n, {self.d}), got {x.shape}")
        dt = jnp.result_type(x.dtype, self.layers[0].weight.dtype)
        x = x.astype(dt)
        h = self._features(x, time_column(t, x.shape[0], dt))
        for layer in self.layers[:-1]:
            h = jax.nn.swish(layer(h))
        return self.layers[-1](h)

    def _config_fields(self) -> dict[str, Any]:
        """Architecture fields beyond name, d, width, depth, dtype (see hbar.networks.network_config)."""
        return {}

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable config of this network (see :func:`hbar.networks.network_config`)."""
        return {"name": self.kind, "d": self.d, "width": self.width, "depth": self.depth,
                **self._config_fields(), "dtype": self.dtype_name}


class PaperMLP(_MLPBase):
    """The paper's score network: concat(x, t) -> depth x [Dense width, swish] -> Dense d.

    Defaults width 128, depth 3 (three hidden layers), raw t as the (d+1)-th input.
    Parameters: (d+1) w + w + (depth-1)(w^2 + w) + w d + d."""

    kind: ClassVar[str] = "paper_mlp"

    def __init__(self, d: int, width: int = 128, depth: int = 3, *, key: Any, dtype: Any = "float32"):
        d, width, depth = _check_arch(d, width, depth)
        self.d, self.width, self.depth = d, width, depth
        self.dtype_name = dtype_name(dtype)
        dt = DTYPES[self.dtype_name]
        keys = jax.random.split(as_key(key), depth + 1)
        sizes = [d + 1] + [width] * depth + [d]
        self.layers = tuple(Dense(sizes[i], sizes[i + 1], keys[i], dt) for i in range(depth + 1))

    def _features(self, x: Array, tcol: Array) -> Array:
        return jnp.concatenate([x, tcol], axis=1)


class TimeEmbedMLP(_MLPBase):
    """Swish MLP on concat(x, t, sin(w_k t), cos(w_k t)), k = 1..embed_dim/2.

    The frequencies are fixed (not trained), geometrically spaced,
    w_k = max_freq^((k-1)/(K-1)) for K = embed_dim/2 (so from 1 to ``max_freq`` rad per
    unit time; with t in [0, 1] the slowest mode resolves the whole range and the fastest
    one times ~ 1/max_freq). Input width d + 1 + embed_dim; then depth x [Dense width, swish]
    -> Dense d."""

    embed_dim: int = eqx.field(static=True)
    max_freq: float = eqx.field(static=True)
    kind: ClassVar[str] = "time_embed_mlp"

    def __init__(
        self,
        d: int,
        width: int = 128,
        depth: int = 3,
        embed_dim: int = 16,
        *,
        key: Any,
        max_freq: float = 100.0,
        dtype: Any = "float32",
    ):
        d, width, depth = _check_arch(d, width, depth)
        embed_dim, max_freq = check_embedding(embed_dim, max_freq)
        self.d, self.width, self.depth = d, width, depth
        self.embed_dim, self.max_freq = int(embed_dim), max_freq
        self.dtype_name = dtype_name(dtype)
        dt = DTYPES[self.dtype_name]
        keys = jax.random.split(as_key(key), depth + 1)
        sizes = [d + 1 + self.embed_dim] + [width] * depth + [d]
        self.layers = tuple(Dense(sizes[i], sizes[i + 1], keys[i], dt) for i in range(depth + 1))

    def frequencies(self, dtype: Any = jnp.float32) -> Array:
        return geometric_frequencies(self.embed_dim, self.max_freq, dtype)

    def _features(self, x: Array, tcol: Array) -> Array:
        return jnp.concatenate([x, tcol, sinusoidal_embedding(tcol, self.embed_dim, self.max_freq)], axis=1)

    def _config_fields(self) -> dict[str, Any]:
        return {"embed_dim": self.embed_dim, "max_freq": self.max_freq}
