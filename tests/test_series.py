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
