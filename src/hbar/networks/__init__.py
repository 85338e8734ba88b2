"""Score networks (equinox modules) satisfying the score contract of :mod:`hbar.scores`.

Every network is called as ``net(x, t)`` with ``x`` of shape (n, d) and ``t`` a scalar (or
one time per row, (n,), which training uses) and returns the model score s(x, t), (n, d).

* :class:`PaperMLP`, :class:`TimeEmbedMLP` (:mod:`hbar.networks.mlp`): swish MLPs for
  points;
* :class:`UNet` (:mod:`hbar.networks.unet`): a time-conditioned U-Net for images,
  noise-prediction parameterised, s = -eps_theta / sigma(t) (docs/theory.md section 13.4);
* :mod:`hbar.networks.embedding`: the sinusoidal time embedding both use;
* :mod:`hbar.networks.layers`: Dense, Conv2d, GroupNorm.

:func:`network_config` / :func:`network_from_config` round-trip the architecture through a
JSON-serialisable dict, which checkpoints store to rebuild the model before loading weights.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax

from hbar.networks.layers import DTYPES, Dense
from hbar.networks.mlp import PaperMLP, TimeEmbedMLP, _MLPBase
from hbar.networks.unet import UNet, check_image_shape, check_mults, square_shape
from hbar.schedules import Schedule, schedule_from_config
from hbar.serialization import to_jsonable
from hbar.validation import HbarInputError, check_positive_int

__all__ = [
    "Dense",
    "PaperMLP",
    "TimeEmbedMLP",
    "UNet",
    "NETWORKS",
    "network_from_config",
    "network_config",
    "validate_network_config",
    "param_count",
]

NETWORKS: dict[str, type[eqx.Module]] = {PaperMLP.kind: PaperMLP, TimeEmbedMLP.kind: TimeEmbedMLP, UNet.kind: UNet}

_DEFAULTS: dict[str, dict[str, Any]] = {
    "paper_mlp": {"width": 128, "depth": 3, "dtype": "float32"},
    "time_embed_mlp": {"width": 128, "depth": 3, "embed_dim": 16, "max_freq": 100.0, "dtype": "float32"},
    "unet": {"shape": None, "schedule": None, "base_channels": 16, "channel_mults": [1, 2, 2], "blocks": 1,
             "groups": 4, "embed_dim": 32, "max_freq": 1000.0, "dtype": "float32"},
}


def _validate_unet_fields(out: dict[str, Any]) -> None:
    """Normalise the U-Net fields in place: shape (C, H, W) as a list (default (1, s, s) when
    d = s^2), consistent with d; schedule as its to_config() dict (None allowed: filled in by
    the training config); channel_mults as a list."""
    if out["shape"] is None and out["d"] is not None:
        sq = square_shape(out["d"])
        if sq is None:
            raise HbarInputError(f"network 'unet' needs 'shape' (C, H, W): d={out['d']} is not a square")
        out["shape"] = sq
    if out["shape"] is not None:
        shape = check_image_shape(out["shape"])
        if out["d"] is not None and math.prod(shape) != out["d"]:
            raise HbarInputError(f"network 'unet' has shape {list(shape)} (C H W = {math.prod(shape)}) but d={out['d']}")
        out["shape"] = list(shape)
    out["channel_mults"] = list(check_mults(out["channel_mults"]))
    s = out["schedule"]
    if s is not None:
        out["schedule"] = to_jsonable((s if isinstance(s, Schedule) else schedule_from_config(s)).to_config())


def validate_network_config(cfg: Any, d: int | None = None) -> dict[str, Any]:
    """Check a network config and fill in defaults.

    ``cfg`` is ``{"name": "paper_mlp" | "time_embed_mlp" | "unet", "d": int, ...}``; ``d``
    may be missing from ``cfg`` when given as the argument (the data dimension); both given
    and different is an error. For "unet", ``shape`` (C, H, W) defaults to (1, s, s) when
    d = s^2 and ``schedule`` (a name or config dict) is required to build the network.
    Unknown fields, wrong types, or an unknown name raise :class:`HbarInputError`. Returns a
    new dict with every field (``d`` may stay None only if neither source gives it)."""
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
    for k in ("d", "width", "depth", "embed_dim", "base_channels", "blocks", "groups"):
        if k in out and out[k] is not None:
            out[k] = check_positive_int(out[k], f"network field {k!r}")
    if "embed_dim" in out and out["embed_dim"] % 2:
        raise HbarInputError(f"network field 'embed_dim' must be even, got {out['embed_dim']}")
    if "max_freq" in out:
        v = out["max_freq"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1:
            raise HbarInputError(f"network field 'max_freq' must be a number >= 1, got {v!r}")
        out["max_freq"] = float(v)
    if name == "unet":
        _validate_unet_fields(out)
    if not isinstance(out["dtype"], str) or out["dtype"] not in DTYPES:
        raise HbarInputError(f"network field 'dtype' must be one of {sorted(DTYPES)}, got {out['dtype']!r}")
    return out


def network_from_config(cfg: dict[str, Any], key: Any = 0, d: int | None = None) -> eqx.Module:
    """Build a network from its config (see :func:`validate_network_config`).
    ``key`` (a PRNG key or an int seed) initialises the weights; ``d`` optionally checks or
    supplies the input dimension."""
    c = validate_network_config(cfg, d)
    if c["d"] is None:
        raise HbarInputError("network config needs the data dimension 'd'")
    kw = {k: v for k, v in c.items() if k not in ("name", "d")}
    if c["name"] == "unet":
        if c["schedule"] is None:
            raise HbarInputError("network 'unet' needs its diffusion 'schedule' (a name or a config dict)")
        return UNet(key=key, **kw)
    return NETWORKS[c["name"]](c["d"], key=key, **kw)


def network_config(net: Any) -> dict[str, Any]:
    """The JSON-serialisable config of a network built by this module (inverse of
    :func:`network_from_config` up to the weights)."""
    if not isinstance(net, (_MLPBase, UNet)):
        raise HbarInputError(f"network_config: not an hbar network: {type(net).__name__}")
    return to_jsonable(net.config())


def param_count(net: Any) -> int:
    """Number of trainable scalars (inexact array leaves) of a module."""
    return int(sum(x.size for x in jax.tree_util.tree_leaves(eqx.filter(net, eqx.is_inexact_array))))
