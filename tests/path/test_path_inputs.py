"""hbar.path: bad input raises HbarInputError naming the problem."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _path_cases import OU

from hbar.path import (
    backward_path_logp,
    forward_path_logp,
    path_kl_bound,
    path_kl_closed_form,
    path_kl_monte_carlo,
    path_log_likelihood,
    path_nll,
    sample_forward_paths,
)
from hbar.scores import AffineScore
from hbar.validation import HbarInputError


def test_bad_inputs():
    sc = AffineScore([0.0, 0.0], np.eye(2), OU)
    x = np.zeros((3, 2))
    key = jax.random.PRNGKey(0)
    for bad_h in (0.0, -1.0, float("nan")):
        with pytest.raises(HbarInputError):
            path_log_likelihood(sc, OU, x, bad_h, key, n_paths=4, steps=4)
        with pytest.raises(HbarInputError):
            path_kl_closed_form(sc, OU, bad_h, sc)
    with pytest.raises(HbarInputError):
        path_nll(sc, OU, x, [0.5, 0.0], key, n_paths=4, steps=4)
    with pytest.raises(HbarInputError):
        path_kl_bound(sc, OU, x, [0.0], key)
    with pytest.raises(HbarInputError, match="NaN"):
        path_log_likelihood(sc, OU, np.array([[0.0, np.nan]]), 0.5, key, n_paths=4, steps=4)
    with pytest.raises(HbarInputError, match="dimension"):
        path_log_likelihood(sc, OU, np.zeros((3, 3)), 0.5, key, n_paths=4, steps=4)
    with pytest.raises(HbarInputError):
        path_log_likelihood(sc, OU, x, 0.5, key, n_paths=4, steps=4, proposal="bridge")
    ps = sample_forward_paths(OU, x, key, 5)
    with pytest.raises(HbarInputError):
        backward_path_logp(sc, OU, 0.0, ps.path, ps.times)
    with pytest.raises(HbarInputError, match="shape"):
        backward_path_logp(sc, OU, 0.5, ps.path[:-1], ps.times)
    with pytest.raises(HbarInputError, match="dimension"):
        backward_path_logp(sc, OU, 0.5, np.zeros((6, 3, 3)), ps.times)
    with pytest.raises(HbarInputError, match="NaN"):
        backward_path_logp(sc, OU, 0.5, np.full((6, 3, 2), np.nan), ps.times)
    with pytest.raises(HbarInputError):
        forward_path_logp(OU, ps.path, np.r_[ps.times[:3], ps.times[2:5]])  # not strictly monotone
    with pytest.raises(HbarInputError):
        forward_path_logp(OU, ps.path, ps.times, convention="stratonovich")
    with pytest.raises(HbarInputError):
        forward_path_logp(OU, ps.path, ps.times, h=0.5)  # h != 1 needs a score
    with pytest.raises(HbarInputError):
        path_kl_monte_carlo(sc, OU, 0.5, AffineScore([0.0, 0.0], np.eye(2), OU, scale_eps=0.1), key)
