"""The one adaptive ODE integrator of hbar (a thin layer over diffrax).

Every deterministic solve in the library -- the probability-flow sampler, the h = 0
likelihood, the WKB characteristic solves and the finite-difference baseline -- goes
through :func:`solve_ode`, so tolerances, step limits and failure reporting are handled
in one place. The state ``y`` may be any pytree of arrays; the vector field has the
signature ``field(t, y) -> dy/dt`` with the same pytree structure. Integration runs from
``t0`` to ``t1`` in either direction (diffrax handles t1 < t0).

Error control. The PID controller bounds the local error of the state scaled by
``atol + rtol |y|``, measured by ``ODEOptions.norm`` ("max": the worst entry, so in a batched
solve every row meets the tolerance). Which entries count is ``ODEOptions.error_on``:
"returned" (default) watches only the part of the state the caller returns, as selected by the
``controlled`` argument of :func:`solve_ode` (the WKB backward solve returns X, psi0, psi1[, psi2]
and carries the Taylor tensors G, H, ... as auxiliary state: measured on the paper's network,
controlling only the returned part takes 65 instead of 111 steps for the same C1 accuracy); "all"
watches every entry (the behaviour before this option, kept for comparison).

Loop structure. diffrax's Runge-Kutta solvers run their stages in an inner
``while_loop``; inside the step loop that made each evaluation of the WKB backward field
1.5-1.65x as expensive as the same function jitted alone (measured: order-1 right-hand side,
paper network, 200 points; the adjoint is not the cause: ForwardMode, which stores nothing,
costs the same, while DirectAdjoint, which also switches the stages to a bounded scan, removes
the penalty). Running the stages as a bounded scan (``scan_kind="bounded"``,
``ODEOptions.stage_loop = "scan"``) removes it (0.98-0.99x); for the cheap probability-flow
field it does not pay (order 0, 2-D: scan / while = 1.02 in benchmarks/run.py), so "auto" lets
the caller choose and only the WKB backward solve asks for the scan.

Failure (docs/theory.md section 14.1, 14.3). A solve ends at once, reported as ``ok = False``,
when (a) the state becomes non-finite or, with a ``bound``, a bounded entry leaves
[-bound, bound] after an accepted step (a diffrax event), or (b) the step size falls below
``ODEOptions.min_step`` |t1 - t0|: a non-finite vector field makes every attempted step fail the
error test and shrink the step, so this ends the solve after a few dozen rejected steps (measured:
56 rejected steps, 529 field evaluations for a NaN field in 1-D float64; diffrax shrinks by less
than its nominal factor 1/5 when the error norm is NaN) instead of burning through ``max_steps``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import optimistix as optx
from jax import Array

__all__ = ["ODEOptions", "ODESolution", "solve_ode", "error_norm", "SOLVERS", "all_finite_rows"]

SOLVERS: dict[str, Callable[[], diffrax.AbstractSolver]] = {
    "tsit5": diffrax.Tsit5,
    "dopri5": diffrax.Dopri5,
    "dopri8": diffrax.Dopri8,
    "heun": diffrax.Heun,
}

# vector-field evaluations per accepted-or-rejected step of each explicit solver (first-same-as-
# last stages counted once) and once per solve (checked against a counting callback in
# tests/test_ode.py, with and without diffrax's initial step-size selection)
_EVALS_PER_STEP = {"tsit5": 6, "dopri5": 6, "dopri8": 13, "heun": 2}
_EVALS_AT_START = {"tsit5": 1, "dopri5": 1, "dopri8": 1, "heun": 0}


@dataclasses.dataclass(frozen=True)
class ODEOptions:
    """Tolerances and limits of an adaptive solve.

    rtol, atol: PID step-size control tolerances; solver: one of SOLVERS;
    max_steps: diffrax step budget (exhausting it is reported as a failure, not hidden);
    dt0: initial step (None lets diffrax choose);
    norm: "max" (default) controls the error of the worst component -- so in a batched
    solve every point meets the tolerance, as if it were solved alone -- or "rms";
    error_on: "returned" (default) applies the norm only to the components selected by the
    caller's ``controlled`` function (the quantities the solve returns; auxiliary state such
    as the WKB Taylor tensors G, H is carried but does not set the step size), "all" to every
    component of the state. Without a ``controlled`` selector both are the same;
    stage_loop: "scan" runs the Runge-Kutta stages as a bounded scan, "while" as diffrax's
    default inner while loop, "auto" (default) lets the caller choose (``stage_loop`` argument
    of :func:`solve_ode`; "while" if it does not): the WKB backward solve uses "scan" (its
    expensive field was 1.5-1.65x slower per evaluation in the while loop), the cheap
    probability-flow field "while" (the scan does not pay there; see the module docstring);
    min_step: the solve fails (fast) when the step size falls below min_step |t1 - t0|
    (default 1e-10: a step that small means a non-finite vector field or a singularity, and the
    solve could not finish within any step budget), docs/theory.md section 14.3.
    """

    rtol: float = 1e-5
    atol: float = 1e-5
    solver: str = "tsit5"
    max_steps: int = 20_000
    dt0: float | None = None
    norm: str = "max"
    error_on: str = "returned"
    stage_loop: str = "auto"
    min_step: float = 1e-10

    def __post_init__(self) -> None:
        from hbar.validation import HbarInputError

        if self.error_on not in ("returned", "all"):
            raise HbarInputError(f"ODE error_on must be 'returned' or 'all', got {self.error_on!r}")
        if self.stage_loop not in ("auto", "scan", "while"):
            raise HbarInputError(f"ODE stage_loop must be 'auto', 'scan' or 'while', got {self.stage_loop!r}")
        if self.norm not in ("max", "rms"):
            raise HbarInputError(f"ODE error norm must be 'max' or 'rms', got {self.norm!r}")
        if self.solver not in SOLVERS:
            raise HbarInputError(f"unknown ODE solver {self.solver!r}; choose from {sorted(SOLVERS)}")
        from hbar.validation import check_number, check_positive_int

        for name in ("rtol", "atol"):
            check_number(getattr(self, name), f"ODE tolerance {name}", positive=True)
        check_positive_int(self.max_steps, "max_steps")
        if self.dt0 is not None:
            check_number(self.dt0, "ODE dt0", positive=True)
        if not 0 <= check_number(self.min_step, "ODE min_step") < 1:
            raise HbarInputError(f"ODE min_step must be in [0, 1), got {self.min_step}")


class ODESolution(dict):
    """``y1`` (final state pytree), ``ok`` (bool scalar: solver succeeded),
    ``num_steps`` (steps taken, accepted + rejected), ``num_rejected`` (rejected steps),
    ``evals`` (vector-field evaluations, each on the whole state: one call of ``field``)."""


def error_norm(options: ODEOptions, controlled: Callable[[Any], Any] | None = None) -> Callable[[Any], Array]:
    """The norm the step-size controller applies to the scaled error pytree: max or rms over
    the entries of ``controlled(error)`` (every entry when ``controlled`` is None or
    ``options.error_on == "all"``)."""
    base = optx.max_norm if options.norm == "max" else optx.rms_norm
    if controlled is None or options.error_on == "all":
        return base
    return lambda tree: base(controlled(tree))


def solve_ode(
    field: Callable[[Array, Any], Any],
    y0: Any,
    t0: float,
    t1: float,
    options: ODEOptions = ODEOptions(),
    controlled: Callable[[Any], Any] | None = None,
    stage_loop: str = "while",
    bound: Array | float | None = None,
    bounded: Callable[[Any], Any] | None = None,
) -> ODESolution:
    """Integrate dy/dt = field(t, y) from t0 to t1 with an adaptive explicit solver.

    ``controlled``: optional map from a state-shaped pytree to the sub-pytree whose local
    error sets the step size (the returned quantities; see ``ODEOptions.error_on``). It is
    applied to the scaled error, so it must only select leaves, not compute.
    ``stage_loop``: the caller's choice used when ``options.stage_loop == "auto"``.

    ``bound``: optional scalar (may be traced); the solve stops, failed, as soon as an entry of
    ``bounded(y)`` (default: the whole state) leaves [-bound, bound] after an accepted step.

    Traceable (call it inside jit). Failure (step budget exhausted, non-finite state, state
    out of bound, step size below ``options.min_step`` |t1 - t0|) does not raise inside jit;
    it ends the solve at once and is returned as ``ok = False`` for the caller to report
    (docs/theory.md section 14.3).
    """
    term = diffrax.ODETerm(lambda t, y, args: field(t, y))
    solver = SOLVERS[options.solver]()
    loop = stage_loop if options.stage_loop == "auto" else options.stage_loop
    if loop == "scan":
        solver = eqx.tree_at(lambda s: s.scan_kind, solver, "bounded", is_leaf=lambda v: v is None)
    span = abs(t1 - t0)
    controller = diffrax.PIDController(rtol=options.rtol, atol=options.atol,
                                       norm=error_norm(options, controlled),
                                       dtmin=options.min_step * span if options.min_step > 0 else None,
                                       force_dtmin=False)
    select = bounded if bounded is not None else (lambda tree: tree)

    def blown_up(t, y, args, **kwargs):
        leaves = jax.tree_util.tree_leaves(y)
        bad = jnp.logical_not(jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])))
        if bound is not None:
            far = [jnp.any(jnp.abs(a) > bound) for a in jax.tree_util.tree_leaves(select(y))]
            bad = bad | jnp.any(jnp.stack(far))
        return bad

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
        event=diffrax.Event(blown_up),
    )
    y1 = jax.tree_util.tree_map(lambda a: a[-1], sol.ys)
    ok = sol.result == diffrax.RESULTS.successful
    num_steps = sol.stats["num_steps"]
    evals = num_steps * _EVALS_PER_STEP[options.solver] + _EVALS_AT_START[options.solver]
    return ODESolution(
        y1=y1,
        ok=ok,
        num_steps=num_steps,
        num_rejected=sol.stats["num_rejected_steps"],
        evals=evals,
    )


def all_finite_rows(x: Array) -> Array:
    """Boolean (n,) mask: row i of the (n, ...) array has only finite entries."""
    return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)
