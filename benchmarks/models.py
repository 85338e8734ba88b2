"""Trained score networks for the benchmarks, cached in a run directory so that reruns skip
training (``hbar.training.train(..., resume=True)`` returns a finished run as it is).

* ``swiss_roll``: the paper-sized network (PaperMLP 3 x 128 swish, SIMPLE schedule) trained on
  the swiss roll, ``epochs`` epochs of the paper's recipe (the paper trains 16000).
* ``digits``: the same architecture on scikit-learn's 8x8 digits (64-D, dequantised to [-1, 1)).
"""

from __future__ import annotations

import os

import hbar

DEFAULT_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_runs")


def _config(name: str, epochs: int):
    if name == "swiss_roll":
        return hbar.training.TrainConfig.paper("swiss_roll", "simple", epochs=epochs)
    if name == "digits":
        return hbar.training.TrainConfig.paper("digits", "simple", epochs=epochs, n_train=1500, n_test=297)
    raise ValueError(name)


def trained(name: str, epochs: int, cache: str | None = DEFAULT_CACHE):
    """(score, schedule) of the benchmark network ``name``; trained once per (name, epochs)."""
    cfg = _config(name, epochs)
    rd = None if cache is None else os.path.join(cache, f"{name}-{epochs}")
    res = hbar.training.train(cfg, rd, resume=rd is not None)
    return res.score_fn, res.schedule


if __name__ == "__main__":
    import sys
    import time

    import jax

    jax.config.update("jax_enable_x64", True)
    for spec in sys.argv[1:]:
        nm, ep = spec.split(":")
        t0 = time.perf_counter()
        trained(nm, int(ep))
        print(f"{nm} {ep} epochs: {time.perf_counter() - t0:.0f} s", flush=True)
