"""Image preprocessing: uniform dequantisation to the model space [-1, 1) and bits/dim
(docs/theory.md sections 13.1 and 13.2).

Pixel values are integers k in {0, ..., levels - 1} (levels = 256 for 8-bit images, 17 for
scikit-learn's digits). The model space is the flattened

    x = 2 (k + u) / levels - 1  in [-1, 1)^d,   d = H W,

with u in [0, 1)^d: u ~ U[0, 1)^d for training and likelihoods (uniform dequantisation),
u = 1/2 (bin centres) for display. Each pixel bin has width 2 / levels in model space, so a
density p on [-1, 1)^d bounds the discrete log-likelihood by
-log P(k) <= -E_u log p(x) + d log(2 / levels), i.e.

    bits/dim = NLL(x) / (d ln 2) + log2(levels / 2)

(7 bits for 256 levels, log2(8.5) = 3.087 for 17); the uniform density on [-1, 1)^d gives
exactly log2(levels) bits/dim. The formula itself lives in :func:`hbar.likelihood.bits_per_dim`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hbar.validation import HbarInputError, check_positive_int

__all__ = ["DATA_RANGE", "to_model_space", "from_model_space", "bits_per_dim", "dequantize_jax"]

#: The model-space interval the pixels are mapped to.
DATA_RANGE: tuple[float, float] = (-1.0, 1.0)
# Round-trip guards (float64): offsets are clipped to <= 1 - 2^-24 and the inverse adds 2^-30
# before flooring; both far exceed the rounding error ~ levels 2^-52 of the two maps.
_U_MAX = 1.0 - 2.0**-24
_GUARD = 2.0**-30


def _levels(levels: Any) -> int:
    lv = check_positive_int(levels, "levels")
    if lv < 2:
        raise HbarInputError(f"levels must be >= 2, got {lv}")
    return lv


def _pixels(images: Any, levels: int) -> np.ndarray:
    """Integer pixels (n, H, W) or (n, d) -> float64 (n, d), checked to lie in 0..levels-1."""
    k = np.asarray(images)
    if k.dtype.kind not in "uif":
        raise HbarInputError(f"images must be numeric pixel values, got dtype {k.dtype}")
    if k.ndim < 2:
        raise HbarInputError(f"images must have shape (n, H, W) or (n, d), got shape {k.shape}")
    k = k.reshape(k.shape[0], -1).astype(np.float64)
    if k.size == 0:
        raise HbarInputError(f"images is empty (shape {np.shape(images)})")
    if not np.all(np.isfinite(k)) or np.any(k != np.floor(k)) or k.min() < 0 or k.max() > levels - 1:
        raise HbarInputError(f"images must hold integer pixel values in 0..{levels - 1}, "
                             f"got values in [{np.nanmin(k)}, {np.nanmax(k)}]")
    return k


def _is_jax_key(u: Any) -> bool:
    if isinstance(u, np.ndarray) or not hasattr(u, "dtype"):
        return False
    import jax

    if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
        return True
    return isinstance(u, jax.Array) and u.dtype == np.uint32 and u.shape == (2,)


def to_model_space(images: Any, levels: int, u: Any = None) -> np.ndarray:
    """Pixels k (n, H, W) or (n, d), integers in 0..levels-1 -> x = 2 (k + u) / levels - 1,
    float64 of shape (n, d) (d = H W), in [-1, 1).

    ``u`` chooses the dequantisation offset:

    * ``None`` or ``"centre"``: u = 1/2 (bin centres; deterministic, for display and tests);
    * a ``numpy.random.Generator``: u ~ U[0, 1)^(n, d) from ``u.random``;
    * a JAX PRNG key (typed key or raw uint32 (2,) jax array): u ~ U[0, 1)^(n, d) from
      ``jax.random.uniform`` in float64 arithmetic on the host (use :func:`dequantize_jax`
      inside jitted code);
    * an array broadcastable to (n, d) with values in [0, 1).

    Floating point: u is clipped to [0, 1 - 2^-24] (a change of probability 6e-8 per pixel) so
    that :func:`from_model_space` recovers k exactly for every u in [0, 1) despite rounding.
    """
    lv = _levels(levels)
    k = _pixels(images, lv)
    if u is None or (isinstance(u, str) and u == "centre"):
        off: Any = 0.5
    elif isinstance(u, str):
        raise HbarInputError(f"u must be None, 'centre', a numpy Generator, a JAX key or an array, got {u!r}")
    elif isinstance(u, np.random.Generator):
        off = u.random(k.shape)
    elif _is_jax_key(u):
        import jax

        off = np.asarray(jax.random.uniform(u, k.shape), dtype=np.float64)
    else:
        try:
            off = np.broadcast_to(np.asarray(u, dtype=np.float64), k.shape)
        except ValueError as err:
            raise HbarInputError(f"u of shape {np.shape(u)} does not broadcast to the images' shape {k.shape}") from err
        if not (np.all(off >= 0.0) and np.all(off < 1.0)):
            raise HbarInputError("u must lie in [0, 1)")
    return 2.0 * (k + np.minimum(off, _U_MAX)) / lv - 1.0


def from_model_space(x: Any, shape: tuple[int, int], levels: int) -> np.ndarray:
    """Model-space points x (n, d) -> uint8 pixel images (n, H, W): k = floor((x + 1) levels / 2),
    clipped to 0..levels-1 (2^-30 is added before the floor against rounding), so it inverts
    :func:`to_model_space` for every u in [0, 1), and maps
    samples outside [-1, 1) to the extreme levels). NaN maps to 0. For display."""
    lv = _levels(levels)
    if lv > 256:
        raise HbarInputError(f"from_model_space returns uint8 images: levels must be <= 256, got {lv}")
    arr = np.asarray(x, dtype=np.float64)
    try:
        h, w = (check_positive_int(s, "shape") for s in shape)
    except (TypeError, ValueError) as err:
        raise HbarInputError(f"shape must be (H, W), got {shape!r}") from err
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != h * w:
        raise HbarInputError(f"x must have shape (n, {h * w}) for images of shape {(h, w)}, got {arr.shape}")
    k = np.floor((np.nan_to_num(arr, nan=-1.0) + 1.0) * lv / 2.0 + _GUARD)
    return np.clip(k, 0, lv - 1).astype(np.uint8).reshape(arr.shape[0], h, w)


def bits_per_dim(nll_nats: Any, d: int, levels: int) -> np.ndarray | float:
    """Bits/dim of discrete pixels from the NLL (nats per image) of a density on the
    [-1, 1)^d model space: NLL / (d ln 2) + log2(levels / 2). Delegates to
    :func:`hbar.likelihood.bits_per_dim` with ``data_range=(-1, 1)``."""
    from hbar.likelihood import bits_per_dim as _bpd

    return _bpd(nll_nats, check_positive_int(d, "d"), levels=_levels(levels), data_range=DATA_RANGE)


def dequantize_jax(key: Any, k_float: Any, levels: int) -> Any:
    """JAX-traceable dequantisation for a training step: x = 2 (k + u) / levels - 1 with
    u ~ U[0, 1) drawn by ``jax.random.uniform(key, k.shape, k.dtype)``. ``k_float`` is a float
    array of pixel values (any shape, e.g. a (batch, d) batch); ``levels`` is a static int."""
    import jax

    k = k_float
    return 2.0 * (k + jax.random.uniform(key, k.shape, k.dtype)) / levels - 1.0
