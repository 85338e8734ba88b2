"""hbar.training.checkpoint: bit-identical resume, loading, and broken checkpoint files."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from _training_cases import TINY, _leaves

from hbar.training import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOSSES_FILE,
    TrainConfig,
    check_dimension,
    checkpoint_info,
    load_checkpoint,
    load_config,
    train,
)
from hbar.training.checkpoint import WEIGHTS_FILE, load_safetensors_weights
from hbar.validation import HbarInputError


def test_resume_after_interrupt_is_bit_identical(tmp_path):
    cfg = TrainConfig(**TINY)
    a = train(cfg, tmp_path / "a")
    assert sorted(os.listdir(tmp_path / "a")) == sorted([CHECKPOINT_FILE, CONFIG_FILE, LOSSES_FILE, WEIGHTS_FILE])

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


def test_weights_readable_without_hbar_format(tmp_path):
    """model.safetensors + config.json rebuild the EMA network (what another JAX tool reads);
    the legacy checkpoint.eqx stays the resume state and still loads."""
    from safetensors.numpy import load_file

    res = train(TrainConfig(**{**TINY, "epochs": 2}), tmp_path / "r")
    tensors = load_file(str(tmp_path / "r" / WEIGHTS_FILE))
    assert ".layers[0].weight" in tensors
    net = load_safetensors_weights(tmp_path / "r")
    score, _, _ = load_checkpoint(tmp_path / "r")
    x = jnp.ones((3, 2))
    np.testing.assert_array_equal(net(x, 0.3), score(x, 0.3))
    np.testing.assert_array_equal(net(x, 0.3), res.score_fn(x, 0.3))
    os.remove(tmp_path / "r" / WEIGHTS_FILE)  # an old run directory: loads from checkpoint.eqx alone
    score2, _, _ = load_checkpoint(tmp_path / "r")
    np.testing.assert_array_equal(score2(x, 0.3), score(x, 0.3))
    with pytest.raises(HbarInputError, match="no model.safetensors"):
        load_safetensors_weights(tmp_path / "r")


def test_relative_data_path_resume_from_elsewhere(tmp_path, monkeypatch):
    """data_path is stored absolute, so a run is resumed from any directory."""
    work = tmp_path / "work"
    work.mkdir()
    np.savetxt(work / "pts.csv", np.random.default_rng(0).normal(size=(40, 2)), delimiter=",")
    monkeypatch.chdir(work)
    cfg = TrainConfig(data_path="pts.csv", batch_size=8, epochs=2, checkpoint_every=1,
                      network={"name": "paper_mlp", "width": 8, "depth": 1})
    train(cfg, "run")
    stored = json.loads((work / "run" / CONFIG_FILE).read_text())
    assert stored["data_path"] == str(work / "pts.csv") and stored["n_train"] is None
    monkeypatch.chdir(tmp_path)
    res = train(load_config(work / "run").replace(epochs=3), work / "run", resume=True)
    assert res.epochs_done == 3


def test_config_file_paths_relative_to_the_file_and_n_train_all(tmp_path):
    (tmp_path / "d").mkdir()
    np.savetxt(tmp_path / "d" / "pts.csv", np.zeros((10, 2)) + np.arange(10)[:, None] * 0.1, delimiter=",")
    (tmp_path / "d" / "cfg.toml").write_text('data_path = "pts.csv"\nn_train = "all"\nbatch_size = 5\n')
    cfg = TrainConfig.load(tmp_path / "d" / "cfg.toml")
    assert cfg.data_path == str(tmp_path / "d" / "pts.csv") and cfg.n_train is None
    from hbar.training import make_training_data

    assert make_training_data(cfg)[0].shape == (10, 2)  # smaller than the old default n_train = 3000
    assert TrainConfig(dataset="swiss_roll").n_train == 3000
    with pytest.raises(HbarInputError, match="needs a data file"):
        TrainConfig(dataset="swiss_roll", n_train="all")
