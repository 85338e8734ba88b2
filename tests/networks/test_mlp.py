"""Tests for hbar.networks (MLPs): score contract, architecture, dtype and config round trip."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.networks import (
    PaperMLP,
    TimeEmbedMLP,
    network_config,
    network_from_config,
    param_count,
    validate_network_config,
)
from hbar.validation import HbarInputError


def _leaves(net):
    return jax.tree_util.tree_leaves(eqx.filter(net, eqx.is_array))


@pytest.mark.parametrize("cls", [PaperMLP, TimeEmbedMLP])
@pytest.mark.parametrize("d", [1, 3])
def test_score_contract_shapes(cls, d):
    net = cls(d, width=16, depth=2, key=jax.random.PRNGKey(0))
    x = jnp.linspace(-1, 1, 7 * d).reshape(7, d)
    tv = jnp.linspace(0.1, 0.9, 7)

    @jax.jit
    def check(x, tv):
        out = net(x, 0.3)
        # per-row times equal the scalar-time evaluation row by row
        rows = jax.vmap(lambda xi, ti: net(xi[None], ti)[0])(x, tv)
        g = jax.grad(lambda xx: jnp.sum(net(xx, 0.5)))(x)
        return out, rows, net(x, tv), net(x, tv[:, None]), g

    out, rows, vec, col, g = check(x, tv)
    assert out.shape == (7, d) and g.shape == x.shape
    np.testing.assert_allclose(vec, rows, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(col, rows, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(eqx.filter_jit(lambda m, xx: m(xx, 0.3))(net, x), out, rtol=1e-6)


def test_paper_mlp_is_exactly_the_paper_architecture():
    net = PaperMLP(2, key=0)
    shapes = [(layer.weight.shape, layer.bias.shape) for layer in net.layers]
    assert shapes == [((3, 128), (128,)), ((128, 128), (128,)), ((128, 128), (128,)), ((128, 2), (2,))]
    assert param_count(net) == 3 * 128 + 128 + 2 * (128 * 128 + 128) + 128 * 2 + 2
    # forward pass by hand: concat(x, t) -> 3 x [Dense, swish] -> Dense
    x = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    h = np.concatenate([x, np.full((4, 1), 0.7, np.float32)], axis=1).astype(np.float64)
    for layer in net.layers[:-1]:
        a = h @ np.asarray(layer.weight, np.float64) + np.asarray(layer.bias, np.float64)
        h = a / (1 + np.exp(-a))
    ref = h @ np.asarray(net.layers[-1].weight, np.float64) + np.asarray(net.layers[-1].bias, np.float64)
    np.testing.assert_allclose(net(jnp.asarray(x), 0.7), ref, rtol=1e-5, atol=1e-5)


def test_dtype_applies_to_all_parameters():
    net = PaperMLP(3, 8, 2, key=1)
    assert {leaf.dtype for leaf in _leaves(net)} == {jnp.dtype("float32")}
    net64 = TimeEmbedMLP(3, 8, 2, 4, key=1, dtype="float64")
    assert {leaf.dtype for leaf in _leaves(net64)} == {jnp.dtype("float64")}
    assert net64(jnp.ones((2, 3)), 0.1).dtype == jnp.float64
    # float32 parameters with float64 input compute in the promoted dtype
    assert net(jnp.ones((2, 3), jnp.float64), 0.1).dtype == jnp.float64
    assert net(jnp.ones((2, 3), jnp.float32), 0.1).dtype == jnp.float32


@pytest.mark.parametrize(
    "net",
    [PaperMLP(2, 32, 3, key=3), TimeEmbedMLP(4, 16, 2, 6, key=3, max_freq=50.0, dtype="float64")],
)
def test_config_round_trip(net):
    cfg = network_config(net)
    import json

    cfg2 = json.loads(json.dumps(cfg))
    rebuilt = network_from_config(cfg2, key=3)
    assert network_config(rebuilt) == cfg
    assert eqx.tree_equal(eqx.filter(rebuilt, eqx.is_array, inverse=True), eqx.filter(net, eqx.is_array, inverse=True))
    for a, b in zip(_leaves(rebuilt), _leaves(net)):
        np.testing.assert_array_equal(a, b)  # same key -> same weights


def test_time_embedding_frequencies():
    net = TimeEmbedMLP(2, 8, 1, embed_dim=8, key=0, max_freq=1000.0)
    w = np.asarray(net.frequencies(jnp.float64))
    np.testing.assert_allclose(w, [1.0, 10.0, 100.0, 1000.0])
    assert net.layers[0].weight.shape == (2 + 1 + 8, 8)


def test_config_errors():
    with pytest.raises(HbarInputError, match="unknown field"):
        network_from_config({"name": "paper_mlp", "d": 2, "widht": 10})
    with pytest.raises(HbarInputError, match="unknown network"):
        network_from_config({"name": "resnet", "d": 2})
    with pytest.raises(HbarInputError, match="'d' must be a positive integer"):
        network_from_config({"name": "paper_mlp", "d": 0})
    with pytest.raises(HbarInputError, match="'d' must be a positive integer"):
        network_from_config({"name": "paper_mlp", "d": "2"})
    with pytest.raises(HbarInputError, match="d=2 but the data have dimension 3"):
        network_from_config({"name": "paper_mlp", "d": 2}, d=3)
    with pytest.raises(HbarInputError, match="needs the data dimension"):
        network_from_config({"name": "paper_mlp"})
    with pytest.raises(HbarInputError, match="even"):
        network_from_config({"name": "time_embed_mlp", "d": 2, "embed_dim": 3})
    with pytest.raises(HbarInputError, match="dtype"):
        network_from_config({"name": "paper_mlp", "d": 2, "dtype": "int8"})
    assert validate_network_config({"name": "paper_mlp"}, d=2)["d"] == 2
    net = PaperMLP(2, 8, 1, key=0)
    with pytest.raises(HbarInputError, match=r"shape \(n, 2\)"):
        net(jnp.ones((3, 3)), 0.1)
    with pytest.raises(HbarInputError):
        network_config(lambda x, t: x)
