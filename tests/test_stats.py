"""hbar.stats: mean and s.e., and the Pareto k-hat tail diagnostic of importance weights
(docs/theory.md section 3.10), checked on samples whose tail index is known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hbar.stats import khat_threshold, mean_se, pareto_khat


def test_mean_se():
    m, s = mean_se([1.0, 2.0, 3.0, 4.0])
    assert m == 2.5 and s == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert math.isnan(mean_se([1.0])[1]) and all(math.isnan(v) for v in mean_se([]))


@pytest.mark.parametrize("xi", [0.2, 0.5, 0.8, 1.2])
def test_khat_recovers_the_tail_index_of_pareto_weights(xi):
    """Weights drawn from a generalised Pareto law of shape xi (quantile transform): the mean
    k-hat over 20 rows of 4096 weights is within 0.1 of xi (its spread per row is about 0.1-0.2)."""
    rng = np.random.default_rng(0)
    u = rng.uniform(size=(20, 4096))
    w = (u ** (-xi) - 1.0) / xi
    k = pareto_khat(np.log(w + 1e-300))
    assert k.shape == (20,) and abs(k.mean() - xi) < 0.1, k.mean()


def test_khat_light_tails_and_invariance():
    rng = np.random.default_rng(1)
    lw = rng.normal(0.0, 0.5, size=(10, 4096))  # log-normal weights: every moment finite
    k = pareto_khat(lw)
    assert np.all(k < 0.4), k
    np.testing.assert_allclose(pareto_khat(lw + 123.0), k, atol=1e-12)  # the scale of the weights does not matter


def test_khat_nan_where_no_tail_can_be_fitted():
    lw = np.zeros((3, 4096))
    lw[1, 5] = np.nan
    lw[2] = np.random.default_rng(2).normal(size=4096)
    k = pareto_khat(lw)
    assert math.isnan(k[0]) and math.isnan(k[1]) and np.isfinite(k[2])  # constant row, non-finite row
    assert np.all(np.isnan(pareto_khat(np.random.default_rng(3).normal(size=(2, 20)))))  # tail of 4 weights
    assert pareto_khat(np.random.default_rng(4).normal(size=500)).shape == (1,)


def test_khat_threshold():
    assert khat_threshold(100) == pytest.approx(0.5)
    assert khat_threshold(1000) == pytest.approx(1 - 1 / 3)
    assert khat_threshold(4096) == 0.7 and khat_threshold(10**6) == 0.7


def test_khat_extreme_tails_zero_weights_and_ties():
    """A few weights dominating beyond the float range is the heaviest case (+inf, flagged), a
    zero weight (log-weight -inf) is a weight, and ties at the cut-off do not blow the fit up."""
    rng = np.random.default_rng(5)
    k = pareto_khat(rng.normal(0.0, 40.0, size=(3, 4096)))  # ESS about 1: one weight carries everything
    assert np.all(k > khat_threshold(4096)), k
    few = np.r_[0.0, -1.0, -2.0, rng.normal(-100.0, 1.0, 4093)]  # three weights, the rest e^-100 below
    assert pareto_khat(few)[0] > khat_threshold(4096)
    lw = rng.normal(0.0, 0.5, size=(2, 4096))
    ref = pareto_khat(lw)
    lw[:, 7] = -np.inf
    np.testing.assert_allclose(pareto_khat(lw), ref, atol=1e-12)  # the zero weight is far below the tail
    ties = rng.normal(0.0, 0.5, size=(1, 4096))
    ties[0, np.argsort(ties[0])[-300:-100]] = np.sort(ties[0])[-300]  # half the tail tied at the cut-off
    assert -1.0 < pareto_khat(ties)[0] < 0.5  # a light tail (clamping the ties to 1e-300 gave k-hat > 100)
