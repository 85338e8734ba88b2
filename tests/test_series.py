"""Coefficients of the h-series read off brute-force values."""

import numpy as np
import pytest

import hbar
from hbar.series import polynomial_coefficients


def test_polynomial_coefficients_recover_a_polynomial():
    hs = [0.05, 0.1, 0.2, 0.3]
    vals = [1.0 - 0.4 * h + 2.0 * h**2 + 0.5 * h**3 for h in hs]
    np.testing.assert_allclose(polynomial_coefficients(hs, vals, 1.0, 3), [-0.4, 2.0, 0.5], rtol=1e-10)
    # with value0 wrong the fit no longer recovers the slope: value0 really anchors it
    assert abs(polynomial_coefficients(hs, vals, 1.01, 3)[0] + 0.4) > 0.05


def test_polynomial_coefficients_reject_bad_input():
    with pytest.raises(hbar.HbarInputError, match="distinct"):
        polynomial_coefficients([0.1, 0.1], [1.0, 1.0], 1.0, 2)
    with pytest.raises(hbar.HbarInputError, match="same length"):
        polynomial_coefficients([0.1, 0.2], [1.0], 1.0, 1)
    with pytest.raises(hbar.HbarInputError, match="finite"):
        polynomial_coefficients([0.1, 0.2], [1.0, np.nan], 1.0, 1)


def test_pade_radius_and_trust():
    """Geometric test series NLL(h) = NLL0 + C1 h / (1 - h/rho): Pade [0/1] is exact, the radius
    estimate is rho, WKB is trusted only well inside it."""
    from hbar.series import evaluate_series, pade01, series_radius

    rho = np.array([0.05, 2.0])
    c1 = np.array([-1.0, 0.5])
    c2 = c1 / rho
    nll0 = np.array([1.0, 2.0])
    h = np.array([0.01, 0.04, 0.5])
    exact = nll0[None] + h[:, None] * c1[None] / (1 - h[:, None] / rho[None])
    np.testing.assert_allclose(series_radius(c1, c2), rho)
    np.testing.assert_allclose(pade01(nll0, c1, c2, h[:2]), exact[:2])
    assert np.isnan(pade01(nll0, c1, c2, 0.5)[0])  # beyond the first point's pole
    ev = evaluate_series(nll0, c1, c2, h, order=2, tol=1e-3)
    true_err = np.abs(ev.wkb_points - exact).mean(axis=1)
    assert ev.trusted.tolist() == [True, False, False]
    assert true_err[0] <= ev.truncation_error[0] * 1.01 and ev.truncation_error[2] == np.inf
