"""Layers shared by the score networks (docs/theory.md section 13.4): dense, 3x3 / 1x1
convolutions and group normalisation, plus the dtype and key helpers.

Every layer stores its parameters in the network's dtype and computes in the promoted dtype
of its input and parameters (a float32 network evaluated on float64 points returns float64).
Image tensors are NHWC: (n, H, W, C). Every layer acts on each example separately (no
batch statistics), so row i of a network's output depends on row i of its input only.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array, lax

from hbar.validation import HbarInputError

__all__ = ["DTYPES", "Dense", "Conv2d", "GroupNorm", "dtype_name", "as_key"]

DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def dtype_name(dtype: Any) -> str:
    """Canonical name ('float32', ...) of a floating dtype; HbarInputError otherwise."""
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError as err:
        raise HbarInputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}") from err
    if name not in DTYPES:
        raise HbarInputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise HbarInputError(
            "float64 parameters need JAX's 64-bit mode: call hbar.enable_x64() (or set "
            "JAX_ENABLE_X64=1) before building the network"
        )
    return name


def as_key(key: Any) -> Array:
    """A PRNG key from a key or an int seed."""
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    return key


def _normal(key: Array, shape: tuple[int, ...], std: float, dtype: Any) -> Array:
    draw = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
    return (jax.random.normal(key, shape, dtype=draw) * std).astype(dtype)


class Dense(eqx.Module):
    """Affine layer y = x W + b; W (in, out) ~ N(0, 1/in), b = 0."""

    weight: Array
    bias: Array

    def __init__(self, n_in: int, n_out: int, key: Array, dtype: Any = jnp.float32):
        draw = jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32
        self.weight = (jax.random.normal(key, (n_in, n_out), dtype=draw) / math.sqrt(n_in)).astype(dtype)
        self.bias = jnp.zeros((n_out,), dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return x @ self.weight + self.bias


class Conv2d(eqx.Module):
    """k x k convolution, 'same' padding (k // 2), stride 1 or 2, on NHWC tensors:
    (n, H, W, C_in) -> (n, ceil(H/s), ceil(W/s), C_out). Kernel (k, k, C_in, C_out) ~
    N(0, scale^2 / (k^2 C_in)), bias 0."""

    weight: Array
    bias: Array
    stride: int = eqx.field(static=True)

    def __init__(self, c_in: int, c_out: int, key: Array, *, kernel: int = 3, stride: int = 1,
                 scale: float = 1.0, dtype: Any = jnp.float32):
        self.weight = _normal(key, (kernel, kernel, c_in, c_out), scale / math.sqrt(kernel * kernel * c_in), dtype)
        self.bias = jnp.zeros((c_out,), dtype=dtype)
        self.stride = int(stride)

    def __call__(self, x: Array) -> Array:
        w = self.weight.astype(x.dtype)
        p = self.weight.shape[0] // 2
        y = lax.conv_general_dilated(x, w, (self.stride, self.stride), ((p, p), (p, p)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias.astype(x.dtype)


class GroupNorm(eqx.Module):
    """Group normalisation per example: the C channels are split into ``groups`` groups and
    each group of each example is standardised over (H, W, C/groups), then scaled and
    shifted per channel (gamma = 1, beta = 0 at initialisation). (n, H, W, C) -> same."""

    scale: Array
    shift: Array
    groups: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(self, channels: int, groups: int, dtype: Any = jnp.float32, eps: float = 1e-5):
        if channels % groups:
            raise HbarInputError(f"GroupNorm: {channels} channels are not divisible into {groups} groups")
        self.scale = jnp.ones((channels,), dtype=dtype)
        self.shift = jnp.zeros((channels,), dtype=dtype)
        self.groups, self.eps = int(groups), float(eps)

    def __call__(self, x: Array) -> Array:
        n, H, W, C = x.shape
        g = x.reshape(n, H, W, self.groups, C // self.groups)
        mean = jnp.mean(g, axis=(1, 2, 4), keepdims=True)
        var = jnp.mean(jnp.square(g - mean), axis=(1, 2, 4), keepdims=True)
        g = (g - mean) * lax.rsqrt(var + self.eps)
        return g.reshape(n, H, W, C) * self.scale.astype(x.dtype) + self.shift.astype(x.dtype)
