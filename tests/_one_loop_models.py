"""Small trained score networks for the one-loop tests and benchmark (d = 2, 8, 64), trained
once and cached under the temporary directory (``HBAR_ONE_LOOP_CACHE`` overrides it)."""

import os
import tempfile

import numpy as np

import hbar
from hbar.training import TrainConfig, load_checkpoint, train

CACHE = os.environ.get("HBAR_ONE_LOOP_CACHE", os.path.join(tempfile.gettempdir(), "hbar_one_loop_models"))


def _gmm8():
    rng = np.random.default_rng(8)
    means = 1.5 * rng.normal(size=(4, 8))
    return {"weights": [1.0, 1.0, 1.0, 1.0], "means": means.tolist(), "covs": [0.3, 0.4, 0.5, 0.35]}


CONFIGS = {
    2: dict(dataset="swiss_roll", n_train=2000, epochs=300, batch_size=256),
    8: dict(dataset="gmm", dataset_kwargs=_gmm8(), n_train=2000, epochs=300, batch_size=256),
    64: dict(dataset="digits", dataset_kwargs={"part": "train"}, n_train=1500, epochs=300, batch_size=250),
}


def trained_model(d):
    """(score, schedule, test points (200, d)) of the cached model of dimension d."""
    kw = dict(CONFIGS[d])
    cfg = TrainConfig(network={"name": "paper_mlp", "width": 64, "depth": 2}, schedule={"name": "simple"},
                      n_test=200, lr=2e-3, checkpoint_every=10_000, seed=d, **kw)
    rd = os.path.join(CACHE, f"d{d}")
    if not os.path.exists(os.path.join(rd, "checkpoint.eqx")):
        train(cfg, rd, overwrite=True)
    score, schedule, cfg = load_checkpoint(rd)
    if d == 64:
        x = hbar.data.load_dataset("digits", 200, seed=1, part="test", replace=True)
    else:
        x = hbar.data.load_dataset(kw["dataset"], 200, seed=123, **kw.get("dataset_kwargs", {}))
    return score, schedule, x
