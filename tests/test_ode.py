"""hbar.ode: evaluation counters, error control on selected components, stage-loop variants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.ode import ODEOptions, solve_ode
from hbar.validation import HbarInputError


def _counting_field():
    calls = []

    def field(t, y):
        jax.debug.callback(lambda: calls.append(1), ordered=False)
        x, aux = y
        return (-x, jnp.cos(3 * t) * x[:, None] * aux)

    return field, calls


@pytest.mark.parametrize("solver", ["tsit5", "dopri5", "dopri8", "heun"])
@pytest.mark.parametrize("dt0", [None, 0.05])
def test_evals_counts_every_vector_field_call(solver, dt0):
    """``evals`` is the number of times the field is really called (counted by a callback)."""
    field, calls = _counting_field()
    y0 = (jnp.ones(3), jnp.ones((3, 2)))
    sol = jax.jit(lambda y: dict(solve_ode(field, y, 0.0, 2.0, ODEOptions(rtol=1e-6, atol=1e-6, solver=solver, dt0=dt0))))(y0)
    jax.block_until_ready(sol)
    jax.effects_barrier()
    assert bool(sol["ok"])
    assert int(sol["evals"]) == len(calls)
    assert int(sol["num_rejected"]) <= int(sol["num_steps"])


def test_error_on_returned_ignores_auxiliary_state():
    """A stiff-ish auxiliary component forces small steps under error_on='all' but not under
    'returned' (default) when the caller controls only the first component; the controlled
    component still meets the tolerance."""
    def field(t, y):
        x, aux = y
        return (-x, jnp.cos(200 * t) * 50 * aux)

    y0 = (jnp.ones(4), jnp.ones(4))
    ctrl = lambda y: y[0]  # noqa: E731
    run = lambda o: solve_ode(field, y0, 0.0, 1.0, o, controlled=ctrl)  # noqa: E731
    ret = run(ODEOptions(rtol=1e-7, atol=1e-7))
    allc = run(ODEOptions(rtol=1e-7, atol=1e-7, error_on="all"))
    assert int(ret["num_steps"]) < int(allc["num_steps"]) / 2
    np.testing.assert_allclose(ret["y1"][0], np.exp(-1.0), rtol=1e-6)


def test_stage_loop_variants_give_the_same_solution():
    def field(t, y):
        return jnp.sin(t) * y - y**3

    y0 = jnp.linspace(-1.0, 1.0, 5)
    a = solve_ode(field, y0, 0.0, 3.0, ODEOptions(stage_loop="scan"))
    b = solve_ode(field, y0, 0.0, 3.0, ODEOptions(stage_loop="while"))
    np.testing.assert_allclose(a["y1"], b["y1"], rtol=1e-13)
    assert int(a["num_steps"]) == int(b["num_steps"])


@pytest.mark.parametrize("bad", [dict(error_on="some"), dict(stage_loop="for"), dict(norm="l1")])
def test_bad_options_are_rejected(bad):
    with pytest.raises(HbarInputError):
        ODEOptions(**bad)


# --- failure semantics (issue 15; docs/theory.md section 14.1, 14.3) ------------------------------

@pytest.mark.parametrize("bad", [dict(rtol=float("inf")), dict(atol=float("nan")), dict(rtol=0.0), dict(atol=-1e-5),
                                 dict(max_steps=0), dict(min_step=1.0), dict(min_step=-1e-3)])
def test_non_finite_or_non_positive_tolerances_are_rejected(bad):
    with pytest.raises(HbarInputError):
        ODEOptions(**bad)


def test_non_finite_field_ends_the_solve_within_a_few_steps():
    """A field that turns NaN mid-way: the solve fails after a few dozen steps (the step size
    collapses below min_step |t1 - t0|), not after max_steps."""
    field = lambda t, y: jnp.where(t > 0.5, jnp.nan, -y)
    opts = ODEOptions(max_steps=20_000)
    sol = jax.jit(lambda y: dict(solve_ode(field, y, 0.0, 1.0, opts)))(jnp.ones(3))
    assert not bool(sol["ok"])
    assert int(sol["num_steps"]) < 100
    # the clean field succeeds with the same options
    sol = jax.jit(lambda y: dict(solve_ode(lambda t, y: -y, y, 0.0, 1.0, opts)))(jnp.ones(3))
    assert bool(sol["ok"]) and int(sol["num_steps"]) < 100


def test_bound_ends_a_diverging_solve_at_once():
    """dy/dt = 3 y from y = 1 leaves [-10, 10] at t = log(10)/3 ~ 0.77: with bound 10 the solve
    stops there (failed) after few steps; only the bounded part counts."""
    grow = lambda t, y: (3.0 * y[0], 1000.0 * jnp.ones_like(y[1]))
    y0 = (jnp.ones(2), jnp.zeros(2))
    run = jax.jit(lambda y, b: dict(solve_ode(grow, y, 0.0, 2.0, ODEOptions(), bound=b, bounded=lambda s: s[0])))
    sol = run(y0, 10.0)
    assert not bool(sol["ok"])
    x, aux = sol["y1"]
    assert 10.0 < float(jnp.max(x)) < 20.0  # the first accepted state past the bound
    sol = run(y0, 500.0)  # x ends at e^6 ~ 403 < 500; aux reaches 2000 but is not bounded
    assert bool(sol["ok"])
    np.testing.assert_allclose(sol["y1"][0], np.exp(6.0), rtol=1e-4)
