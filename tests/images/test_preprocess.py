"""Tests for hbar.images.preprocess: the dequantisation map, its inverse, and the bits/dim
offsets against hand computations (docs/theory.md sections 13.1-13.2)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hbar.data import digits_bits_per_dim
from hbar.images.preprocess import bits_per_dim, dequantize_jax, from_model_space, to_model_space
from hbar.validation import HbarInputError


def test_centre_map_by_hand():
    k = np.array([[[0, 255], [128, 1]]], dtype=np.uint8)
    x = to_model_space(k, 256)
    np.testing.assert_allclose(x, [[2 * 0.5 / 256 - 1, 2 * 255.5 / 256 - 1, 2 * 128.5 / 256 - 1, 2 * 1.5 / 256 - 1]])
    assert x.shape == (1, 4) and x.dtype == np.float64
    np.testing.assert_array_equal(to_model_space(k, 256, "centre"), x)
    # u = 0 and u -> 1 are the bin edges: [-1, 1) is covered, bin width 2 / levels
    np.testing.assert_allclose(to_model_space(np.array([[0, 16]]), 17, u=0.0), [[-1.0, 2 * 16 / 17 - 1]])
    top = to_model_space(np.array([[16]]), 17, u=np.nextafter(1.0, 0))[0, 0]
    assert 1.0 - 1e-8 < top < 1.0


@pytest.mark.parametrize("levels", [2, 17, 100, 255, 256])
def test_round_trip_exhaustive_at_bin_edges(levels):
    k = np.arange(levels)[None, :]
    for u in (0.0, np.nextafter(1.0, 0.0), 1.0 - 2.0**-40):
        np.testing.assert_array_equal(from_model_space(to_model_space(k, levels, u), (1, levels), levels), k[:, None, :])


@settings(max_examples=50, deadline=None)
@given(levels=st.sampled_from([2, 17, 256]), seed=st.integers(0, 2**31 - 1),
       u_edge=st.sampled_from([0.0, 0.5, float(np.nextafter(1.0, 0.0)), 1 - 1e-9, None]))
def test_round_trip_for_any_u_in_unit_interval(levels, seed, u_edge):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, levels, size=(3, 4, 5)).astype(np.uint8)
    u = rng.random(size=(3, 20)) if u_edge is None else u_edge
    x = to_model_space(k, levels, u)
    assert np.all(x >= -1) and np.all(x < 1)
    np.testing.assert_array_equal(from_model_space(x, (4, 5), levels), k)


def test_random_offsets_from_generator_and_jax_key():
    k = np.full((200, 8, 8), 3, dtype=np.uint8)
    x1 = to_model_space(k, 17, np.random.default_rng(0))
    x2 = to_model_space(k, 17, np.random.default_rng(0))
    np.testing.assert_array_equal(x1, x2)
    for x in (x1, to_model_space(k, 17, jax.random.key(0)), to_model_space(k, 17, jax.random.PRNGKey(1))):
        u = (x + 1) * 17 / 2 - 3
        assert np.all(u >= 0) and np.all(u < 1)
        assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert not np.array_equal(to_model_space(k, 17, jax.random.key(0)), to_model_space(k, 17, jax.random.key(1)))


def test_dequantize_jax_is_traceable_and_matches_the_formula():
    k = jnp.asarray(np.random.default_rng(1).integers(0, 256, (64, 784)), dtype=jnp.float32)
    key = jax.random.key(3)
    x = jax.jit(dequantize_jax, static_argnums=2)(key, k, 256)
    assert x.shape == k.shape and x.dtype == jnp.float32
    u = jax.random.uniform(key, k.shape, k.dtype)
    np.testing.assert_allclose(np.asarray(x), np.asarray(2 * (k + u) / 256 - 1), rtol=0, atol=1e-6)


def test_bits_per_dim_offsets_by_hand():
    # bits/dim = NLL / (d ln 2) + log2(levels / 2) on [-1, 1)
    assert bits_per_dim(0.0, 784, 256) == pytest.approx(7.0, abs=1e-13)
    assert bits_per_dim(0.0, 64, 17) == pytest.approx(math.log2(8.5), abs=1e-13)
    nll = 1234.5
    assert bits_per_dim(nll, 784, 256) == pytest.approx(nll / (784 * math.log(2)) + 7.0, rel=1e-14)
    np.testing.assert_allclose(bits_per_dim(np.array([0.0, 784 * math.log(2)]), 784, 256), [7.0, 8.0])
    # the digits helper in hbar.data delegates to the same formula
    assert digits_bits_per_dim(nll) == pytest.approx(float(bits_per_dim(nll, 64, 17)), rel=1e-14)


@pytest.mark.parametrize("levels,d", [(256, 784), (17, 64), (2, 3)])
def test_uniform_density_gives_log2_levels(levels, d):
    """p(x) = 2^-d on [-1, 1)^d: NLL = d ln 2 nats, and P(k) = levels^-d exactly, so the
    dequantisation bound is tight: log2(levels) bits/dim (8 for 256 levels)."""
    assert bits_per_dim(d * math.log(2.0), d, levels) == pytest.approx(math.log2(levels), abs=1e-12)


def test_from_model_space_clips_out_of_range_samples():
    x = np.array([[-3.0, 5.0, np.nan, 0.0]])
    np.testing.assert_array_equal(from_model_space(x, (2, 2), 256)[0], [[0, 255], [0, 128]])


@pytest.mark.parametrize("bad", [np.array([[0, 17]]), np.array([[-1, 0]]), np.array([[0.5, 1]]), np.array([1, 2])])
def test_bad_pixels_refused(bad):
    with pytest.raises(HbarInputError):
        to_model_space(bad, 17)


def test_bad_offsets_and_levels_refused():
    k = np.zeros((2, 3), np.uint8)
    with pytest.raises(HbarInputError, match=r"\[0, 1\)"):
        to_model_space(k, 256, u=1.0)
    with pytest.raises(HbarInputError, match="broadcast"):
        to_model_space(k, 256, u=np.zeros(4))
    with pytest.raises(HbarInputError):
        to_model_space(k, 256, u="middle")
    with pytest.raises(HbarInputError):
        to_model_space(k, 1)
    with pytest.raises(HbarInputError, match="shape"):
        from_model_space(np.zeros((2, 5)), (2, 2), 256)
