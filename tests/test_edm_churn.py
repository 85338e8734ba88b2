"""hbar.sampling.edm_churn: EDM's S_churn / S_tmin / S_tmax as an h(t) (docs/theory.md section 2.7),
checked against a direct simulation of EDM's churn step on a 1-D Gaussian with the exact score."""

import jax
import numpy as np
import pytest

import hbar
from hbar.grids import make_grid
from hbar.sampling import HSteps, edm_churn, sample
from hbar.validation import HbarInputError

SD, N, S_CHURN, LO, HI = 0.5, 10, 8.0, 0.1, 2.0


def _edm_direct(xT, s, rng):
    """EDM Algorithm 2's churn step (S_noise = 1) with the exact probability-flow ODE of the
    Gaussian (a scaling by sqrt(v)), so no discretisation error."""
    x = xT.copy()
    gamma = min(S_CHURN / N, np.sqrt(2) - 1)
    for i in range(N):
        g = gamma if LO <= s[i] <= HI else 0.0
        s_hat = (1 + g) * s[i]
        x = x + np.sqrt(s_hat**2 - s[i] ** 2) * rng.standard_normal(x.shape)
        x = x * np.sqrt((SD**2 + s[i + 1] ** 2) / (SD**2 + s_hat**2))
    return x


def _corr_h_process(hs, s):
    """corr(x_T, x_end) of the continuous h-process with step-wise h (section 2.7)."""
    v = SD**2 + s**2
    return float(np.prod((v[1:] / v[:-1]) ** ((1 + hs) / 2)) * np.sqrt(v[0] / v[-1]))


def test_edm_churn_matches_direct_churn_simulation():
    with jax.enable_x64(True):
        sched = hbar.EDMSchedule(t_min=0.02, T=5.0)
        exact = hbar.GaussianMixtureScore([1.0], [[0.0]], [[[SD**2]]], sched)
        churn = edm_churn(S_CHURN, LO, HI, N, sched, sigma_data=SD)
        s = make_grid(sched, N, "edm")  # s = t on the EDM schedule
        hs = np.asarray(churn.hs)
        inside = (s[:-1] >= LO) & (s[:-1] <= HI)
        assert np.all(hs[~inside] == 0) and np.all(hs[inside] > 0.5)
        n = 20000
        rng = np.random.default_rng(0)
        xT = np.sqrt(SD**2 + s[0] ** 2) * rng.standard_normal(n)
        x_edm = _edm_direct(xT, s, rng)
        res = sample(exact, sched, jax.random.PRNGKey(1), n, churn, steps=40 * N, method="heun", grid="edm",
                     x_T=xT[:, None])
        x_h = res.samples[:, 0]
    var_se = lambda a: a.var() * np.sqrt(2 / n)
    corr = lambda a: np.corrcoef(a, xT)[0, 1]
    c_edm, c_h = corr(x_edm), corr(x_h)
    c_se = (1 - c_edm**2) / np.sqrt(n)
    # same marginal variance (sigma_d^2 + t_min^2) and the same correlation with x_T
    assert abs(x_h.var() - x_edm.var()) < 4 * np.hypot(var_se(x_h), var_se(x_edm))
    assert abs(x_h.var() - (SD**2 + s[-1] ** 2)) < 4 * var_se(x_h)
    assert abs(c_h - c_edm) < 4 * np.sqrt(2) * c_se
    # the exact h gives EDM's correlation exactly; no churn (h = 0) and the approximate mappings miss it
    gamma = np.where(inside, min(S_CHURN / N, np.sqrt(2) - 1), 0.0)
    c_exact = float(np.prod(np.sqrt((SD**2 + s[1:] ** 2) / (SD**2 + ((1 + gamma) * s[:-1]) ** 2)))
                    * np.sqrt((SD**2 + s[0] ** 2) / (SD**2 + s[-1] ** 2)))
    assert _corr_h_process(hs, s) == pytest.approx(c_exact, rel=1e-12)
    assert abs(c_edm - c_exact) < 4 * c_se and abs(c_h - c_exact) < 4 * c_se
    si, sj = s[:-1], s[1:]
    for wrong in (0 * hs, gamma * si / (si - sj), gamma * (2 + gamma) * si**2 / (si**2 - sj**2),
                  np.log1p(gamma) / np.log(si / sj)):
        assert abs(_corr_h_process(wrong, s) - c_exact) > 6 * c_se  # the 4-s.e. checks above would fail


def test_hsteps_is_piecewise_constant_on_the_grid():
    steps = HSteps(np.array([3.0, 2.0, 1.0]), np.array([0.5, 2.0]))
    got = np.asarray(jax.vmap(steps)(np.array([4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5])))
    np.testing.assert_array_equal(got, [0.5, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0])  # (t_{k+1}, t_k] -> hs[k]


def test_edm_churn_input_errors():
    sched = hbar.EDMSchedule()
    with pytest.raises(HbarInputError, match="S_tmin <= S_tmax"):
        edm_churn(10, 2.0, 1.0, 18, sched)
    with pytest.raises(HbarInputError, match="S_churn"):
        edm_churn(-1, 0.0, 1.0, 18, sched)
