"""The training loop: Adam + EMA over jitted chunks of epochs, checkpointed and resumable.

:func:`train` minimises the DSM loss (:mod:`hbar.training.loss`, docs/theory.md section 3) with
Adam (optax) and optional global-norm gradient clipping, and keeps an exponential moving
average of the weights, ema <- decay ema + (1 - decay) params after every step (initialised to
the initial weights; the EMA weights are what :func:`hbar.training.load_checkpoint` returns
for sampling). Epochs run over a fixed training set of ``n_train`` points, reshuffled every
epoch; an epoch has floor(n_train / batch_size) steps (the incomplete last batch is dropped,
as the paper: 3000 points, batch 512 -> 5 steps per epoch, 16000 epochs -> 80 000 steps).
All randomness is a pure function of (seed, epoch, step): epoch e uses fold_in(train_key, e)
for its permutation and its per-step (t, z) keys, so a resumed run reproduces an
uninterrupted one bit for bit. Epochs are executed in jitted chunks (``lax.scan`` over
epochs, each a scan over steps) whose boundaries are fixed multiples of a chunk length
derived from the config.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from hbar.networks import network_from_config, validate_network_config
from hbar.schedules import Schedule
from hbar.serialization import atomic_write
from hbar.training.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOSSES_FILE,
    load_config,
    load_tree,
    losses_csv,
    payload_tree,
    save_checkpoint,
)
from hbar.training.config import TrainConfig, make_training_data, optimizer, training_data_hash
from hbar.training.loss import dsm_loss, heldout_loss
from hbar.validation import HbarInputError

__all__ = ["TrainResult", "train"]

_CHUNK_STEPS = 1000  # target optimiser steps per jitted chunk


class _Hyper(NamedTuple):
    lr: float
    grad_clip: float | None
    ema_decay: float
    weighting: str
    normalize_by_dim: bool
    batch_size: int
    steps_per_epoch: int


@functools.partial(jax.jit, static_argnames=("static", "schedule", "hp", "n_epochs"))
def _run_chunk(state, data, train_key, e0, *, static, schedule, hp: _Hyper, n_epochs: int):
    """Run epochs e0 .. e0 + n_epochs - 1. state = (params, ema, opt_state).
    Returns (state, step losses (n_epochs, steps_per_epoch))."""
    opt = optimizer(hp.lr, hp.grad_clip)
    n = data.shape[0]
    B, S = hp.batch_size, hp.steps_per_epoch

    def loss_fn(params, x0, key):
        net = eqx.combine(params, static)
        return dsm_loss(net, schedule, x0, key, hp.weighting, hp.normalize_by_dim)

    def step(carry, inp):
        params, ema, opt_state = carry
        idx, key = inp
        loss, grads = jax.value_and_grad(loss_fn)(params, data[idx], key)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optax.incremental_update(params, ema, step_size=1.0 - hp.ema_decay)  # optax's EMA of the weights
        return (params, ema, opt_state), loss

    def epoch(carry, e):
        kperm, knoise = jax.random.split(jax.random.fold_in(train_key, e))
        perm = jax.random.permutation(kperm, n)[: S * B].reshape(S, B)
        keys = jax.random.split(knoise, S)
        return lax.scan(step, carry, (perm, keys))

    return lax.scan(epoch, state, e0 + jnp.arange(n_epochs))


def _chunk_epochs(cfg: TrainConfig, spe: int) -> int:
    """Epochs per jitted chunk: about _CHUNK_STEPS steps, at most checkpoint_every."""
    return max(1, min(cfg.checkpoint_every, _CHUNK_STEPS // max(spe, 1)))


def _next_boundary(epoch: int, chunk: int, every: int, total: int) -> int:
    """Next chunk end after ``epoch``: the nearest multiple of ``chunk`` or of ``every``,
    capped by ``total``. Boundaries depend on absolute epochs only (resume-invariant)."""
    return min((epoch // chunk + 1) * chunk, (epoch // every + 1) * every, total)


@dataclasses.dataclass
class TrainResult:
    """Outcome of :func:`train`.

    ``score_fn``: the EMA network (score contract); ``raw_fn``: the raw Adam weights;
    ``losses``: mean DSM loss of every completed epoch (float64, (epochs_done,));
    ``test_loss``: (mean, standard error) of the held-out DSM loss of the EMA network, or
    None without held-out data; ``seconds``: wall time of this call."""

    score_fn: Any
    raw_fn: Any
    schedule: Schedule
    config: TrainConfig
    losses: np.ndarray
    epochs_done: int
    steps_done: int
    test_loss: tuple[float, float] | None
    seconds: float
    run_dir: str | None


_RESUME_MAY_CHANGE = {"epochs", "checkpoint_every"}


def _resolve(cfg: TrainConfig, d: int) -> TrainConfig:
    try:
        net = validate_network_config(cfg.network, d)
    except HbarInputError as err:
        raise HbarInputError(f"config field 'network': {err}") from None
    return cfg.replace(network=net)


def train(
    config: TrainConfig | dict | str | os.PathLike | None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float], Any] | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Train a score network by denoising score matching.

    ``config``: a TrainConfig, a dict, or a path to a .json/.toml file; may be None with
    ``resume=True`` (then ``run_dir/config.json`` is used). ``run_dir``: where config,
    checkpoints and losses go (None: nothing is written). ``resume=True`` continues from
    ``run_dir/checkpoint.eqx`` if it exists (else starts fresh); the result is bit-identical
    to an uninterrupted run. Only ``epochs`` and ``checkpoint_every`` may differ from the
    stored config. Without ``resume`` an existing checkpoint is an error unless
    ``overwrite=True``. ``progress(step, total_steps, loss)`` is called after every jitted
    chunk with the mean loss of its last epoch. A KeyboardInterrupt writes a checkpoint of
    the last completed chunk before propagating.
    """
    t_start = time.perf_counter()
    rd = None if run_dir is None else os.fspath(run_dir)
    ckpt_path = None if rd is None else os.path.join(rd, CHECKPOINT_FILE)
    if config is None:
        if rd is None or not resume:
            raise HbarInputError("train needs a config (or resume=True with a run_dir holding config.json)")
        cfg = load_config(rd)
    elif isinstance(config, TrainConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = TrainConfig.from_dict(config)
    else:
        cfg = TrainConfig.load(config)

    x_train, x_test = make_training_data(cfg)
    n, d = x_train.shape
    cfg = _resolve(cfg, d)
    schedule = cfg.schedule_obj()
    spe = cfg.steps_per_epoch(n)
    if spe < 1:
        raise HbarInputError(f"batch_size={cfg.batch_size} exceeds the {n} training points")
    data_hash = training_data_hash(x_train)

    root = jax.random.PRNGKey(cfg.seed)
    init_key, train_key = jax.random.split(root)
    net = network_from_config(cfg.network, init_key)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    opt_state = optimizer(cfg.lr, cfg.grad_clip).init(params)
    ema = params
    epoch = 0
    losses = np.zeros(0, np.float64)

    have_ckpt = ckpt_path is not None and os.path.exists(ckpt_path)
    if have_ckpt and not resume and not overwrite:
        raise HbarInputError(f"{rd} already holds a checkpoint; continue it with resume=True (CLI: --resume) or "
                             "start again with overwrite=True (CLI: --overwrite)")
    if have_ckpt and not resume:  # overwrite: never leave a stale checkpoint next to a new config
        for f in (CHECKPOINT_FILE, LOSSES_FILE):
            if os.path.exists(os.path.join(rd, f)):
                os.remove(os.path.join(rd, f))
        have_ckpt = False
    if have_ckpt and resume:
        stored = load_config(rd)
        a, b = stored.to_dict(), cfg.to_dict()
        diff = sorted(k for k in a if a[k] != b[k] and k not in _RESUME_MAY_CHANGE)
        if diff:
            raise HbarInputError(f"cannot resume {rd}: config field(s) {diff} differ from the stored run")
        header, tree, _ = load_tree(ckpt_path, cfg)
        if header.get("data_hash") != data_hash:
            raise HbarInputError(f"cannot resume {rd}: the training data differ from those of the stored run")
        if not np.array_equal(tree["key"], np.asarray(train_key, np.uint32)):
            raise HbarInputError(f"cannot resume {rd}: the checkpoint's RNG key does not match seed={cfg.seed}")
        params, ema, opt_state = tree["params"], tree["ema"], tree["opt_state"]
        epoch = int(tree["epoch"])
        losses = np.asarray(tree["losses"])[:epoch]
    if rd is not None:
        os.makedirs(rd, exist_ok=True)
        atomic_write(os.path.join(rd, CONFIG_FILE), (cfg.to_json() + "\n").encode())

    dt = jnp.dtype(params.layers[0].weight.dtype) if hasattr(params, "layers") else jnp.float32
    data = jnp.asarray(x_train, dtype=dt)
    hp = _Hyper(cfg.lr, cfg.grad_clip, cfg.ema_decay, cfg.weighting, cfg.normalize_by_dim, cfg.batch_size, spe)
    chunk = _chunk_epochs(cfg, spe)
    total_steps = cfg.epochs * spe
    state = (params, ema, opt_state)
    saved_epoch = epoch if have_ckpt and resume else -1
    hist = [losses]

    def save(state_, epoch_):
        nonlocal saved_epoch
        if rd is None or epoch_ == saved_epoch:
            return
        all_losses = np.concatenate(hist)[:epoch_]
        tree_ = payload_tree(*state_, epoch_, epoch_ * spe, train_key, all_losses)
        save_checkpoint(rd, cfg, tree_, {"data_hash": data_hash, "steps_per_epoch": spe})
        atomic_write(os.path.join(rd, LOSSES_FILE), losses_csv(all_losses, spe))
        saved_epoch = epoch_

    try:
        while epoch < cfg.epochs:
            nxt = _next_boundary(epoch, chunk, cfg.checkpoint_every, cfg.epochs)
            new_state, step_losses = _run_chunk(state, data, train_key, jnp.asarray(epoch, jnp.int32),
                                                static=static, schedule=schedule, hp=hp, n_epochs=nxt - epoch)
            ep_losses = np.asarray(step_losses, dtype=np.float64).mean(axis=1)
            jax.block_until_ready(new_state)
            hist.append(ep_losses)
            state, epoch = new_state, nxt
            if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                save(state, epoch)
            if progress is not None:
                progress(epoch * spe, total_steps, float(ep_losses[-1]))
    except KeyboardInterrupt:
        save(state, epoch)
        raise
    save(state, epoch)

    params, ema, _ = state
    score_fn = eqx.combine(ema, static)
    raw_fn = eqx.combine(params, static)
    test_loss = None
    if x_test is not None and x_test.shape[0] > 1:
        test_loss = heldout_loss(score_fn, schedule, x_test, seed=cfg.seed, weighting=cfg.weighting,
                                 normalize_by_dim=cfg.normalize_by_dim)
    return TrainResult(score_fn, raw_fn, schedule, cfg, np.concatenate(hist)[:epoch], epoch, epoch * spe,
                       test_loss, time.perf_counter() - t_start, rd)
