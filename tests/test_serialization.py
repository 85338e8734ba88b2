"""Files hbar writes honour the user's umask (issue: every file was 0600 via mkstemp)."""

import os
import stat

import pytest

from hbar.serialization import atomic_write


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_uses_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        p = tmp_path / "sub" / "f.json"
        atomic_write(p, b"{}")
        ref = tmp_path / "ref.txt"
        ref.write_bytes(b"x")  # what an ordinary open() gives under this umask
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~mask == stat.S_IMODE(ref.stat().st_mode)
    assert p.read_bytes() == b"{}"
    assert not [f for f in os.listdir(p.parent) if f.startswith(".tmp-")]
