"""hbar.training.loop: training reduces the loss, handles file data and other networks, and a
trained model samples better than the prior."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _training_cases import TINY
from hypothesis import given, settings
from hypothesis import strategies as st

from hbar.networks import PaperMLP
from hbar.schedules import OUSchedule
from hbar.training import TrainConfig, heldout_loss, load_checkpoint, train
from hbar.training.loop import _next_boundary
from hbar.validation import HbarInputError


def test_loss_decreases_on_swiss_roll():
    # same shapes and hyper-parameters as TINY, so the jitted chunk is compiled once for the module
    cfg = TrainConfig(**{**TINY, "epochs": 40})
    calls = []
    res = train(cfg, None, progress=lambda s, T, loss: calls.append((s, T, loss)))
    assert res.losses.shape == (40,) and res.steps_done == 160
    assert len(calls) == 20 and calls[-1][:2] == (160, 160)
    first, last = res.losses[:3].mean(), res.losses[-10:].mean()
    assert last < 0.7 * first, (first, last)
    # held-out loss with the same (t, z) draws (paired): trained EMA net vs its initialisation
    from hbar.training import make_training_data

    _, xt = make_training_data(res.config)
    init = PaperMLP(2, 32, 2, key=jax.random.split(jax.random.PRNGKey(0))[0])
    before = heldout_loss(init, res.schedule, xt, seed=0)[0]
    after = heldout_loss(res.score_fn, res.schedule, xt, seed=0)[0]
    assert res.test_loss[0] == after
    assert after < 0.9 * before, (before, after)


def test_sigma2_weighting_time_embedding_and_file_data(tmp_path):
    x = np.random.default_rng(1).normal(size=(48, 3)) * 0.5 + 1.0
    np.savetxt(tmp_path / "pts.csv", x, delimiter=",", header="a,b,c", comments="")
    cfg = TrainConfig(data_path=str(tmp_path / "pts.csv"), n_train=None, batch_size=16, epochs=3,
                      weighting="sigma2", normalize_by_dim=True, grad_clip=1.0, ema_decay=0.9,
                      schedule=OUSchedule(beta=1.0, T=5.0),
                      network={"name": "time_embed_mlp", "width": 16, "depth": 2, "embed_dim": 4})
    res = train(cfg, tmp_path / "run")
    assert res.losses.shape == (3,) and np.all(np.isfinite(res.losses))
    assert res.test_loss is None and res.config.network["d"] == 3
    score, sched, _ = load_checkpoint(tmp_path / "run")
    assert isinstance(sched, OUSchedule) and score(jnp.asarray(x[:4]), 1.0).shape == (4, 3)
    # the sigma^2-weighted loss of an untrained net is O(d) per dim-normalised sample: finite, positive
    assert 0 < res.losses[0] < 100
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3\n4,nan,6\n")
    with pytest.raises(HbarInputError, match="NaN"):
        train(cfg.replace(data_path=str(bad)), None)


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_trained_model_samples_beat_the_prior_in_w2():
    """A short swiss-roll run: samples of the trained model (reverse SDE, h = 1) are closer in
    exact-EMD W2 to fresh data than draws from the prior are (a meaningful, not tight, bound)."""
    from hbar.data import load_dataset
    from hbar.metrics import w2_empirical
    from hbar.sampling import sample

    cfg = TrainConfig.paper("swiss_roll", "simple", epochs=1000)
    res = train(cfg, None)
    fresh = load_dataset("swiss_roll", 1000, seed=77)
    out = sample(res.score_fn, res.schedule, jax.random.PRNGKey(3), 1000, 1.0, steps=300)
    assert out.n_failed == 0
    prior = np.asarray(res.schedule.prior_sample(jax.random.PRNGKey(4), 1000, 2))
    w_model, w_prior = w2_empirical(out.samples, fresh), w2_empirical(prior, fresh)
    # measured: model 0.206, prior 0.550, data-to-data floor 0.124
    assert w_model < 0.6 * w_prior, (w_model, w_prior)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(chunk=st.integers(1, 12), every=st.integers(1, 12), total=st.integers(1, 60), data=st.data())
def test_chunk_boundaries_are_resume_invariant(chunk, every, total, data):
    """Property: the chunk ends after any checkpoint epoch are the tail of the ends of an
    uninterrupted run, every checkpoint epoch (multiple of ``every``) and the last epoch is an end,
    and chunks never exceed ``chunk`` epochs."""
    def ends(start):
        out, e = [], start
        while e < total:
            e = _next_boundary(e, chunk, every, total)
            out.append(e)
        return out

    full = ends(0)
    assert full[-1] == total and all(b - a <= chunk for a, b in zip([0] + full, full))
    assert all(k in full for k in range(every, total + 1, every))
    resume_at = data.draw(st.sampled_from([e for e in full if e % every == 0 or e == total]))
    assert ends(resume_at) == [e for e in full if e > resume_at]


@pytest.mark.slow  # a long check (CI default suite budget); run with pytest -m slow
def test_unet_on_images_resumes_bit_identically(tmp_path, monkeypatch):
    """Image training (U-Net, per-batch dequantisation, one jitted call per step): 2 epochs in one
    go == 1 epoch, then resume to 2, bit for bit; the loss is finite."""
    import hbar.images.datasets as ds
    from hbar.images.datasets import ImageSet

    rng = np.random.default_rng(0)
    fake = {s: rng.integers(0, 256, (m, 8, 8), dtype=np.uint8) for s, m in (("train", 32), ("test", 8))}

    def load(name, split="train", n=None, seed=0, data_dir=None):
        return ImageSet(images=fake[split], labels=np.zeros(len(fake[split]), np.int64), levels=256, name=name,
                        split=split)

    monkeypatch.setattr(ds, "load_images", load)
    cfg = TrainConfig.images("mnist5k", batch_size=8, epochs=2, checkpoint_every=1, n_test=8,
                              network={"name": "unet", "base_channels": 4, "channel_mults": [1, 2], "groups": 2,
                                       "embed_dim": 8})
    full = train(cfg, tmp_path / "a")
    train(cfg.replace(epochs=1), tmp_path / "b")
    resumed = train(cfg, tmp_path / "b", resume=True)
    assert np.all(np.isfinite(full.losses)) and full.steps_done == 8
    np.testing.assert_array_equal(full.losses, resumed.losses)
    for a, b in zip(jax.tree_util.tree_leaves(full.score_fn), jax.tree_util.tree_leaves(resumed.score_fn)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
