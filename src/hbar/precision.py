"""Floating-point precision of likelihood computations (docs/theory.md section 4).

Log-likelihoods integrate divergences over many solver steps and are compared to closed forms
at 1e-6 relative accuracy, so hbar computes them in float64 whatever the caller's global JAX
setting: the computation runs inside ``jax.enable_x64(True)`` (a thread-local context, so the
caller's own setting is left as it was), inputs are converted to float64 and a score's floating
parameters are cast to float64 for the computation (a float32 network is evaluated in float64).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import jax

__all__ = ["in_float64"]

P = ParamSpec("P")
R = TypeVar("R")


def in_float64(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator: run ``fn`` with 64-bit JAX types enabled for this call only."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        with jax.enable_x64(True):
            return fn(*args, **kwargs)

    return wrapper
