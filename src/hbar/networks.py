"""Score networks (equinox modules) satisfying the score contract of :mod:`hbar.scores`.

Every network is called as ``net(x, t)`` with ``x`` of shape (n, d) and ``t`` a scalar
(also accepted: a time per row, shape (n,) or (n, 1), which training uses), and returns
an (n, d) array, the model score s(x, t). The time is broadcast to a column and
concatenated with x.

* :class:`PaperMLP` is the network of Hirono, Tanaka & Fukushima (2024):
  concat(x, t) -> 3 x [Dense 128, swish] -> Dense d, raw t input.
* :class:`TimeEmbedMLP` feeds concat(x, t, sin(w_k t), cos(w_k t)) with fixed
  geometrically spaced frequencies w_k into the same kind of swish MLP.

Dense layers compute y = x W + b with W of shape (in, out), initialised W ~ N(0, 1/in)
(LeCun normal), b = 0. ``dtype`` (default float32) is the dtype of every parameter; the
forward pass computes in the promoted dtype of x and the parameters, so a float32 network
evaluated on float64 points returns float64.

:func:`network_config` / :func:`network_from_config` round-trip the architecture through a
JSON-serialisable dict, which checkpoints store to rebuild the model before loading weights.
"""

from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.validation import HbarInputError, check_positive_int

__all__ = [
    "Dense",
    "PaperMLP",
    "TimeEmbedMLP",
    "NETWORKS",
    "network_from_config",
    "network_config",
    "validate_network_config",
    "param_count",
]

_DTYPES = {"float32": jnp.float32, "float64": jnp.float64}


def _dtype_name(dtype: Any) -> str:
    """Canonical name ('float32', ...) of a floating dtype; HbarInputError otherwise."""
    try:
        name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    except TypeError as err:
        raise HbarInputError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}") from err
    if name not in _DTYPES:
        raise HbarInputError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    if name == "float64" and not jax.config.jax_enable_x64:
        raise HbarInputError(
            "float64 parameters need JAX's 64-bit mode: call hbar.enable_x64() (or set "
            "JAX_ENABLE_X64=1) before building the network"
        )
    return name


def _as_key(key: Any) -> Array:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    return key


def _time_column(t: Array | float, n: int, dtype: Any) -> Array:
    """Broadcast a scalar time or a per-row time (n,) / (n, 1) to a column (n, 1)."""
    t = jnp.asarray(t, dtype=dtype)
    if t.ndim == 0:
        return jnp.full((n, 1), t, dtype=dtype)
    return jnp.broadcast_to(t.reshape(-1, 1), (n, 1))


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
        h = self._features(x, _time_column(t, x.shape[0], dt))
        for layer in self.layers[:-1]:
            h = jax.nn.swish(layer(h))
        return self.layers[-1](h)


class PaperMLP(_MLPBase):
    """The paper's score network: concat(x, t) -> depth x [Dense width, swish] -> Dense d.

    Defaults width 128, depth 3 (three hidden layers), raw t as the (d+1)-th input.
    Parameters: (d+1) w + w + (depth-1)(w^2 + w) + w d + d."""

    kind: ClassVar[str] = "paper_mlp"

    def __init__(self, d: int, width: int = 128, depth: int = 3, *, key: Any, dtype: Any = "float32"):
        d, width, depth = _check_arch(d, width, depth)
        self.d, self.width, self.depth = d, width, depth
        self.dtype_name = _dtype_name(dtype)
        dt = _DTYPES[self.dtype_name]
        keys = jax.random.split(_as_key(key), depth + 1)
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
        if isinstance(embed_dim, bool) or not isinstance(embed_dim, (int, np.integer)) or embed_dim < 2 or embed_dim % 2:
            raise HbarInputError(f"embed_dim must be an even integer >= 2, got {embed_dim!r}")
        try:
            max_freq = float(max_freq)
        except (TypeError, ValueError) as err:
            raise HbarInputError(f"max_freq must be a number >= 1, got {max_freq!r}") from err
        if not (math.isfinite(max_freq) and max_freq >= 1.0):
            raise HbarInputError(f"max_freq must be a finite number >= 1, got {max_freq!r}")
        self.d, self.width, self.depth = d, width, depth
        self.embed_dim, self.max_freq = int(embed_dim), max_freq
        self.dtype_name = _dtype_name(dtype)
        dt = _DTYPES[self.dtype_name]
        keys = jax.random.split(_as_key(key), depth + 1)
        sizes = [d + 1 + self.embed_dim] + [width] * depth + [d]
        self.layers = tuple(Dense(sizes[i], sizes[i + 1], keys[i], dt) for i in range(depth + 1))

    def frequencies(self, dtype: Any = jnp.float32) -> Array:
        K = self.embed_dim // 2
        if K == 1:
            return jnp.ones((1,), dtype)
        return jnp.asarray(self.max_freq ** (np.arange(K) / (K - 1)), dtype=dtype)

    def _features(self, x: Array, tcol: Array) -> Array:
        ang = tcol * self.frequencies(tcol.dtype)[None, :]
        return jnp.concatenate([x, tcol, jnp.sin(ang), jnp.cos(ang)], axis=1)


NETWORKS: dict[str, type[_MLPBase]] = {PaperMLP.kind: PaperMLP, TimeEmbedMLP.kind: TimeEmbedMLP}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper_mlp": {"width": 128, "depth": 3, "dtype": "float32"},
    "time_embed_mlp": {"width": 128, "depth": 3, "embed_dim": 16, "max_freq": 100.0, "dtype": "float32"},
}


def validate_network_config(cfg: Any, d: int | None = None) -> dict[str, Any]:
    """Check a network config and fill in defaults.

    ``cfg`` is ``{"name": "paper_mlp" | "time_embed_mlp", "d": int, ...}``; ``d`` may be
    missing from ``cfg`` when given as the argument (the data dimension); both given and
    different is an error. Unknown fields, wrong types, or an unknown name raise
    :class:`HbarInputError`. Returns a new dict with every field (``d`` may stay None
    only if neither source gives it)."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    if not isinstance(cfg, dict):
        raise HbarInputError(f"network config must be a dict with a 'name', got {cfg!r}")
    name = cfg.get("name", "paper_mlp")
    if name not in NETWORKS:
        raise HbarInputError(f"unknown network {name!r}; known: {sorted(NETWORKS)}")
    allowed = {"name", "d", *_DEFAULTS[name]}
    unknown = set(cfg) - allowed
    if unknown:
        raise HbarInputError(f"unknown field(s) {sorted(unknown)} in network config for {name!r}; allowed: {sorted(allowed)}")
    out: dict[str, Any] = {"name": name, "d": cfg.get("d"), **_DEFAULTS[name]}
    out.update({k: v for k, v in cfg.items() if k not in ("name", "d")})
    if d is not None:
        d = check_positive_int(d, "data dimension d")
        if out["d"] is not None and out["d"] != d:
            raise HbarInputError(f"network config has d={out['d']} but the data have dimension {d}")
        out["d"] = int(d)
    for k in ("d", "width", "depth", "embed_dim"):
        if k in out and out[k] is not None:
            out[k] = check_positive_int(out[k], f"network field {k!r}")
    if "embed_dim" in out and out["embed_dim"] % 2:
        raise HbarInputError(f"network field 'embed_dim' must be even, got {out['embed_dim']}")
    if "max_freq" in out:
        v = out["max_freq"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise HbarInputError(f"network field 'max_freq' must be a number >= 1, got {v!r}")
        out["max_freq"] = float(v)
    if not isinstance(out["dtype"], str) or out["dtype"] not in _DTYPES:
        raise HbarInputError(f"network field 'dtype' must be one of {sorted(_DTYPES)}, got {out['dtype']!r}")
    return out


def network_from_config(cfg: dict[str, Any], key: Any = 0, d: int | None = None) -> _MLPBase:
    """Build a network from its config (see :func:`validate_network_config`).
    ``key`` (a PRNG key or an int seed) initialises the weights; ``d`` optionally checks or
    supplies the input dimension."""
    c = validate_network_config(cfg, d)
    if c["d"] is None:
        raise HbarInputError("network config needs the data dimension 'd'")
    kw = {k: v for k, v in c.items() if k not in ("name", "d")}
    cls = NETWORKS[c["name"]]
    return cls(c["d"], key=key, **kw)


def network_config(net: Any) -> dict[str, Any]:
    """The JSON-serialisable config of a network built by this module (inverse of
    :func:`network_from_config` up to the weights)."""
    if not isinstance(net, _MLPBase):
        raise HbarInputError(f"network_config: not an hbar network: {type(net).__name__}")
    cfg: dict[str, Any] = {"name": net.kind, "d": net.d, "width": net.width, "depth": net.depth}
    if isinstance(net, TimeEmbedMLP):
        cfg.update(embed_dim=net.embed_dim, max_freq=net.max_freq)
    cfg["dtype"] = net.dtype_name
    return cfg


def param_count(net: Any) -> int:
    """Number of trainable scalars (inexact array leaves) of a module."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(net, eqx.is_inexact_array))))
