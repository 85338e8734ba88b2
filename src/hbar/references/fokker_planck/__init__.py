"""Fokker-Planck brute force for any score in d = 1, 2 (docs/theory.md section 8).

The backward Fokker-Planck equation of the h-process is solved on a box grid (finite volumes,
Scharfetter-Gummel fluxes, variable-step BDF2) with grid/time-step refinement and Richardson
extrapolation, reporting every level.

Modules: :mod:`.grid` (box grid, time nodes, point evaluation), :mod:`.operator` (fluxes, step
matrices, the HProcess face drift), :mod:`.stepper` (BDF2 and linear solves on one level),
:mod:`.richardson` (extrapolation, observed order, error estimate: pure functions),
:mod:`.convergence` (per-level records and the report), :mod:`.solver` (public entry points).
"""

from .convergence import FokkerPlanckDensity, FokkerPlanckLevel, FokkerPlanckResult
from .solver import fokker_planck_density, fokker_planck_nll

__all__ = [
    "FokkerPlanckLevel",
    "FokkerPlanckResult",
    "FokkerPlanckDensity",
    "fokker_planck_nll",
    "fokker_planck_density",
]
