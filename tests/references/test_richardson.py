"""Closed-form tests of the Richardson update (hbar.references.fokker_planck.richardson,
docs/theory.md section 8): a sequence e(hx) = a + b hx^p is extrapolated exactly and its order
recovered."""

import numpy as np
import pytest

from hbar.references.fokker_planck.richardson import (
    error_estimate,
    is_asymptotic,
    observed_order,
    richardson_extrapolate,
)


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("p", [1.0, 2.0, 4.0])
def test_power_law_sequence_is_extrapolated_exactly(ratio, p):
    a = np.array([0.5, -1.25, 3.0])
    b = np.array([2.0, -0.7, 10.0])
    hx = 0.1
    e = lambda hx: a + b * hx**p  # noqa: E731
    np.testing.assert_allclose(richardson_extrapolate(e(hx), e(hx / ratio), ratio, p), a, rtol=1e-13, atol=1e-14)
    # the order may be an array (per element), e.g. p = 1 for h = 0 and 2 otherwise
    orders = np.array([1.0, 2.0, 2.0])
    ee = lambda hx: a + b * hx**orders  # noqa: E731
    np.testing.assert_allclose(richardson_extrapolate(ee(hx), ee(hx / ratio), ratio, orders), a, rtol=1e-13)


@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("p", [1.0, 2.0, 3.5])
def test_observed_order_recovered_from_three_levels(ratio, p):
    a, b, hx = 1.7, np.array([0.3, -2.0]), 0.2
    q = [a + b * (hx / ratio**k) ** p for k in range(3)]
    np.testing.assert_allclose(observed_order(*q, ratio), p, rtol=1e-10)


def test_richardson_removes_the_leading_term_only():
    # e = a + b hx^2 + c hx^3: R - a = c (hx/r)^3 + c ((hx/r)^3 - hx^3) / (r^2 - 1), O(hx^3)
    a, b, c, r = 1.0, 3.0, 5.0, 2
    e = lambda hx: a + b * hx**2 + c * hx**3  # noqa: E731
    err = [float(richardson_extrapolate(e(hx), e(hx / r), r, 2)) - a for hx in (0.1, 0.05)]
    exact = [c * (hx / r) ** 3 + c * ((hx / r) ** 3 - hx**3) / (r**2 - 1) for hx in (0.1, 0.05)]
    np.testing.assert_allclose(err, exact, rtol=1e-9)
    assert err[0] / err[1] == pytest.approx(r**3, rel=1e-9)


def test_observed_order_undefined_for_equal_levels():
    assert np.isnan(observed_order(1.0, 1.0, 2.0, 2))
    assert np.isnan(observed_order(1.0, 2.0, 2.0, 2))
    assert np.isnan(observed_order(np.nan, 2.0, 2.5, 2))
    np.testing.assert_array_equal(np.isnan(observed_order([1.0, 1.0], [2.0, 1.0], [2.5, 3.0], 2)), [False, True])


def test_asymptotic_range_and_error_estimate():
    np.testing.assert_array_equal(is_asymptotic([1.4, 1.5, 2.0, 3.0, 3.1, np.nan], 2.0),
                                  [False, True, True, True, False, False])
    np.testing.assert_array_equal(is_asymptotic([0.5, 1.0], [1.0, 2.0]), [True, False])
    # asymptotic: |R_k - R_{k-1}|; otherwise the larger of that and |Q_k - Q_{k-1}|
    assert float(error_estimate(1.0, 1.001, 0.05, True)) == pytest.approx(1e-3)
    assert float(error_estimate(1.0, 1.001, 0.05, False)) == pytest.approx(0.05)
    assert float(error_estimate(1.0, 1.1, 0.05, False)) == pytest.approx(0.1)
