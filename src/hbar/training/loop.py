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

from hbar import distributed
from hbar.locking import run_lock
from hbar.networks import network_from_config, validate_network_config
from hbar.schedules import Schedule
from hbar.serialization import atomic_write
from hbar.training.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOSSES_FILE,
    config_differences,
    load_config,
    load_tree,
    losses_csv,
    payload_tree,
    save_checkpoint,
)
from hbar.training.config import TrainConfig, make_training_data, optimizer, training_data_hash, training_levels
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
    levels: int | None = None  # image data: pixel levels of the per-batch dequantisation
    mesh: Any = None  # a jax.sharding.Mesh: the minibatch's rows are split over it (docs/theory.md section 15)


def _step_fn(data, *, static, schedule, hp: _Hyper):
    """One optimiser step, step((params, ema, opt_state), (idx (B,), key)) -> (state, loss)."""
    opt = optimizer(hp.lr, hp.grad_clip)

    def loss_fn(params, x0, key):
        net = eqx.combine(params, static)
        return dsm_loss(net, schedule, x0, key, hp.weighting, hp.normalize_by_dim)

    def step(carry, inp):
        params, ema, opt_state = carry
        idx, key = inp
        x0 = distributed.constrain_rows(data[idx], hp.mesh)
        if hp.levels is not None:  # image data: bin centres -> fresh uniform dequantisation (section 13.5)
            from hbar.images.preprocess import dequantize_jax

            kq, key = jax.random.split(key)
            x0 = dequantize_jax(kq, (x0 + 1.0) * (hp.levels / 2) - 0.5, hp.levels)
        loss, grads = jax.value_and_grad(loss_fn)(params, x0, key)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = optax.incremental_update(params, ema, step_size=1.0 - hp.ema_decay)  # optax's EMA of the weights
        return (params, ema, opt_state), loss

    return step


def _epoch_plan(train_key, e, n: int, hp: _Hyper):
    """Batch indices (S, B) and per-step keys (S,) of epoch e: a pure function of (train_key, e)."""
    B, S = hp.batch_size, hp.steps_per_epoch
    kperm, knoise = jax.random.split(jax.random.fold_in(train_key, e))
    perm = jax.random.permutation(kperm, n)[: S * B].reshape(S, B)
    return perm, jax.random.split(knoise, S)


@functools.partial(jax.jit, static_argnames=("static", "schedule", "hp", "n_epochs"))
def _run_chunk(state, data, train_key, e0, *, static, schedule, hp: _Hyper, n_epochs: int):
    """Run epochs e0 .. e0 + n_epochs - 1. state = (params, ema, opt_state).
    Returns (state, step losses (n_epochs, steps_per_epoch))."""
    step = _step_fn(data, static=static, schedule=schedule, hp=hp)

    def epoch(carry, e):
        return lax.scan(step, carry, _epoch_plan(train_key, e, data.shape[0], hp))

    return lax.scan(epoch, state, e0 + jnp.arange(n_epochs))


# Networks whose steps run one jitted call each instead of inside lax.scan: XLA on CPU runs
# convolutions inside a scan (while loop) ~20x slower than in a top-level jitted call (measured,
# jax 0.10.2: a 3x3 conv gradient, batch 32, 28x28x16: 7 ms per call vs 170 ms per scan step).
_STEPWISE_NETWORKS = frozenset({"unet"})

_plan_jit = jax.jit(_epoch_plan, static_argnames=("n", "hp"))


@functools.partial(jax.jit, static_argnames=("static", "schedule", "hp"))
def _one_step(state, data, idx, key, *, static, schedule, hp: _Hyper):
    return _step_fn(data, static=static, schedule=schedule, hp=hp)(state, (idx, key))


def _run_chunk_stepwise(state, data, train_key, e0, *, static, schedule, hp: _Hyper, n_epochs: int):
    """As :func:`_run_chunk` (same steps, same randomness), one jitted call per step."""
    rows = []
    for e in range(int(e0), int(e0) + n_epochs):
        perm, keys = _plan_jit(train_key, jnp.asarray(e, jnp.int32), n=data.shape[0], hp=hp)
        row = []
        for s in range(hp.steps_per_epoch):
            state, loss = _one_step(state, data, perm[s], keys[s], static=static, schedule=schedule, hp=hp)
            row.append(loss)
        rows.append(jnp.stack(row))
    return state, jnp.stack(rows)


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
    mesh: distributed.MeshLike = None,
) -> TrainResult:
    if run_dir is None or not distributed.is_main_process():  # process 0 alone writes (docs/theory.md section 15)
        return _train(config, run_dir, resume, progress, overwrite, mesh)
    with run_lock(run_dir, "hbar train"):  # one writer per run directory (docs/theory.md section 14.4)
        return _train(config, run_dir, resume, progress, overwrite, mesh)


def _train(
    config: TrainConfig | dict | str | os.PathLike | None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float], Any] | None = None,
    overwrite: bool = False,
    mesh: distributed.MeshLike = None,
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
    the last completed chunk before propagating. A run directory is locked while training
    (:func:`hbar.locking.run_lock`): a second writer gets HbarInputError naming the holder; a
    directory or file path that is an existing file is refused. The checkpoint header records
    the config (schedule, data set, data hash, config hash; docs/theory.md section 14.5).

    ``mesh``: data-parallel training (docs/theory.md section 15): None = every device JAX sees
    when there are several (all processes after :func:`hbar.distributed.initialize`), else the
    plain single-device path; an int (1: plain path), a device list or a one-axis
    ``jax.sharding.Mesh``. Parameters, optimiser state and training set are replicated, each
    minibatch's rows are split over the devices and the gradient of the mean loss is all-reduced
    by XLA: the same steps as on one device, equal up to float reduction order (stated tolerance
    for float32 weights after tens of steps: max |w_N - w_1| <= 1e-5 (1 + max |w_1|); measured
    6e-8 after 20 steps, tests/test_distributed.py). In a multi-process run
    only process 0 takes the lock and writes; the returned weights are local arrays on every process.
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
            if os.path.exists(os.path.join(rd, f)) and distributed.is_main_process():
                os.remove(os.path.join(rd, f))
        have_ckpt = False
    if have_ckpt and resume:
        stored = load_config(rd)
        diff = config_differences(stored.to_dict(), cfg.to_dict())
        if diff:
            raise HbarInputError(f"cannot resume {rd}: config field(s) differ from the stored run: {'; '.join(diff)}")
        header, tree, _ = load_tree(ckpt_path, cfg, resuming=True)
        if header.get("data_hash") != data_hash:
            raise HbarInputError(f"cannot resume {rd}: the training data differ from those of the stored run")
        if not np.array_equal(tree["key"], np.asarray(train_key, np.uint32)):
            raise HbarInputError(f"cannot resume {rd}: the checkpoint's RNG key does not match seed={cfg.seed}")
        params, ema, opt_state = tree["params"], tree["ema"], tree["opt_state"]
        epoch = int(tree["epoch"])
        losses = np.asarray(tree["losses"])[:epoch]
    if rd is not None and distributed.is_main_process():
        os.makedirs(rd, exist_ok=True)
        atomic_write(os.path.join(rd, CONFIG_FILE), (cfg.to_json() + "\n").encode())

    dt = jnp.dtype(jax.tree_util.tree_leaves(params)[0].dtype)  # the network's parameter dtype
    data = jnp.asarray(x_train, dtype=dt)
    hp = _Hyper(cfg.lr, cfg.grad_clip, cfg.ema_decay, cfg.weighting, cfg.normalize_by_dim, cfg.batch_size, spe,
                training_levels(cfg), distributed.resolve_mesh(mesh))
    chunk = _chunk_epochs(cfg, spe)
    run_chunk = _run_chunk_stepwise if cfg.network["name"] in _STEPWISE_NETWORKS else _run_chunk
    total_steps = cfg.epochs * spe
    state = (params, ema, opt_state)
    if hp.mesh is not None:  # data-parallel: weights, data and key on every device (docs/theory.md section 15)
        state, data, train_key = distributed.replicate((state, data, train_key), hp.mesh)
    saved_epoch = epoch if have_ckpt and resume else -1
    hist = [losses]

    def save(state_, epoch_):
        nonlocal saved_epoch
        if rd is None or epoch_ == saved_epoch:
            return
        if hp.mesh is not None:  # host copies; every process takes part, process 0 alone writes (section 15)
            state_ = distributed.gather(state_)
            if not distributed.is_main_process():
                saved_epoch = epoch_
                return
        all_losses = np.concatenate(hist)[:epoch_]
        tree_ = payload_tree(*state_, epoch_, epoch_ * spe, train_key, all_losses)
        save_checkpoint(rd, cfg, tree_, {"data_hash": data_hash, "steps_per_epoch": spe})
        atomic_write(os.path.join(rd, LOSSES_FILE), losses_csv(all_losses, spe))
        saved_epoch = epoch_

    try:
        while epoch < cfg.epochs:
            nxt = _next_boundary(epoch, chunk, cfg.checkpoint_every, cfg.epochs)
            new_state, step_losses = run_chunk(state, data, train_key, jnp.asarray(epoch, jnp.int32),
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

    if hp.mesh is not None:  # the weights as local arrays on every process
        state = jax.tree_util.tree_map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a,
                                       distributed.gather(state))
    params, ema, _ = state
    score_fn = eqx.combine(ema, static)
    raw_fn = eqx.combine(params, static)
    test_loss = None
    if x_test is not None and x_test.shape[0] > 1:
        test_loss = heldout_loss(score_fn, schedule, x_test, seed=cfg.seed, weighting=cfg.weighting,
                                 normalize_by_dim=cfg.normalize_by_dim)
    return TrainResult(score_fn, raw_fn, schedule, cfg, np.concatenate(hist)[:epoch], epoch, epoch * spe,
                       test_loss, time.perf_counter() - t_start, rd)


train.__doc__ = _train.__doc__
