"""Convergence reporting of the Fokker-Planck reference: one record per refinement level, the
result with its Richardson extrapolation, error estimate and diagnostics, and a grid density
for plots (docs/theory.md section 8).
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["FokkerPlanckLevel", "FokkerPlanckResult", "FokkerPlanckDensity"]


@dataclasses.dataclass(frozen=True)
class FokkerPlanckLevel:
    """One refinement level of :func:`fokker_planck_nll`. Arrays are (nh,), NaN for an h not
    solved at this level (already converged) or whose solution was unusable (``failed``).

    * cells: cells per axis; n_steps: BDF2 time steps; dx: cell widths (d,).
    * nll: mean NLL on this grid (no extrapolation); richardson: extrapolated from this and
      the previous level (NaN if the previous level is missing).
    * max_peclet: max cell Peclet number |u| dx / (h g^2 / 2) over faces and time.
    * mass_error: |final mass - initial mass| (conservation; round-off level expected);
      negative_mass: sum of the negative part of q times the cell volume at t_min;
      boundary_mass: max over time of the mass in the outer layer of cells.
    * failed: (nh,) bool, True where the grid density was <= 0 next to some data point
      (BDF2 undershoot on a too coarse grid): that level is skipped for that h.
    * seconds; n_factor: sparse LU factorisations; n_iter: preconditioned GMRES iterations.
    """

    cells: int
    n_steps: int
    dx: tuple[float, ...]
    nll: np.ndarray
    richardson: np.ndarray
    max_peclet: np.ndarray
    mass_error: np.ndarray
    negative_mass: np.ndarray
    boundary_mass: np.ndarray
    failed: np.ndarray
    seconds: float
    n_factor: int = 0
    n_iter: int = 0


@dataclasses.dataclass(frozen=True)
class FokkerPlanckResult:
    """Brute-force NLL(h) from the backward Fokker-Planck equation (docs/theory.md section 8).

    Shapes: nh values of h, n points.

    * ``h`` (nh,); ``nll`` (nh,): mean NLL over the points, Richardson-extrapolated from the
      last two levels; ``nll_points`` (nh, n): per-point -log q^h_{t_min}(x), extrapolated the
      same way; ``error`` (nh,): estimated discretisation error of ``nll`` (see
      :func:`fokker_planck_nll`); ``stderr`` (nh,): Monte Carlo standard error of the mean
      over the points, std(nll_points) / sqrt(n) (not a discretisation error).
    * ``converged`` (nh,): error <= tol reached; ``observed_order`` (nh,): convergence order
      measured from the last three levels (2 expected; NaN if fewer levels).
    * ``levels``: the per-level :class:`FokkerPlanckLevel` reports -- the grid-convergence
      check behind every number; ``report()`` formats them as a table; ``nll_levels``
      (n_levels, nh) the raw values.
    * ``box`` (d, 2); ``feature_scale``: length scale of the model density near the data
      used to choose the grid; ``flags``: problems detected (mass loss, negative density, box
      too small, not converged, failed levels). Empty if everything passed.
    """

    h: np.ndarray
    nll: np.ndarray
    nll_points: np.ndarray
    error: np.ndarray
    stderr: np.ndarray
    converged: np.ndarray
    observed_order: np.ndarray
    levels: tuple[FokkerPlanckLevel, ...]
    box: np.ndarray
    tol: float
    feature_scale: float
    flags: tuple[str, ...]

    @property
    def cells(self) -> list[int]:
        """Cells per axis of each level."""
        return [lv.cells for lv in self.levels]

    @property
    def n_steps(self) -> list[int]:
        """Time steps of each level."""
        return [lv.n_steps for lv in self.levels]

    @property
    def nll_levels(self) -> np.ndarray:
        """(n_levels, nh) raw per-level mean NLL (NaN where an h was not solved or failed)."""
        return np.array([lv.nll for lv in self.levels])

    @property
    def ok(self) -> bool:
        """True when every h converged and no diagnostic flag was raised."""
        return not self.flags

    def report(self) -> str:
        """Human-readable convergence table: every level's NLL per h, the extrapolation,
        error estimate, order, Peclet number and conservation diagnostics."""
        d = self.box.shape[0]
        lines = [f"Fokker-Planck NLL, d={d}, box={self.box.tolist()}, tol={self.tol:g}, "
                 f"feature scale={self.feature_scale:.3g}"]
        for ih, h in enumerate(self.h):
            lines.append(
                f"h={h:g}: NLL={self.nll[ih]:.8f} +- {self.error[ih]:.2e} (discretisation) "
                f"+- {self.stderr[ih]:.2e} (MC over points), order={self.observed_order[ih]:.2f}, "
                f"converged={bool(self.converged[ih])}"
            )
            for lv in self.levels:
                if lv.failed[ih]:
                    lines.append(f"    cells={lv.cells:5d} steps={lv.n_steps:5d} FAILED (density <= 0 next to a "
                                 f"point; negMass={lv.negative_mass[ih]:.1e})")
                    continue
                if np.isnan(lv.nll[ih]):
                    continue
                lines.append(
                    f"    cells={lv.cells:5d} steps={lv.n_steps:5d} NLL={lv.nll[ih]:.8f} "
                    f"richardson={lv.richardson[ih]:.8f} maxPe={lv.max_peclet[ih]:.3g} "
                    f"massErr={lv.mass_error[ih]:.1e} negMass={lv.negative_mass[ih]:.1e} "
                    f"bndMass={lv.boundary_mass[ih]:.1e} ({lv.seconds:.2f}s)"
                )
        if self.flags:
            lines.append("FLAGS: " + "; ".join(self.flags))
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - formatting
        return self.report()


@dataclasses.dataclass(frozen=True)
class FokkerPlanckDensity:
    """Grid density q^h_{t_min} for plotting. ``centres``: list of d arrays (n_k,) of cell
    centres; ``density``: (nh, n_0) or (nh, n_0, n_1); ``h`` (nh,); diagnostics per h."""

    h: np.ndarray
    centres: list[np.ndarray]
    density: np.ndarray
    mass: np.ndarray
    min_density: np.ndarray
    max_peclet: np.ndarray
    n_steps: int
