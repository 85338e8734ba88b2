"""Figures of the image study (docs/theory.md section 13.7): pure functions of numbers and a path
(one :class:`matplotlib.figure.Figure` each, no pyplot; PNG written to ``path``)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_wkb_line", "plot_quality_h"]


def _save(fig: Figure, path: str | os.PathLike) -> str:
    p = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    fig.savefig(p, dpi=110, bbox_inches="tight")
    return p


def plot_wkb_line(path: str | os.PathLike, *, nll0: float, nll0_se: float, c1: float, c1_se: float,
                  baseline: float | None, h_max: float = 1.0) -> str:
    """NLL(h) ~ NLL0 + h C1 in bits/dim on [0, h_max] with the 2 s.e. band of the line (NLL0
    and C1 errors added in quadrature at each h; give C1's total error), and the Gaussian
    baseline as a horizontal line."""
    h = np.linspace(0.0, h_max, 101)
    line = nll0 + h * c1
    band = 2.0 * np.sqrt(nll0_se**2 + (h * c1_se) ** 2)
    fig = Figure(figsize=(5.0, 3.6), layout="tight")
    ax = fig.subplots()
    ax.plot(h, line, "C0-", label="WKB order 1: NLL0 + h C1")
    ax.fill_between(h, line - band, line + band, color="C0", alpha=0.25, label="±2 s.e.")
    if baseline is not None:
        ax.axhline(baseline, color="k", ls=":", label="Gaussian (PCA) baseline")
    ax.set_xlabel("h")
    ax.set_ylabel("NLL (bits/dim)")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_quality_h(path: str | os.PathLike, h: Sequence[float], fd: Sequence[float], fd_se: Sequence[float],
                   fd_floor: float | None, w2: Sequence[float | None], w2_floor: float | None) -> str:
    """Feature Frechet distance (with bootstrap s.e. and the real-vs-real floor) and pixel W2
    against h, side by side."""
    hh = np.asarray(h, dtype=float)
    fig = Figure(figsize=(9.0, 3.4), layout="tight")
    a1, a2 = fig.subplots(1, 2)
    a1.errorbar(hh, np.asarray(fd, float), yerr=np.asarray(fd_se, float), fmt="o-", color="C1", capsize=3,
                label="samples vs test")
    if fd_floor is not None and np.isfinite(fd_floor):
        a1.axhline(fd_floor, color="k", ls=":", label="test vs test (floor)")
    a1.set_xlabel("h")
    a1.set_ylabel("feature Fréchet distance")
    a1.legend(fontsize=8)
    w = np.array([np.nan if v is None else v for v in w2], dtype=float)
    a2.plot(hh, w, "s-", color="C2", label="samples vs test")
    if w2_floor is not None:
        a2.axhline(w2_floor, color="k", ls=":", label="test vs test (floor)")
    a2.set_xlabel("h")
    a2.set_ylabel("W2 on pixels (exact EMD)")
    a2.legend(fontsize=8)
    return _save(fig, path)
