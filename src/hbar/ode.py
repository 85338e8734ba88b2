"""The one adaptive ODE integrator of hbar (a thin layer over diffrax).

Every deterministic solve in the library -- the probability-flow sampler, the h = 0
likelihood, the WKB characteristic solves and the finite-difference baseline -- goes
through :func:`solve_ode`, so tolerances, step limits and failure reporting are handled
in one place. The state ``y`` may be any pytree of arrays; the vector field has the
signature ``field(t, y) -> dy/dt`` with the same pytree structure. Integration runs from
``t0`` to ``t1`` in either direction (diffrax handles t1 < t0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import jax
import jax.numpy as jnp
import optimistix as optx
from jax import Array

__all__ = ["ODEOptions", "ODESolution", "solve_ode", "SOLVERS"]

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "heun": diffrax.Heun,
}

# score evaluations per accepted-or-rejected step for each explicit solver (FSAL counted once)
_EVALS_PER_STEP = {"tsit5": 6, "dopri5": 6, "dopri8": 12, "heun": 2}


@dataclasses.dataclass(frozen=True)
class ODEOptions:
    """Tolerances and limits of an adaptive solve.

    rtol, atol: PID step-size control tolerances; solver: one of SOLVERS;
    max_steps: diffrax step budget (exhausting it is reported as a failure, not hidden);
    dt0: initial step (None lets diffrax choose);
    norm: "max" (default) controls the error of the worst component -- so in a batched
    solve every point meets the tolerance, as if it were solved alone -- or "rms".
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    solver: str = "tsit5"
    max_steps: int = 20_000
    dt0: float | None = None
    norm: str = "max"

    def __post_init__(self) -> None:
        from hbar.validation import HbarInputError

        if self.norm not in ("max", "rms"):
            raise HbarInputError(f"ODE error norm must be 'max' or 'rms', got {self.norm!r}")
        if self.solver not in SOLVERS:
            raise HbarInputError(f"unknown ODE solver {self.solver!r}; choose from {sorted(SOLVERS)}")
        if not (self.rtol > 0 and self.atol > 0):
            raise HbarInputError(f"ODE tolerances must be > 0, got rtol={self.rtol}, atol={self.atol}")
        if self.max_steps <= 0:
            raise HbarInputError(f"max_steps must be > 0, got {self.max_steps}")


class ODESolution(dict):
    """``y1`` (final state pytree), ``ok`` (bool scalar: solver succeeded),
    ``num_steps`` (steps taken, accepted + rejected), ``evals`` (vector-field evaluations)."""


def solve_ode(
    field: Callable[[Array, Any], Any],
    y0: Any,
    t0: float,
    t1: float,
    options: ODEOptions = ODEOptions(),
) -> ODESolution:
    """Integrate dy/dt = field(t, y) from t0 to t1 with an adaptive explicit solver.

    Traceable (call it inside jit). Failure (step budget exhausted, non-finite state) does
    not raise inside jit; it is returned as ``ok = False`` for the caller to report.
    """
    term = diffrax.ODETerm(lambda t, y, args: field(t, y))
    solver = SOLVERS[options.solver]()
    norm = optx.max_norm if options.norm == "max" else optx.rms_norm
    controller = diffrax.PIDController(rtol=options.rtol, atol=options.atol, norm=norm)
    sol = diffrax.diffeqsolve(
        term,
        solver,
        t0=t0,
        t1=t1,
        dt0=options.dt0,
        y0=y0,
        stepsize_controller=controller,
        max_steps=options.max_steps,
        throw=False,
        saveat=diffrax.SaveAt(t1=True),
    )
    y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
    ok = sol.result == diffrax.RESULTS.successful
    num_steps = sol.stats["num_steps"]
    return ODESolution(
        y1=y1,
        ok=ok,
        num_steps=num_steps,
        evals=num_steps * _EVALS_PER_STEP[options.solver] + 1,
    )


def all_finite_rows(x: Array) -> Array:
    """Boolean (n,) mask: row i of the (n, ...) array has only finite entries."""
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
