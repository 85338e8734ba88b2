"""A time-conditioned U-Net score network for images (docs/theory.md section 13.4).

Contract: ``net(x, t) -> score``, x (n, d) flattened images with d = C H W (row-major over
(C, H, W); C = 1 for grey images, the layout of ``hbar.images.preprocess``), t a scalar or
one time per row (n,); returns (n, d). The image shape (C, H, W) and the diffusion schedule
are static fields, so ``net`` IS the score and every hbar function (sample, nll of order 0
and 1, path tools) takes it unchanged.

Parameterisation (noise prediction): the network eps_theta predicts the noise z of
x_t = alpha(t) x0 + sigma(t) z, and

    s(x, t) = - eps_theta(c_in(t) x, t / T) / sigma(t),    c_in(t) = 1 / sqrt(alpha(t)^2 + sigma(t)^2),

with alpha, sigma the schedule's marginal mean factor and std (c_in = 1 for VP schedules; it
keeps the input of order one for VE schedules). The time enters through the sinusoidal
embedding of t / T (:mod:`hbar.networks.embedding`) followed by Dense -> SiLU -> Dense.

Architecture (NHWC inside; every layer acts per example, group norm with no batch
statistics, so row i of the output depends only on row i of the input):

    conv3x3(C -> c_0)
    down, level l = 0..L-1:  ``blocks`` x ResBlock(c_l), then (l < L-1) conv3x3 stride 2
    middle:                  ResBlock(c_{L-1}), ResBlock(c_{L-1})
    up, level l = L-1..0:    (blocks + 1) x ResBlock(concat(h, skip) -> c_l), then (l > 0)
                             nearest-neighbour x2 upsampling + conv3x3(c_l -> c_{l-1})
    GroupNorm -> SiLU -> conv3x3(c_0 -> C)   =  eps_theta

with c_l = base_channels * channel_mults[l] and ResBlock(x) = skip(x) + conv(SiLU(GN(
conv(SiLU(GN(x))) + Dense(SiLU(temb))))), skip a 1x1 conv when the channel count changes.
H and W must be divisible by 2^(L-1) (28 x 28 with L = 3: 28 -> 14 -> 7; 8 x 8: 8 -> 4 -> 2).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import Array

from hbar.networks.embedding import check_embedding, sinusoidal_embedding, time_column
from hbar.networks.layers import DTYPES, Conv2d, Dense, GroupNorm, as_key, dtype_name
from hbar.schedules import Schedule, schedule_from_config
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["UNet", "ResBlock"]


class ResBlock(eqx.Module):
    """Residual block with the time embedding added after the first convolution."""

    norm1: GroupNorm
    conv1: Conv2d
    temb: Dense
    norm2: GroupNorm
    conv2: Conv2d
    skip: Conv2d | None

    def __init__(self, c_in: int, c_out: int, t_dim: int, groups: int, key: Array, dtype: Any):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        self.norm1 = GroupNorm(c_in, _groups(groups, c_in), dtype)
        self.conv1 = Conv2d(c_in, c_out, k1, dtype=dtype)
        self.temb = Dense(t_dim, c_out, k2, dtype)
        self.norm2 = GroupNorm(c_out, _groups(groups, c_out), dtype)
        self.conv2 = Conv2d(c_out, c_out, k3, dtype=dtype)
        self.skip = Conv2d(c_in, c_out, k4, kernel=1, dtype=dtype) if c_in != c_out else None

    def __call__(self, x: Array, temb: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = h + _dense(self.temb, jax.nn.silu(temb))[:, None, None, :]
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


def _dense(layer: Dense, x: Array) -> Array:
    return x @ layer.weight.astype(x.dtype) + layer.bias.astype(x.dtype)


def _groups(groups: int, channels: int) -> int:
    """The largest divisor of ``channels`` not above ``groups``."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return g


def _upsample2(x: Array) -> Array:
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class UNet(eqx.Module):
    """Time-conditioned U-Net score, s = -eps_theta / sigma(t) (see the module docstring).

    ``shape`` (C, H, W); ``schedule`` the diffusion schedule (a Schedule, a name or a config
    dict) whose sigma(t) converts predicted noise into a score; ``base_channels`` c_0,
    ``channel_mults`` (m_0, ..., m_{L-1}), ``blocks`` residual blocks per level on the way
    down, ``groups`` group-norm groups (reduced to a divisor of the channel count),
    ``embed_dim`` / ``max_freq`` of the sinusoidal time embedding (time-MLP width
    4 c_0), ``dtype`` of the parameters."""

    conv_in: Conv2d
    t_mlp: tuple[Dense, Dense]
    down: tuple[ResBlock, ...]
    downsample: tuple[Conv2d, ...]
    mid: tuple[ResBlock, ResBlock]
    up: tuple[ResBlock, ...]
    upsample: tuple[Conv2d, ...]
    norm_out: GroupNorm
    conv_out: Conv2d
    shape: tuple[int, int, int] = eqx.field(static=True)
    schedule: Schedule = eqx.field(static=True)
    base_channels: int = eqx.field(static=True)
    channel_mults: tuple[int, ...] = eqx.field(static=True)
    blocks: int = eqx.field(static=True)
    groups: int = eqx.field(static=True)
    embed_dim: int = eqx.field(static=True)
    max_freq: float = eqx.field(static=True)
    dtype_name: str = eqx.field(static=True)

    accepts_time_vector: ClassVar[bool] = True
    kind: ClassVar[str] = "unet"

    def __init__(
        self,
        shape: Any,
        schedule: Any,
        base_channels: int = 16,
        channel_mults: Any = (1, 2, 2),
        blocks: int = 1,
        groups: int = 4,
        embed_dim: int = 32,
        max_freq: float = 1000.0,
        *,
        key: Any,
        dtype: Any = "float32",
    ):
        C, H, W = check_image_shape(shape)
        mults = check_mults(channel_mults)
        base_channels = check_positive_int(base_channels, "base_channels")
        blocks = check_positive_int(blocks, "blocks")
        groups = check_positive_int(groups, "groups")
        embed_dim, max_freq = check_embedding(embed_dim, max_freq)
        L = len(mults)
        if H % 2 ** (L - 1) or W % 2 ** (L - 1):
            raise HbarInputError(f"UNet with {L} levels needs H and W divisible by {2 ** (L - 1)}, got {H} x {W}")
        self.shape, self.base_channels, self.channel_mults = (C, H, W), base_channels, mults
        self.blocks, self.groups, self.embed_dim, self.max_freq = blocks, groups, embed_dim, max_freq
        self.schedule = schedule if isinstance(schedule, Schedule) else schedule_from_config(schedule)
        self.dtype_name = dtype_name(dtype)
        dt = DTYPES[self.dtype_name]
        keys = iter(jax.random.split(as_key(key), 4 * L * (blocks + 2) + 16))
        t_dim = 4 * base_channels
        chans = [base_channels * m for m in mults]
        self.conv_in = Conv2d(C, chans[0], next(keys), dtype=dt)
        self.t_mlp = (Dense(embed_dim, t_dim, next(keys), dt), Dense(t_dim, t_dim, next(keys), dt))
        down, downsample, skips = [], [], [chans[0]]
        c = chans[0]
        for lvl, cl in enumerate(chans):
            for _ in range(blocks):
                down.append(ResBlock(c, cl, t_dim, groups, next(keys), dt))
                c = cl
                skips.append(c)
            if lvl < L - 1:
                downsample.append(Conv2d(c, c, next(keys), stride=2, dtype=dt))
                skips.append(c)
        self.down, self.downsample = tuple(down), tuple(downsample)
        self.mid = (ResBlock(c, c, t_dim, groups, next(keys), dt), ResBlock(c, c, t_dim, groups, next(keys), dt))
        up, upsample = [], []
        for lvl in reversed(range(L)):
            for _ in range(blocks + 1):
                up.append(ResBlock(c + skips.pop(), chans[lvl], t_dim, groups, next(keys), dt))
                c = chans[lvl]
            if lvl > 0:
                upsample.append(Conv2d(c, chans[lvl - 1], next(keys), dtype=dt))
                c = chans[lvl - 1]
        self.up, self.upsample = tuple(up), tuple(upsample)
        self.norm_out = GroupNorm(c, _groups(groups, c), dt)
        self.conv_out = Conv2d(c, C, next(keys), dtype=dt)

    @property
    def d(self) -> int:
        """The flattened dimension C H W."""
        C, H, W = self.shape
        return C * H * W

    def eps(self, x: Array, t: Array | float) -> Array:
        """Predicted noise eps_theta(c_in(t) x, t / T): x (n, d), t scalar or (n,) -> (n, d)."""
        x = jnp.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d:
            raise HbarInputError(f"UNet expects x of shape (n, {self.d}), got {x.shape}")
        dt = jnp.result_type(x.dtype, self.conv_in.weight.dtype)
        n = x.shape[0]
        x = x.astype(dt)
        tcol = time_column(t, n, dt)
        a, s = self.schedule.alpha(tcol), self.schedule.sigma(tcol)
        h = (x * jax.lax.rsqrt(a * a + s * s)).reshape(n, *self.shape).transpose(0, 2, 3, 1)  # NCHW -> NHWC
        temb = sinusoidal_embedding(tcol / self.schedule.T, self.embed_dim, self.max_freq)
        temb = _dense(self.t_mlp[1], jax.nn.silu(_dense(self.t_mlp[0], temb)))
        h = self.conv_in(h)
        hs = [h]
        blocks, L = iter(self.down), len(self.channel_mults)
        for lvl in range(L):
            for _ in range(self.blocks):
                h = next(blocks)(h, temb)
                hs.append(h)
            if lvl < L - 1:
                h = self.downsample[lvl](h)
                hs.append(h)
        h = self.mid[1](self.mid[0](h, temb), temb)
        blocks, ups = iter(self.up), iter(self.upsample)
        for lvl in reversed(range(L)):
            for _ in range(self.blocks + 1):
                h = next(blocks)(jnp.concatenate([h, hs.pop()], axis=-1), temb)
            if lvl > 0:
                h = next(ups)(_upsample2(h))
        h = self.conv_out(jax.nn.silu(self.norm_out(h)))
        return h.transpose(0, 3, 1, 2).reshape(n, self.d)

    def __call__(self, x: Array, t: Array | float) -> Array:
        """Model score s(x, t) = -eps_theta / sigma(t): x (n, d), t scalar or (n,) -> (n, d)."""
        x = jnp.asarray(x)
        e = self.eps(x, t)
        return -e / self.schedule.sigma(time_column(t, x.shape[0], e.dtype))

    def config(self) -> dict[str, Any]:
        """The JSON-serialisable config (see :func:`hbar.networks.network_config`)."""
        return {"name": self.kind, "d": self.d, "shape": list(self.shape), "schedule": self.schedule.to_config(),
                "base_channels": self.base_channels, "channel_mults": list(self.channel_mults),
                "blocks": self.blocks, "groups": self.groups, "embed_dim": self.embed_dim,
                "max_freq": self.max_freq, "dtype": self.dtype_name}


def check_image_shape(shape: Any) -> tuple[int, int, int]:
    """(C, H, W) of positive ints; (H, W) means C = 1."""
    try:
        vals = tuple(shape)
    except TypeError:
        raise HbarInputError(f"image shape must be (C, H, W) or (H, W), got {shape!r}") from None
    if len(vals) == 2:
        vals = (1, *vals)
    if len(vals) != 3:
        raise HbarInputError(f"image shape must be (C, H, W) or (H, W), got {shape!r}")
    return tuple(check_positive_int(v, "image shape entry") for v in vals)  # type: ignore[return-value]


def check_mults(mults: Any) -> tuple[int, ...]:
    """Channel multipliers: a non-empty sequence of positive ints."""
    try:
        vals = tuple(mults)
    except TypeError:
        raise HbarInputError(f"channel_mults must be a list of positive integers, got {mults!r}") from None
    if not vals:
        raise HbarInputError("channel_mults must not be empty")
    return tuple(check_positive_int(v, "channel_mults entry") for v in vals)


def square_shape(d: int) -> tuple[int, int, int] | None:
    """(1, s, s) when d = s^2, else None (the default image shape of a d-dimensional U-Net)."""
    s = math.isqrt(int(d))
    return (1, s, s) if s * s == d else None
