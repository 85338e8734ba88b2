"""Image grids as PNG files (docs/theory.md section 13.6).

:func:`tile_images` lays n images (n, H, W) out on a grid of ``nrow`` rows with ``padding``
pixels between them; :func:`save_image_grid` does that for model-space samples x (n, H W)
(mapped to pixels by :func:`hbar.images.preprocess.from_model_space`) or integer images and
writes an 8-bit PNG, pixel level k shown as the grey value round(255 k / (levels - 1)).

The PNG is written by ``matplotlib.image.imsave`` (Pillow underneath) into memory and then
atomically to disk; pyplot is never imported, so no global figure state or backend is touched.
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np

from hbar.serialization import atomic_write
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["tile_images", "save_image_grid", "to_display"]


def _check_png_path(path: Any) -> str:
    try:
        p = os.fspath(path)
    except TypeError:
        raise HbarInputError(f"path must be a file path, got {path!r}") from None
    if not isinstance(p, str) or not p:
        raise HbarInputError(f"path must be a non-empty file path, got {path!r}")
    if os.path.isdir(p):
        raise HbarInputError(f"{p} is a directory, not a PNG file path")
    if not p.lower().endswith(".png"):
        raise HbarInputError(f"image grids are written as PNG: path must end in .png, got {p}")
    parent = os.path.dirname(os.path.abspath(p))
    probe = parent
    while not os.path.exists(probe):  # the nearest existing ancestor must be a writable directory
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise HbarInputError(f"cannot create {parent}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HbarInputError(f"cannot write to {probe} (permission denied)")
    return p


def _as_images(x_or_images: Any, shape: Any, levels: int) -> np.ndarray:
    """(n, H, W) integer pixels from integer images (n, H, W) / (n, d) or model-space x (n, d)."""
    from hbar.images.preprocess import from_model_space

    arr = np.asarray(x_or_images)
    if arr.dtype.kind not in "uif":
        raise HbarInputError(f"images must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.dtype.kind in "ui":
        imgs = arr
    elif arr.ndim == 2:
        if shape is None:
            side = math.isqrt(arr.shape[1])
            if side * side != arr.shape[1]:
                raise HbarInputError(f"cannot infer a square image shape from d={arr.shape[1]}: pass shape=(H, W)")
            shape = (side, side)
        if arr.dtype.kind == "f":
            return from_model_space(arr, tuple(shape), levels)
        try:
            imgs = arr.reshape(arr.shape[0], *shape)
        except (TypeError, ValueError):
            raise HbarInputError(f"images of d={arr.shape[1]} do not have shape {shape!r}") from None
    else:
        raise HbarInputError("pass integer images (n, H, W) or flattened images / model-space points (n, H W), "
                             f"got shape {arr.shape} and dtype {arr.dtype}")
    if imgs.shape[0] == 0:
        raise HbarInputError("no images to tile")
    if imgs.min() < 0 or imgs.max() > levels - 1:
        raise HbarInputError(f"pixel values must lie in 0..{levels - 1}, got [{imgs.min()}, {imgs.max()}]")
    return imgs


def tile_images(images: Any, nrow: int | None = None, padding: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile images (n, H, W) row by row into a (R H + (R+1) p, C W + (C+1) p) array, with R = ``nrow``
    rows (default ceil(sqrt(n))), C = ceil(n / R) columns and p = ``padding`` pixels of ``pad_value``
    around every image (empty cells are ``pad_value`` too). Same dtype as ``images``."""
    imgs = np.asarray(images)
    if imgs.ndim != 3 or imgs.shape[0] == 0:
        raise HbarInputError(f"images must have shape (n, H, W) with n >= 1, got {imgs.shape}")
    n, h, w = imgs.shape
    rows = math.ceil(math.sqrt(n)) if nrow is None else check_positive_int(nrow, "nrow")
    rows = min(rows, n)
    cols = math.ceil(n / rows)
    if isinstance(padding, bool) or not isinstance(padding, (int, np.integer)) or padding < 0:
        raise HbarInputError(f"padding must be an integer >= 0, got {padding!r}")
    p = int(padding)
    out = np.full((rows * h + (rows + 1) * p, cols * w + (cols + 1) * p), pad_value, dtype=imgs.dtype)
    for i in range(n):
        r, c = divmod(i, cols)
        y, x = p + r * (h + p), p + c * (w + p)
        out[y:y + h, x:x + w] = imgs[i]
    return out


def to_display(levels_image: Any, levels: int) -> np.ndarray:
    """Integer pixel levels k in 0..levels-1 -> uint8 grey values round(255 k / (levels - 1))."""
    k = np.asarray(levels_image, dtype=np.float64)
    return np.rint(k * 255.0 / (levels - 1)).astype(np.uint8)


def save_image_grid(
    path: str | os.PathLike,
    x_or_images: Any,
    shape: tuple[int, int] | None = None,
    levels: int = 256,
    nrow: int | None = None,
    padding: int = 1,
    scale: int = 1,
) -> np.ndarray:
    """Write n images as one grey-scale PNG grid and return the tiled pixel levels.

    Args:
        path: output file, must end in ``.png`` (checked before any work; parent folders are created).
        x_or_images: model-space samples x (n, H W) float (mapped to pixels with
            ``from_model_space(x, shape, levels)``: clipped to [-1, 1), floor to the bin), or
            integer images (n, H, W) / (n, H W) with values in 0..levels-1.
        shape: (H, W) of flattened input (default: square).
        levels: pixel levels (256 for 8-bit images, 17 for the 8x8 digits).
        nrow: rows of the grid (default ceil(sqrt(n))); padding: pixels between images (black).
        scale: integer up-sampling of every pixel (nearest neighbour) for small images.

    Returns:
        The tiled levels, uint8 (rows, cols) before display scaling and up-sampling; the PNG
        holds ``to_display(tiled, levels)`` repeated ``scale`` times along each axis (RGB, R = G = B).
    """
    import matplotlib.image

    p = _check_png_path(path)
    lv = check_positive_int(levels, "levels")
    if not 2 <= lv <= 256:
        raise HbarInputError(f"levels must lie in 2..256 for an 8-bit image, got {lv}")
    s = check_positive_int(scale, "scale")
    tiled = tile_images(_as_images(x_or_images, shape, lv), nrow=nrow, padding=padding).astype(np.uint8)
    grey = to_display(tiled, lv)
    if s > 1:
        grey = np.repeat(np.repeat(grey, s, axis=0), s, axis=1)
    buf = io.BytesIO()
    matplotlib.image.imsave(buf, np.stack([grey] * 3, axis=-1), format="png")
    atomic_write(p, buf.getvalue())
    return tiled
