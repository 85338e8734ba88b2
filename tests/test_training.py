"""Tests for hbar.training: DSM loss, configs, training, checkpoints and resume."""

import json
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hbar.networks import PaperMLP
from hbar.schedules import CosineSchedule, OUSchedule, SimpleSchedule
from hbar.scores import gaussian_score
from hbar.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOSSES_FILE,
    TrainConfig,
    check_dimension,
    checkpoint_info,
    dsm_loss,
    dsm_per_sample,
    heldout_loss,
    load_checkpoint,
    load_config,
    train,
)
from hbar.validation import HbarInputError

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


# ---- the loss ------------------------------------------------------------------------


_per_sample = eqx.filter_jit(dsm_per_sample)


def _gauss_hermite_2d(n=4):
    """Nodes and weights for E over (x0 ~ N(m, s0^2), z ~ N(0, 1)), exact for polynomials."""
    u, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / w.sum()
    U, Z = np.meshgrid(u, u, indexing="ij")
    W = np.outer(w, w)
    return U.ravel(), Z.ravel(), W.ravel()


@pytest.mark.parametrize("weighting", ["g2", "sigma2"])
def test_dsm_at_exact_gaussian_score_is_the_known_minimum(weighting):
    """For data N(m, s0^2) and the exact score, E_{x0,z} l = w (1/sigma^2 - 1/C_t) with
    C_t = alpha^2 s0^2 + sigma^2 (E||grad log p_t||^2 = 1/C_t); Gauss-Hermite is exact here."""
    sched = SimpleSchedule()
    m, s0 = 0.7, 0.4
    score = gaussian_score(jnp.array([m]), jnp.array([[s0**2]]), sched)
    U, Z, W = _gauss_hermite_2d()
    x0 = jnp.asarray(m + s0 * U)[:, None]
    z = jnp.asarray(Z)[:, None]
    for t in (0.01, 0.1, 0.5, 1.0):
        tt = jnp.full(U.shape, t)
        loss = float(jnp.sum(W * _per_sample(score, sched, x0, tt, z, weighting)))
        s2 = float(sched.sigma2(t))
        C = float(sched.alpha(t)) ** 2 * s0**2 + s2
        w = float(sched.g2(t)) if weighting == "g2" else s2
        assert loss == pytest.approx(w * (1 / s2 - 1 / C), rel=1e-10)


def test_dsm_gradient_vanishes_at_exact_affine_score():
    """An affine model s = a x + b minimises the DSM loss at the exact score of N(m, s0^2)."""
    sched = OUSchedule(beta=2.0)
    m, s0, t = -0.3, 0.8, 0.4
    U, Z, W = _gauss_hermite_2d()
    x0 = jnp.asarray(m + s0 * U)[:, None]
    z = jnp.asarray(Z)[:, None]
    tt = jnp.full(U.shape, t)

    def loss(ab):
        model = lambda x, t: ab[0] * x + ab[1]  # noqa: E731
        return jnp.sum(W * dsm_per_sample(model, sched, x0, tt, z))

    al, s2 = float(sched.alpha(t)), float(sched.sigma2(t))
    C = al**2 * s0**2 + s2
    exact = jnp.array([-1 / C, al * m / C])
    g = jax.grad(loss)(exact)
    np.testing.assert_allclose(g, 0.0, atol=1e-10)
    assert float(loss(exact + jnp.array([0.05, 0.0]))) > float(loss(exact))
    assert float(loss(exact + jnp.array([0.0, -0.05]))) > float(loss(exact))


def test_dsm_loss_monte_carlo_matches_time_integral():
    """dsm_loss averages over t ~ U[t_min, T]: compare with the quadrature of the minimum."""
    sched = CosineSchedule()
    mean, cov = jnp.array([0.5, -1.0]), jnp.array([[0.3, 0.1], [0.1, 0.2]])
    score = gaussian_score(mean, cov, sched)
    x0 = jax.random.multivariate_normal(jax.random.PRNGKey(1), mean, cov, (40_000,))
    ts = np.linspace(sched.t_min, sched.T, 4001)
    a2, s2 = np.asarray(sched.alpha(ts)) ** 2, np.asarray(sched.sigma2(ts))
    Ct = a2[:, None, None] * np.asarray(cov)[None] + s2[:, None, None] * np.eye(2)[None]
    vals = np.asarray(sched.g2(ts)) * (2 / s2 - np.trace(np.linalg.inv(Ct), axis1=1, axis2=2))
    expect = np.trapezoid(vals, ts) / (sched.T - sched.t_min)
    loss = eqx.filter_jit(lambda k, xx, norm: dsm_loss(score, sched, xx, k, normalize_by_dim=norm))
    per = [float(loss(jax.random.PRNGKey(10 + k), x0, False)) for k in range(4)]
    mean_mc, se = np.mean(per), np.std(per, ddof=1) / 2
    assert abs(mean_mc - expect) < max(5 * se, 0.03 * expect)
    # the normalised loss is the plain one divided by d
    a = loss(jax.random.PRNGKey(0), x0, False)
    b = loss(jax.random.PRNGKey(0), x0, True)
    assert float(b) == pytest.approx(float(a) / 2, rel=1e-12)


def test_heldout_loss_is_deterministic_with_standard_error():
    sched = SimpleSchedule()
    score = gaussian_score(jnp.zeros(2), jnp.eye(2) * 0.25, sched)
    x = np.random.default_rng(0).normal(size=(200, 2)) * 0.5
    a = heldout_loss(score, sched, x, seed=3, repeats=2)
    assert a == heldout_loss(score, sched, x, seed=3, repeats=2)
    assert a[1] > 0 and np.isfinite(a[0])
    with pytest.raises(HbarInputError, match="NaN"):
        heldout_loss(score, sched, np.array([[0.0, np.nan]]))


# ---- configuration -------------------------------------------------------------------


def test_paper_config():
    cfg = TrainConfig.paper("25gaussians", CosineSchedule())
    assert (cfg.n_train, cfg.batch_size, cfg.lr, cfg.epochs, cfg.weighting) == (3000, 512, 1e-3, 16000, "g2")
    assert cfg.network == {"name": "paper_mlp", "d": None, "width": 128, "depth": 3, "dtype": "float32"}
    assert cfg.schedule["name"] == "cosine" and cfg.schedule["T"] == pytest.approx(1 - 1e-3)
    assert cfg.steps_per_epoch() == 5 and cfg.epochs * cfg.steps_per_epoch() == 80_000


def test_config_round_trips(tmp_path):
    cfg = TrainConfig(**TINY, dataset_kwargs={"noise": 0.3}, grad_clip=1.0, weighting="sigma2")
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    for ext in ("json", "toml"):
        p = tmp_path / f"c.{ext}"
        cfg.save(p)
        assert TrainConfig.load(p) == cfg
    cfg2 = TrainConfig(dataset="mixture1d", dataset_kwargs={"weights": [0.3, 0.7], "means": [-1, 2],
                                                            "stds": [0.2, 0.5]}, n_train=32, batch_size=8)
    cfg2.save(tmp_path / "m.toml")
    assert TrainConfig.load(tmp_path / "m.toml") == cfg2


@pytest.mark.parametrize(
    "change, field",
    [
        ({"lr": -1e-3}, "lr"),
        ({"lr": "fast"}, "lr"),
        ({"batch_size": "512"}, "batch_size"),
        ({"batch_size": 100}, "batch_size"),  # larger than n_train
        ({"epochs": 2.5}, "epochs"),
        ({"weighting": "lambda"}, "weighting"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"seed": -1}, "seed"),
        ({"grad_clip": 0}, "grad_clip"),
        ({"normalize_by_dim": "yes"}, "normalize_by_dim"),
        ({"dataset": "swirl"}, "dataset"),
        ({"dataset_kwargs": {"radius": 2}}, "dataset_kwargs"),
        ({"data_path": "x.npy"}, "exactly one"),
        ({"schedule": {"name": "simple", "beta": 3}}, "schedule"),
        ({"network": {"name": "paper_mlp", "layers": 3}}, "network"),
        ({"learning_rate": 1e-3}, "learning_rate"),
    ],
)
def test_malformed_config_names_the_field(change, field):
    d = TrainConfig(**TINY).to_dict()
    d.update(change)
    with pytest.raises(HbarInputError, match=field):
        TrainConfig.from_dict(d)


def test_malformed_config_files(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('dataset = "swiss_roll"\nlr = \n')
    with pytest.raises(HbarInputError, match="cannot parse"):
        TrainConfig.load(p)
    p = tmp_path / "bad.json"
    p.write_text('{"dataset": "swiss_roll", "epochs": 0}')
    with pytest.raises(HbarInputError, match="epochs"):
        TrainConfig.load(p)
    with pytest.raises(HbarInputError, match="not found"):
        TrainConfig.load(tmp_path / "none.toml")


# ---- training ------------------------------------------------------------------------


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


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    cfg = TrainConfig(**TINY)
    a = train(cfg, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == sorted([CHECKPOINT_FILE, CONFIG_FILE, LOSSES_FILE])

    def stop_after_two_chunks(step, total, loss):
        if step >= 4 * 4:  # epoch 4 = two chunks of 2 epochs
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "b", progress=stop_after_two_chunks)
    info = checkpoint_info(tmp_path / "b")
    assert info["epoch"] == 4 and info["step"] == 16
    with pytest.raises(HbarInputError, match="resume=True"):
        train(cfg, tmp_path / "b")
    b = train(None, tmp_path / "b", resume=True)
    assert b.epochs_done == 6
    np.testing.assert_array_equal(a.losses, b.losses)
    for x, y in zip(_leaves((a.score_fn, a.raw_fn)), _leaves((b.score_fn, b.raw_fn))):
        np.testing.assert_array_equal(x, y)
    # the whole checkpoint (params, EMA, Adam state, losses) is byte-identical
    assert checkpoint_info(tmp_path / "a")["sha256"] == checkpoint_info(tmp_path / "b")["sha256"]
    assert (tmp_path / "a" / LOSSES_FILE).read_text() == (tmp_path / "b" / LOSSES_FILE).read_text()
    # same seed, no run dir: the same again
    c = train(cfg, None)
    np.testing.assert_array_equal(a.losses, c.losses)
    # resuming a finished run is a no-op; a changed config is refused
    assert train(cfg, tmp_path / "a", resume=True).epochs_done == 6
    with pytest.raises(HbarInputError, match="lr"):
        train(cfg.replace(lr=1e-2), tmp_path / "a", resume=True)

    # ---- loading the checkpoint
    score, sched, cfg_loaded = load_checkpoint(tmp_path / "a")
    assert cfg_loaded == load_config(tmp_path / "a") and cfg_loaded.network["d"] == 2
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 2)))
    np.testing.assert_array_equal(score(x, 0.3), a.score_fn(x, 0.3))
    assert score(x, 0.3).shape == (5, 2)
    raw, _, _ = load_checkpoint(tmp_path / "a", ema=False)
    np.testing.assert_array_equal(raw(x, 0.3), a.raw_fn(x, 0.3))
    assert check_dimension(x, tmp_path / "a") == 2
    with pytest.raises(HbarInputError, match="dimension 3.*d=2"):
        check_dimension(np.zeros((4, 3)), tmp_path / "a")

    # ---- a d=2 checkpoint read with a d=3 config
    cfg3 = cfg_loaded.replace(network={**cfg_loaded.network, "d": 3})
    with pytest.raises(HbarInputError, match="d=2.*d=3"):
        load_checkpoint(tmp_path / "a", config=cfg3)
    cfg_json = json.loads((tmp_path / "a" / CONFIG_FILE).read_text())
    cfg_json["network"]["d"] = 3
    (tmp_path / "a" / CONFIG_FILE).write_text(json.dumps(cfg_json))
    with pytest.raises(HbarInputError, match="d=2.*d=3"):
        load_checkpoint(tmp_path / "a")


def test_broken_checkpoints(tmp_path):
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    train(cfg, tmp_path / "r")
    path = tmp_path / "r" / CHECKPOINT_FILE
    first = checkpoint_info(tmp_path / "r")["sha256"]
    train(cfg, tmp_path / "r", overwrite=True)  # same seed: the same checkpoint again
    assert checkpoint_info(tmp_path / "r")["sha256"] == first
    blob = path.read_bytes()
    # truncated
    path.write_bytes(blob[: len(blob) - 100])
    with pytest.raises(HbarInputError, match="truncated"):
        load_checkpoint(tmp_path / "r")
    # flipped byte
    path.write_bytes(blob[:-10] + bytes([blob[-10] ^ 1]) + blob[-9:])
    with pytest.raises(HbarInputError, match="corrupt"):
        load_checkpoint(tmp_path / "r")
    # not a checkpoint
    path.write_bytes(b"hello")
    with pytest.raises(HbarInputError, match="not an hbar checkpoint"):
        load_checkpoint(tmp_path / "r")
    # header and config both claim width 8, weights are width 16: shape mismatch
    nl = blob.index(b"\n")
    header = json.loads(blob[:nl])
    header["network"]["width"] = 8
    path.write_bytes(json.dumps(header).encode() + blob[nl:])
    cj = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    cj["network"]["width"] = 8
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(cj))
    with pytest.raises(HbarInputError, match="do not match the architecture"):
        load_checkpoint(tmp_path / "r")
    with pytest.raises(HbarInputError, match="not found"):
        load_checkpoint(tmp_path / "nope")
    os.remove(path)
    with pytest.raises(HbarInputError, match="no checkpoint"):
        load_checkpoint(tmp_path / "r")


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
