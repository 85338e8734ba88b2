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
