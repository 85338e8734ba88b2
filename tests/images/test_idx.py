"""Tests for hbar.images.idx: round trips over every IDX dtype, gzip by suffix and by magic,
the byte layout against a hand-built header, and the error messages."""

import gzip

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hbar.images.idx import IDX_DTYPES, read_idx, write_idx
from hbar.validation import HbarInputError

DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@settings(max_examples=40, deadline=None)
@given(
    arr=st.sampled_from(DTYPES).flatmap(
        lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
                              elements=hnp.from_dtype(np.dtype(dt), allow_nan=False))),
    gz=st.booleans(),
)
def test_round_trip_all_dtypes_and_shapes(tmp_path_factory, arr, gz):
    path = tmp_path_factory.mktemp("idx") / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, arr)
    back = read_idx(path)
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    assert back.dtype.isnative


def test_byte_layout_matches_hand_built_header(tmp_path):
    arr = np.arange(6, dtype=np.int16).reshape(2, 3) - 2
    write_idx(tmp_path / "x.idx", arr)
    raw = (tmp_path / "x.idx").read_bytes()
    want = bytes([0, 0, 0x0B, 2]) + (2).to_bytes(4, "big") + (3).to_bytes(4, "big") \
        + b"".join(int(v).to_bytes(2, "big", signed=True) for v in arr.ravel())
    assert raw == want


def test_gzip_detected_by_magic_and_plain_by_default(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "x.gz", arr)
    (tmp_path / "noext").write_bytes((tmp_path / "x.gz").read_bytes())  # gzip, no .gz suffix
    np.testing.assert_array_equal(read_idx(tmp_path / "noext"), arr)
    assert (tmp_path / "x.gz").read_bytes()[:2] == b"\x1f\x8b"
    write_idx(tmp_path / "plain", arr)
    assert (tmp_path / "plain").read_bytes()[:4] == bytes([0, 0, 8, 2])


def test_reads_mnist_style_file_written_by_hand(tmp_path):
    """An MNIST label file: magic 0x00000801, count, then bytes (gzip)."""
    labels = bytes([3, 1, 4, 1, 5])
    raw = bytes([0, 0, 8, 1]) + len(labels).to_bytes(4, "big") + labels
    (tmp_path / "lab-idx1-ubyte.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "lab-idx1-ubyte.gz"), [3, 1, 4, 1, 5])


def _write_raw(tmp_path, raw, name="f.idx"):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def test_errors_name_the_problem_and_the_path(tmp_path):
    with pytest.raises(HbarInputError, match="not found.*nope.idx"):
        read_idx(tmp_path / "nope.idx")
    p = _write_raw(tmp_path, bytes([1, 0, 8, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(HbarInputError, match=f"bad magic.*{p.name}|{p.name}.*bad magic"):
        read_idx(p)
    p = _write_raw(tmp_path, bytes([0, 0, 0x0A, 1, 0, 0, 0, 1, 7]))
    with pytest.raises(HbarInputError, match="unknown dtype code 0x0A"):
        read_idx(p)
    p = _write_raw(tmp_path, bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3]))
    with pytest.raises(HbarInputError, match=r"size mismatch \(truncated\)"):
        read_idx(p)
    p = _write_raw(tmp_path, bytes([0, 0, 8, 1, 0, 0, 0, 1, 1, 2]))
    with pytest.raises(HbarInputError, match="trailing bytes"):
        read_idx(p)
    p = _write_raw(tmp_path, bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(HbarInputError, match="truncated header"):
        read_idx(p)
    p = _write_raw(tmp_path, b"\x1f\x8b not really gzip", "bad.gz")
    with pytest.raises(HbarInputError, match="bad.gz.*gunzip"):
        read_idx(p)


def test_truncated_gzip_file_is_a_size_mismatch(tmp_path):
    arr = np.arange(100, dtype=np.float32)
    write_idx(tmp_path / "x.idx", arr)
    raw = (tmp_path / "x.idx").read_bytes()[:-8]
    (tmp_path / "y.idx.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(HbarInputError, match="y.idx.gz.*size mismatch"):
        read_idx(tmp_path / "y.idx.gz")


@pytest.mark.parametrize("arr", [np.zeros(3, np.int64), np.zeros(3, np.uint16), np.zeros(3, bool), np.float64(1.0)])
def test_write_refuses_what_idx_cannot_hold(tmp_path, arr):
    with pytest.raises(HbarInputError):
        write_idx(tmp_path / "x.idx", arr)


def test_dtype_table_is_the_standard_one():
    assert {c: dt.str[1:] for c, dt in IDX_DTYPES.items()} == {
        0x08: "u1", 0x09: "i1", 0x0B: "i2", 0x0C: "i4", 0x0D: "f4", 0x0E: "f8"}
    assert all(dt.byteorder in (">", "|") for dt in IDX_DTYPES.values())
