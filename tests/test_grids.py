"""hbar.grids: named time grids (docs/theory.md section 2.6)."""

import jax
import numpy as np
import pytest

import hbar
from hbar.grids import GRIDS, grid_resolution, log_snr, make_grid
from hbar.sampling import time_grid
from hbar.validation import HbarInputError

SCHEDULES = [hbar.SimpleSchedule(), hbar.CosineSchedule(), hbar.VPLinearSchedule(), hbar.VESchedule(),
             hbar.OUSchedule()]


@pytest.mark.parametrize("sch", SCHEDULES, ids=lambda s: type(s).__name__)
def test_default_grid_resolves_t_min(sch):
    """log-snr: exact ends, decreasing, equal log-SNR steps, every step's relative noise variance
    g^2 D / sigma^2 small at 100 steps; the uniform grid's last step is >= 3.9."""
    ts = make_grid(sch, 100, "log-snr")
    assert ts[0] == sch.T and ts[-1] == sch.t_min and np.all(np.diff(ts) < 0)
    lam = log_snr(sch, ts)
    np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-6)
    assert grid_resolution(sch, ts).max() < 0.3
    assert grid_resolution(sch, make_grid(sch, 100, "uniform"))[-1] > 3.5


def test_grids_nest_and_edm_power():
    sch = hbar.SimpleSchedule()
    for g in GRIDS:  # doubling the steps keeps every node (the path-integral ladder relies on it)
        np.testing.assert_allclose(make_grid(sch, 200, g)[::2], make_grid(sch, 100, g), rtol=1e-10, atol=1e-13)
    ts = make_grid(sch, 50, "edm", rho=3.0)
    s = np.exp(-0.5 * log_snr(sch, ts)) ** (1 / 3.0)
    np.testing.assert_allclose(np.diff(s), np.diff(s)[0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(time_grid(sch, 50, grid="edm", rho=3.0)), ts)
    np.testing.assert_allclose(np.asarray(time_grid(sch, 10)), np.linspace(sch.T, sch.t_min, 11))
    with pytest.raises(HbarInputError):
        make_grid(sch, 10, "cubic")


def test_sample_on_named_grid():
    sch = hbar.SimpleSchedule()
    sc = hbar.gaussian_score(np.zeros(2), np.eye(2), sch)
    r = hbar.sample(sc, sch, jax.random.PRNGKey(0), 64, 0.5, steps=20, grid="log-snr", d=2)
    np.testing.assert_allclose(r.times, make_grid(sch, 20, "log-snr"), rtol=1e-6)
    assert r.n_failed == 0
