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
    header["config"]["network"]["width"] = 8  # the config record too (else the record check refuses first)
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


# ---- issue 15: run-directory lock, config record, clear errors ------------------------------

_HOLD_LOCK = """
import sys
from hbar.locking import run_lock
with run_lock(sys.argv[1], "hbar train (other process)"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def test_second_trainer_into_a_locked_run_dir_is_refused(tmp_path):
    """Two trainings into one run directory: while another process holds the run directory,
    train() is refused before writing anything, naming the holder; afterwards it runs."""
    import subprocess
    import sys

    from hbar.locking import LOCK_FILE

    d = tmp_path / "run"
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src"))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK, str(d)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(HbarInputError, match=f"in use by pid {proc.pid} .*hbar train \\(other process\\)"):
            train(TrainConfig(**{**TINY, "epochs": 1}), d)
        assert sorted(os.listdir(d)) == [LOCK_FILE]  # nothing written by the refused run
    finally:
        proc.stdin.close()
        proc.wait()
        proc.stdout.close()
    res = train(TrainConfig(**{**TINY, "epochs": 1}), d)
    assert res.epochs_done == 1 and not (d / LOCK_FILE).exists()
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(HbarInputError, match="existing file"):
        train(TrainConfig(**{**TINY, "epochs": 1}), f)
    with pytest.raises(HbarInputError, match="is a file, not a training run directory"):
        load_checkpoint(f)


def test_checkpoint_records_the_config_and_refuses_an_edited_one(tmp_path):
    """issue 15: editing config.json from simple to cosine silently changed NLL0. The checkpoint
    records the config; loading with a different one names each differing field, unless overridden."""
    import warnings

    from hbar.schedules import schedule_from_config
    from hbar.training.checkpoint import config_hash

    cfg = TrainConfig(**{**TINY, "epochs": 2})
    train(cfg, tmp_path / "r")
    info = checkpoint_info(tmp_path / "r")
    stored = load_config(tmp_path / "r")
    assert info["schedule"] == stored.schedule and stored.schedule["name"] == "simple"
    assert info["data"]["dataset"] == "swiss_roll" and info["data"]["n_train"] == TINY["n_train"]
    assert info["config"] == stored.to_dict() and info["config_hash"] == config_hash(stored)
    assert config_hash(stored.replace(epochs=99)) == config_hash(stored) != config_hash(stored.replace(lr=0.5))
    cj = json.loads((tmp_path / "r" / CONFIG_FILE).read_text())
    cj["schedule"] = {"name": "cosine"}
    (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(cj))
    with pytest.raises(HbarInputError, match=r"different config.*schedule: \{.*'simple'.*\} -> \{.*'cosine'"):
        load_checkpoint(tmp_path / "r")
    with pytest.raises(HbarInputError, match="cannot resume: .*schedule.*restore config.json"):
        train(None, tmp_path / "r", resume=True)
    with pytest.warns(UserWarning, match="loaded anyway"):
        _, sched, _ = load_checkpoint(tmp_path / "r", allow_config_mismatch=True)
    assert sched.to_config() == schedule_from_config({"name": "cosine"}).to_config()  # the user's explicit choice
    # an old checkpoint (before the record existed) still loads, with a note
    path = tmp_path / "r" / CHECKPOINT_FILE
    blob = path.read_bytes()
    nl = blob.index(b"\n")
    header = json.loads(blob[:nl])
    for k in ("config", "config_hash", "schedule", "data"):
        del header[k]
    path.write_bytes(json.dumps(header).encode() + blob[nl:])
    with pytest.warns(UserWarning, match="before checkpoints recorded their config"):
        load_checkpoint(tmp_path / "r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a matching record loads silently
        cj["schedule"] = {"name": "simple"}
        (tmp_path / "r" / CONFIG_FILE).write_text(json.dumps(cj))
        train(cfg, tmp_path / "r2")
        load_checkpoint(tmp_path / "r2")


_TRAIN_THEN_HANG = """
import json, sys, time
from hbar.training import TrainConfig, train

def hang_after_epoch_4(step, total, loss):
    if step == 16:  # epoch 4 (4 steps per epoch) is checkpointed before progress is called
        print("checkpointed", flush=True)
        time.sleep(600)

train(TrainConfig(**json.loads(sys.argv[2])), sys.argv[1], progress=hang_after_epoch_4)
"""


@pytest.mark.slow
def test_kill_9_during_training_then_resume_takes_over_the_lock_bit_identically(tmp_path):
    """kill -9 of a training process leaves its lock; the resume recognises it as stale, takes it
    over and finishes bit-identically to an uninterrupted run."""
    import signal
    import subprocess
    import sys

    from hbar.locking import LOCK_FILE, StaleLockWarning

    cfg = TrainConfig(**TINY)
    src = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "src"))
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "JAX_ENABLE_X64": "1"}  # as the tests (conftest): the same arithmetic in both processes
    proc = subprocess.Popen([sys.executable, "-c", _TRAIN_THEN_HANG, str(tmp_path / "b"), json.dumps(TINY)],
                            stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "checkpointed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    assert (tmp_path / "b" / LOCK_FILE).exists() and checkpoint_info(tmp_path / "b")["epoch"] == 4
    with pytest.warns(StaleLockWarning, match=f"pid {proc.pid}"):
        b = train(None, tmp_path / "b", resume=True)
    train(cfg, tmp_path / "a")
    assert b.epochs_done == 6 and not (tmp_path / "b" / LOCK_FILE).exists()
    assert checkpoint_info(tmp_path / "a")["sha256"] == checkpoint_info(tmp_path / "b")["sha256"]
    assert (tmp_path / "a" / LOSSES_FILE).read_text() == (tmp_path / "b" / LOSSES_FILE).read_text()
