"""Shared settings for the hbar.training tests (imported as ``from _training_cases import ...``)."""

import equinox as eqx
import jax

# a tiny, fast setting: 64 points, batch 16 -> 4 steps per epoch
TINY = dict(
    dataset="swiss_roll",
    n_train=64,
    n_test=32,
    batch_size=16,
    epochs=6,
    checkpoint_every=2,
    network={"name": "paper_mlp", "width": 16, "depth": 2},
)


def _leaves(tree):
    return jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_array))
