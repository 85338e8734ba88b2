"""IDX files (the MNIST / Fashion-MNIST container format): a general reader and writer
(docs/theory.md section 13.1).

Layout (all integers big-endian)::

    bytes 0-1   0x00 0x00                  magic
    byte  2     dtype code                 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                                           0x0D float32, 0x0E float64
    byte  3     ndim                       number of dimensions
    4 * ndim    dims                       uint32 each
    rest        prod(dims) items           row-major (C order), big-endian items

A file is read gzip-compressed when its name ends in ``.gz`` or its first two bytes are the
gzip magic 0x1f 0x8b; :func:`write_idx` compresses when the name ends in ``.gz``.
Every error names the path: missing file, bad magic, unknown dtype code, a size that does
not match the header (truncated file or trailing bytes).
"""

from __future__ import annotations

import gzip
import os
from typing import Any

import numpy as np

from hbar.validation import HbarInputError

__all__ = ["IDX_DTYPES", "read_idx", "write_idx"]

#: IDX dtype code -> NumPy dtype (big-endian where it matters).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODE_OF_KIND: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): code for code, dt in IDX_DTYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise HbarInputError(f"IDX file not found: {path}")
    with open(path, "rb") as fh:
        raw = fh.read()
    if path.endswith(".gz") or raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise HbarInputError(f"IDX file {path}: cannot gunzip ({err})") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip) into an array of shape ``dims`` in native byte order.

    The dtype is the one the header names (uint8, int8, int16, int32, float32, float64)."""
    path = os.fspath(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise HbarInputError(f"IDX file {path}: too short for a header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise HbarInputError(f"IDX file {path}: bad magic {raw[:4].hex()} (expected 0000 + dtype code + ndim)")
    code, ndim = raw[2], raw[3]
    if code not in IDX_DTYPES:
        raise HbarInputError(f"IDX file {path}: unknown dtype code 0x{code:02X} (known: "
                             + ", ".join(f"0x{c:02X}" for c in IDX_DTYPES) + ")")
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise HbarInputError(f"IDX file {path}: truncated header ({len(raw)} bytes, {ndim} dims need {head})")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dt = IDX_DTYPES[code]
    want = int(np.prod(dims, dtype=np.int64)) * dt.itemsize
    have = len(raw) - head
    if have != want:
        kind = "truncated" if have < want else "trailing bytes"
        raise HbarInputError(f"IDX file {path}: size mismatch ({kind}): header dims {dims} of {dt.name} "
                             f"need {want} data bytes, found {have}")
    arr = np.frombuffer(raw, dtype=dt, count=want // dt.itemsize, offset=head).reshape(dims)
    return arr.astype(dt.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: Any) -> None:
    """Write ``array`` (ndim 1..255; dtype uint8, int8, int16, int32, float32 or float64) as an
    IDX file, gzip-compressed when ``path`` ends in ``.gz``. Written atomically."""
    from hbar.serialization import atomic_write

    path = os.fspath(path)
    arr = np.asarray(array)
    code = _CODE_OF_KIND.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None or arr.dtype.kind == "b":
        raise HbarInputError(f"write_idx {path}: dtype {arr.dtype} has no IDX code "
                             "(use uint8, int8, int16, int32, float32 or float64)")
    if not 1 <= arr.ndim <= 255:
        raise HbarInputError(f"write_idx {path}: ndim must be 1..255, got {arr.ndim}")
    if any(s >= 2**32 for s in arr.shape):
        raise HbarInputError(f"write_idx {path}: dimension too large for IDX: {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + np.asarray(arr.shape, dtype=">u4").tobytes()
    data = header + np.ascontiguousarray(arr, dtype=IDX_DTYPES[code]).tobytes()
    if path.endswith(".gz"):
        data = gzip.compress(data, compresslevel=6, mtime=0)
    atomic_write(path, data)
