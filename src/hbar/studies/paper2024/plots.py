"""Figures of the paper2024 study (docs/theory.md section 10): pure functions of arrays and a path.

Every function takes plain NumPy arrays (or lists), builds one :class:`matplotlib.figure.Figure`
(no pyplot, no backend switch: nothing global is touched), writes it as PNG to ``path``
(parent directories are created) and returns the path.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

__all__ = ["plot_gauss1d", "plot_samples_grid", "plot_samples_single", "plot_nll_h", "plot_nll_h_converged", "plot_w2_h",
           "plot_fd_vs_exact"]


def _figure(w: float, h: float) -> Figure:
    return Figure(figsize=(w, h), layout="tight")


def _save(fig: Figure, path: str | os.PathLike) -> str:
    p = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(p)), exist_ok=True)
    fig.savefig(p, dpi=110, bbox_inches="tight")  # Figure.savefig attaches an Agg canvas for PNG
    return p


def _arr(a: Any) -> np.ndarray:
    """Float array with None -> NaN (JSON null round trip)."""
    return np.array([np.nan if v is None else v for v in np.ravel(np.asarray(a, dtype=object))], dtype=float)


def plot_gauss1d(cases: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> str:
    """1-D Gaussian study: one column per score error eps, NLL(h) on top, W2(h) below.

    Each case holds ``eps``; ``h_grid``, ``nll_oracle`` (closed form at the evaluation points),
    ``w2_oracle`` (Bures, not squared); ``nll0``, ``c1``, ``c2`` (WKB coefficients, means over
    the points); optional marker series ``h_fp, nll_fp, nll_fp_err``; ``h_path, nll_path,
    nll_path_se``; ``h_samples, nll_fit, nll_fit_se, w2_samples, w2_samples_se``; ``w2_floor``.
    """
    k = len(cases)
    fig = _figure(3.6 * k, 6.4)
    axes = fig.subplots(2, k, squeeze=False)
    for j, c in enumerate(cases):
        ax = axes[0, j]
        hg = _arr(c["h_grid"])
        ax.plot(hg, _arr(c["nll_oracle"]), "k-", lw=2, label="closed form")
        ax.plot(hg, c["nll0"] + hg * c["c1"], "C0--", label="WKB order 1")
        ax.plot(hg, c["nll0"] + hg * c["c1"] + hg**2 * c["c2"], "C1-.", label="WKB order 2")
        if c.get("h_fp") is not None:
            ax.errorbar(_arr(c["h_fp"]), _arr(c["nll_fp"]), yerr=_arr(c["nll_fp_err"]), fmt="s", color="C2",
                        ms=5, mfc="none", label="Fokker-Planck")
        if c.get("h_path") is not None:
            ax.errorbar(_arr(c["h_path"]), _arr(c["nll_path"]), yerr=_arr(c["nll_path_se"]), fmt="^", color="C3",
                        ms=5, label="path-integral MC")
        if c.get("h_samples") is not None:
            ax.errorbar(_arr(c["h_samples"]), _arr(c["nll_fit"]), yerr=_arr(c["nll_fit_se"]), fmt="o", color="C4",
                        ms=4, label="Gaussian fit of samples")
        ax.set_title(f"eps = {c['eps']:+g}")
        ax.set_xlabel("h")
        if j == 0:
            ax.set_ylabel("NLL (nats)")
            ax.legend(fontsize=7)
        ax = axes[1, j]
        ax.plot(hg, _arr(c["w2_oracle"]), "k-", lw=2, label="closed form (Bures)")
        if c.get("h_samples") is not None:
            ax.errorbar(_arr(c["h_samples"]), _arr(c["w2_samples"]), yerr=_arr(c["w2_samples_se"]), fmt="o",
                        color="C4", ms=4, label="samples vs data (EMD)")
        if c.get("w2_floor") is not None:
            ax.axhline(c["w2_floor"], color="gray", ls=":", label="data vs data (finite n)")
        ax.set_xlabel("h")
        if j == 0:
            ax.set_ylabel("W2 (not squared)")
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_samples_grid(data: np.ndarray, samples: Mapping[float, np.ndarray], path: str | os.PathLike,
                      title: str = "", lim: float = 3.0) -> str:
    """Data and model samples at several h, one panel each (2-D)."""
    items = [("data", np.asarray(data))] + [(f"h = {h:g}", np.asarray(s)) for h, s in samples.items()]
    k = len(items)
    fig = _figure(2.8 * k, 3.0)
    axes = fig.subplots(1, k, squeeze=False)
    for ax, (lab, pts) in zip(axes[0], items):
        pts = pts[np.all(np.isfinite(pts), axis=1)]
        ax.scatter(pts[:, 0], pts[:, 1], s=1, alpha=0.5, color="k" if lab == "data" else "C0")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_title(lab, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_samples_single(samples: np.ndarray, path: str | os.PathLike, title: str = "",
                        data: np.ndarray | None = None, lim: float = 3.0) -> str:
    """One scatter plot of 2-D samples (optionally over the data in grey)."""
    fig = _figure(3.6, 3.6)
    ax = fig.subplots()
    if data is not None:
        ax.scatter(data[:, 0], data[:, 1], s=1, alpha=0.3, color="0.6", label="data")
    s = np.asarray(samples)
    s = s[np.all(np.isfinite(s), axis=1)]
    ax.scatter(s[:, 0], s[:, 1], s=1, alpha=0.6, color="C0", label="samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_nll_h(path: str | os.PathLike, *, nll0: float, c1: float, c2: float | None,
               h_fp: Any = None, nll_fp: Any = None, err_fp: Any = None, converged: Any = None,
               nll0_se: float | None = None, h_max: float = 1.0, entropy: float | None = None,
               title: str = "") -> str:
    """NLL(h): WKB lines of order 1 and 2 against the brute-force Fokker-Planck values.

    The h = 0 point is the exact probability-flow NLL0 (with its standard error). FP markers
    carry their discretisation error estimate; unconverged values are drawn hollow."""
    fig = _figure(5.2, 3.8)
    ax = fig.subplots()
    hg = np.linspace(0.0, h_max, 101)
    ax.plot(hg, nll0 + c1 * hg, "C0--", label=f"WKB 1: NLL0 + h C1 (C1 = {c1:.3g})")
    if c2 is not None and math.isfinite(c2):
        ax.plot(hg, nll0 + c1 * hg + c2 * hg**2, "C1-.", label=f"WKB 2 (+ h^2 C2, C2 = {c2:.3g})")
    ax.errorbar([0.0], [nll0], yerr=[0.0 if nll0_se is None else nll0_se], fmt="ko", ms=5, label="NLL0 (exact PF ODE)")
    if h_fp is not None and len(h_fp):
        h_fp, nll_fp, err_fp = _arr(h_fp), _arr(nll_fp), _arr(err_fp)
        conv = np.ones_like(h_fp, bool) if converged is None else np.asarray(converged, bool)
        if conv.any():
            ax.errorbar(h_fp[conv], nll_fp[conv], yerr=err_fp[conv], fmt="s", color="C2", ms=6,
                        label="Fokker-Planck (converged)")
        if (~conv).any():
            ax.errorbar(h_fp[~conv], nll_fp[~conv], yerr=err_fp[~conv], fmt="s", color="C2", mfc="none", ms=6,
                        label="Fokker-Planck (not converged)")
    if entropy is not None:
        ax.axhline(entropy, color="gray", ls=":", label=f"data entropy {entropy:.3f}")
    lo = [nll0]
    if nll_fp is not None:
        lo += [v for v in _arr(nll_fp) if math.isfinite(v)]
    if entropy is not None:
        lo.append(entropy)
    span = max(lo) - min(lo)
    ax.set_ylim(min(lo) - 0.3 * span - 0.1, max(lo) + 0.3 * span + 0.1)
    ax.set_xlabel("h")
    ax.set_ylabel("NLL (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_nll_h_converged(path: str | os.PathLike, *, nll0: float, c1: float, h_max: float, c2: float | None = None,
                         radius: float | None = None, h_grid: Any = None, pade: Any = None, pade_frac: Any = None,
                         h_path: Any = None, nll_path: Any = None, err_path: Any = None, conv_path: Any = None,
                         h_fp: Any = None, nll_fp: Any = None, err_fp: Any = None, conv_fp: Any = None,
                         title: str = "") -> str:
    """NLL(h) on one set of points: NLL0 (h = 0); the WKB lines of order 1 and 2, drawn only for
    h < ``radius`` (the series' radius estimate; nothing of them beyond it); the per-point [0/1]
    Pade resummation (``h_grid``, ``pade``: mean over the points below their pole, ``pade_frac``
    the share of such points; solid where it is 1, dashed where less); step-converged
    path-integral values with their total error bars (filled; unconverged ones hollow and
    labelled as such) and Fokker-Planck values (filled where converged; unconverged ones hollow,
    labelled "not converged")."""
    fig = _figure(5.6, 4.0)
    ax = fig.subplots()
    rho = math.inf if radius is None or not math.isfinite(radius) else float(radius)
    h_in = min(h_max, rho)
    hg = np.linspace(0.0, h_in, 101)
    lab_r = "" if rho >= h_max else f", h < radius {rho:.3g}"
    ax.plot(hg, nll0 + c1 * hg, "C0--", label=f"WKB 1 (C1 = {c1:.3g}{lab_r})")
    if c2 is not None and math.isfinite(c2):
        ax.plot(hg, nll0 + c1 * hg + c2 * hg**2, "C1-.", label=f"WKB 2 (C2 = {c2:.3g}{lab_r})")
    if rho < h_max:
        ax.axvline(rho, color="0.6", ls=":", lw=1, label="median per-point radius")
    if h_grid is not None and pade is not None:
        hp, pv = _arr(h_grid), _arr(pade)
        full = np.ones_like(hp, bool) if pade_frac is None else _arr(pade_frac) >= 1.0
        ax.plot(hp, np.where(full, pv, np.nan), "C4-", lw=1.5, label="[0/1] Pade, per point, mean")
        if (~full).any():
            ax.plot(hp, np.where(~full | np.r_[False, ~full[:-1]], pv, np.nan), "C4--", lw=1,
                    label="[0/1] Pade, mean over points below their pole")
    ax.plot([0.0], [nll0], "ko", ms=5, label="NLL0 (exact PF ODE)")
    vals = [nll0]

    def _markers(h, v, e, c, color, fmt, name):
        if h is None or not len(h):
            return
        h, v, e = _arr(h), _arr(v), _arr(e)
        c = np.ones_like(h, bool) if c is None else np.asarray(c, bool)
        ok = c & np.isfinite(v)
        if ok.any():
            ax.errorbar(h[ok], v[ok], yerr=e[ok], fmt=fmt, color=color, ms=6, capsize=3, label=f"{name} (converged)")
            vals.extend(v[ok])
        bad = ~c & np.isfinite(v)
        if bad.any():
            ax.errorbar(h[bad], v[bad], yerr=e[bad], fmt=fmt, color=color, mfc="none", ms=6, capsize=3, alpha=0.6,
                        label=f"{name} (NOT converged, not a reference)")

    _markers(h_path, nll_path, err_path, conv_path, "C3", "^", "path integral")
    _markers(h_fp, nll_fp, err_fp, conv_fp, "C2", "s", "Fokker-Planck")
    span = max(vals) - min(vals)
    ax.set_ylim(min(vals) - 0.5 * span - 0.05, max(vals) + 0.5 * span + 0.05)
    ax.set_xlim(-0.02 * h_max, 1.05 * h_max)
    ax.set_xlabel("h")
    ax.set_ylabel("NLL (nats), mean over the same points")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=6.5)
    return _save(fig, path)


def plot_w2_h(path: str | os.PathLike, curves: Mapping[str, Mapping[str, Any]], ylabel: str = "W2",
              floor: Mapping[str, float] | None = None, title: str = "") -> str:
    """W2 (or W2^2) against h, one curve per label: ``{"h": .., "mean": .., "se": ..}``;
    ``floor``: per label, the same metric between two independent data sets (finite-n floor)."""
    fig = _figure(5.2, 3.8)
    ax = fig.subplots()
    for i, (lab, c) in enumerate(curves.items()):
        ax.errorbar(_arr(c["h"]), _arr(c["mean"]), yerr=_arr(c["se"]), fmt="o-", color=f"C{i}", ms=4, label=lab)
        if floor and lab in floor and floor[lab] is not None:
            ax.axhline(floor[lab], color=f"C{i}", ls=":", lw=1)
    ax.set_xlabel("h")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_fd_vs_exact(path: str | os.PathLike, c1_exact: np.ndarray, c1_fd: Mapping[str, np.ndarray],
                     title: str = "") -> str:
    """Per-point C1: the paper's finite-difference algorithm against the exact value."""
    fig = _figure(4.2, 4.0)
    ax = fig.subplots()
    ce = np.asarray(c1_exact, float)
    allv = [ce]
    for i, (lab, v) in enumerate(c1_fd.items()):
        v = np.asarray(v, float)
        ax.scatter(ce, v, s=14, color=f"C{i}", label=lab)
        allv.append(v)
    a = np.concatenate([x[np.isfinite(x)] for x in allv])
    if a.size:
        lo, hi = float(a.min()), float(a.max())
        ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("C1 exact (characteristics)")
    ax.set_ylabel("C1 finite difference")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    return _save(fig, path)
