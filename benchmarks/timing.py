"""Timing helper shared by the benchmarks: the minimum wall time over repeats, after a warm-up
call on the same shapes (which compiles), so compilation is excluded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def best_of(fn: Callable[[], Any], repeats: int = 3) -> float:
    """Minimum wall time (s) of ``fn()`` over ``repeats`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)
