"""Run directories: config, checkpoint and loss files, and loading a trained model.

Layout::

    run_dir/config.json      the full TrainConfig (JSON), written atomically at the start
    run_dir/checkpoint.eqx   one JSON header line, then equinox-serialised leaves of
                             {params, ema, opt_state, epoch, step, key, losses}
                             (header: format, version, epoch, step, d, network config,
                             payload size and SHA-256, training-data hash, and the record
                             of what was trained: the full config, its hash, the schedule
                             and the data set; docs/theory.md section 14.5)
    run_dir/losses.csv       epoch,step,loss (mean DSM loss of each epoch)
    run_dir/model.safetensors  the EMA weights for other tools: safetensors (readable by
                             ``safetensors.numpy`` / ``safetensors.flax`` without hbar), tensor
                             names are JAX key paths (e.g. ``.layers[0].weight``), metadata
                             holds the network config; with config.json it defines the model

Every file is written to a temporary file in the same directory, fsynced and moved into
place with ``os.replace``, so an interruption never leaves a half-written checkpoint.

Loading checks the record against ``config.json`` (or the config passed in): a schedule, data
set or any other field edited after training (all but ``epochs`` and ``checkpoint_every``,
which a resume may change) is an HbarInputError listing each differing field with both values,
unless ``allow_config_mismatch=True`` (CLI ``--allow-config-mismatch``; then a warning).
Checkpoints written before the record existed load with a warning saying they cannot be checked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.networks import network_from_config
from hbar.schedules import Schedule
from hbar.serialization import atomic_write
from hbar.training.config import TrainConfig, is_int, optimizer
from hbar.validation import HbarInputError, check_points

__all__ = ["CHECKPOINT_FILE", "CONFIG_FILE", "LOSSES_FILE", "WEIGHTS_FILE", "RESUME_MAY_CHANGE", "load_safetensors_weights",
           "load_config", "load_checkpoint", "checkpoint_info", "check_dimension", "config_hash", "config_differences"]

CHECKPOINT_FILE = "checkpoint.eqx"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LOSSES_FILE = "losses.csv"
_FORMAT = "hbar-checkpoint"
_VERSION = 1
#: config fields a resume may change (more epochs, another checkpoint interval); left out of
#: the config hash and of the record check
RESUME_MAY_CHANGE = frozenset({"epochs", "checkpoint_every"})


def config_hash(cfg: TrainConfig | dict[str, Any]) -> str:
    """First 16 hex digits of the SHA-256 of the config's canonical JSON (sorted keys), without
    the fields in :data:`RESUME_MAY_CHANGE`."""
    d = cfg.to_dict() if isinstance(cfg, TrainConfig) else dict(cfg)
    d = {k: v for k, v in d.items() if k not in RESUME_MAY_CHANGE}
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_differences(stored: dict[str, Any], current: dict[str, Any],
                       ignore: frozenset[str] = RESUME_MAY_CHANGE) -> list[str]:
    """'field: stored X, now Y' for every field (but ``ignore``) whose value differs."""
    keys = sorted((set(stored) | set(current)) - set(ignore))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys if stored.get(k) != current.get(k)]


def _data_record(cfg: TrainConfig) -> dict[str, Any]:
    """What the model was trained on: data set name and parameters, or the data file."""
    if cfg.dataset is not None:
        return {"dataset": cfg.dataset, "dataset_kwargs": cfg.dataset_kwargs, "n_train": cfg.n_train,
                "data_seed": cfg.data_seed_resolved}
    return {"data_path": cfg.data_path, "index_col": cfg.index_col, "n_train": cfg.n_train,
            "data_seed": cfg.data_seed_resolved}


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig stored in ``run_dir/config.json``."""
    p = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    if not os.path.isfile(p):
        raise HbarInputError(f"no {CONFIG_FILE} in {os.fspath(run_dir)}: not a training run directory")
    return TrainConfig.load(p)


def losses_csv(losses: np.ndarray, spe: int) -> bytes:
    lines = ["epoch,step,loss"]
    lines += [f"{i + 1},{(i + 1) * spe},{v:.9g}" for i, v in enumerate(losses)]
    return ("\n".join(lines) + "\n").encode()


def payload_tree(params, ema, opt_state, epoch: int, step: int, key: Array, losses: np.ndarray) -> dict:
    return {
        "params": params,
        "ema": ema,
        "opt_state": opt_state,
        "epoch": np.asarray(epoch, dtype=np.int64),
        "step": np.asarray(step, dtype=np.int64),
        "key": np.asarray(jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key,
                          dtype=np.uint32),
        "losses": np.asarray(losses, dtype=np.float64),
    }


def save_checkpoint(run_dir: str, cfg: TrainConfig, tree: dict, extra: dict) -> None:
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, tree)
    payload = buf.getvalue()
    header = {
        "format": _FORMAT,
        "version": _VERSION,
        "epoch": int(tree["epoch"]),
        "step": int(tree["step"]),
        "n_losses": int(tree["losses"].shape[0]),
        "d": cfg.network["d"],
        "network": cfg.network,
        "seed": cfg.seed,
        "payload_bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "schedule": cfg.schedule,
        "data": _data_record(cfg),
        "config": cfg.to_dict(),
        "config_hash": config_hash(cfg),
        **extra,
    }
    blob = json.dumps(header, sort_keys=True).encode() + b"\n" + payload
    atomic_write(os.path.join(run_dir, WEIGHTS_FILE), weights_safetensors(tree["ema"], cfg, int(tree["step"])))
    atomic_write(os.path.join(run_dir, CHECKPOINT_FILE), blob)


def weights_safetensors(params: Any, cfg: TrainConfig, step: int) -> bytes:
    """The array leaves of ``params`` as a safetensors blob named by their JAX key paths."""
    from safetensors.numpy import save

    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    tensors = {jax.tree_util.keystr(path): np.ascontiguousarray(np.asarray(v)) for path, v in leaves
               if eqx.is_array(v)}
    meta = {"format": "hbar-weights", "network": json.dumps(cfg.network, sort_keys=True),
            "schedule": json.dumps(cfg.schedule, sort_keys=True), "step": str(step), "weights": "ema"}
    return save(tensors, metadata=meta)


def load_safetensors_weights(run_dir: str | os.PathLike) -> Any:
    """Rebuild the EMA network of a run from ``config.json`` + ``model.safetensors`` only
    (what a tool without hbar's checkpoint format would do)."""
    from safetensors.numpy import load_file

    rd = os.fspath(run_dir)
    cfg = load_config(rd)
    path = os.path.join(rd, WEIGHTS_FILE)
    if not os.path.isfile(path):
        raise HbarInputError(f"no {WEIGHTS_FILE} in {rd} (runs trained before hbar 0.2 have only {CHECKPOINT_FILE})")
    tensors = load_file(path)
    params, static, _ = _templates(cfg)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    try:
        new = [jnp.asarray(tensors[jax.tree_util.keystr(p)], dtype=v.dtype) for p, v in leaves]
    except KeyError as err:
        raise HbarInputError(f"{path}: tensor {err} missing for the network in config.json") from None
    return eqx.combine(jax.tree_util.tree_unflatten(treedef, new), static)


def _read_checkpoint_header(path: str) -> tuple[dict, bytes]:
    if not os.path.isfile(path):
        raise HbarInputError(f"no checkpoint found: {path}")
    with open(path, "rb") as fh:
        blob = fh.read()
    nl = blob.find(b"\n")
    try:
        header = json.loads(blob[:nl].decode()) if nl > 0 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != _FORMAT:
        raise HbarInputError(f"{path} is not an hbar checkpoint (missing or unreadable header)")
    if header.get("version") != _VERSION:
        raise HbarInputError(f"{path}: checkpoint format version {header.get('version')} is not supported (expected {_VERSION})")
    payload = blob[nl + 1:]
    if len(payload) != header.get("payload_bytes"):
        raise HbarInputError(
            f"{path} is truncated or corrupt: {len(payload)} bytes of weights, header says {header.get('payload_bytes')}"
        )
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise HbarInputError(f"{path} is corrupt: SHA-256 of the weights does not match the header")
    return header, payload


def _templates(cfg: TrainConfig):
    """(params, static, optimiser state) shaped like the config's network."""
    net = network_from_config(cfg.network, jax.random.PRNGKey(0))
    params, static = eqx.partition(net, eqx.is_inexact_array)
    opt_state = optimizer(cfg.lr, cfg.grad_clip).init(params)
    return params, static, opt_state


def check_record(header: dict[str, Any], cfg: TrainConfig, path: str, allow_config_mismatch: bool = False,
                 resuming: bool = False) -> None:
    """Compare the config recorded in a checkpoint header with ``cfg`` (HbarInputError listing the
    differing fields, a warning with ``allow_config_mismatch``; a warning for checkpoints without a
    record). ``resuming``: no override exists (a resume continues the same run)."""
    rec = header.get("config")
    if not isinstance(rec, dict):
        warnings.warn(f"{path} was written before checkpoints recorded their config: its schedule and data "
                      "cannot be checked against the config", stacklevel=3)
        return
    diffs = config_differences(rec, cfg.to_dict())
    if not diffs:
        return
    msg = f"{path} was trained with a different config than the one given (config.json edited?): {'; '.join(diffs)}"
    if resuming:
        raise HbarInputError(f"cannot resume: {msg}; restore config.json (a resume continues the same run)")
    if not allow_config_mismatch:
        raise HbarInputError(msg + "; restore the config, or pass allow_config_mismatch=True (CLI: "
                                   "--allow-config-mismatch) to load it anyway")
    warnings.warn(msg + " (loaded anyway: allow_config_mismatch)", stacklevel=3)


def load_tree(path: str, cfg: TrainConfig, allow_config_mismatch: bool = False,
              resuming: bool = False) -> tuple[dict, dict, Any]:
    """Read and verify a checkpoint against ``cfg`` (architecture, then the config record, see
    :func:`check_record`). Returns (header, tree, static)."""
    header, payload = _read_checkpoint_header(path)
    d_cfg = cfg.network.get("d")
    if header.get("d") != d_cfg:
        raise HbarInputError(
            f"{path} holds a model for d={header.get('d')} but the config's network has d={d_cfg}"
        )
    if header.get("network") != cfg.network:
        raise HbarInputError(
            f"{path}: the network in the checkpoint {header.get('network')} does not match the config {cfg.network}"
        )
    check_record(header, cfg, path, allow_config_mismatch, resuming)
    params, static, opt_state = _templates(cfg)
    like = payload_tree(params, params, opt_state, 0, 0, jnp.zeros((2,), jnp.uint32),
                         np.zeros(int(header["n_losses"]), np.float64))
    try:
        tree = eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
    except RuntimeError as err:
        raise HbarInputError(f"{path}: weights do not match the architecture in the config ({err})") from err
    except Exception as err:
        raise HbarInputError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    return header, tree, static


def load_checkpoint(
    run_dir: str | os.PathLike, config: TrainConfig | None = None, ema: bool = True,
    allow_config_mismatch: bool = False,
) -> tuple[Any, Schedule, TrainConfig]:
    """(score_fn, schedule, config) from a run directory.

    Rebuilds the network from the stored config (or ``config``), loads the EMA weights
    (``ema=False``: the raw Adam weights) and returns it as a score function
    ``score_fn(x (n, d), t) -> (n, d)``. A missing, truncated or corrupt checkpoint, or a
    config whose architecture does not match the stored weights, raises HbarInputError; so
    does a config that differs from the one recorded in the checkpoint (e.g. config.json edited
    from schedule simple to cosine), unless ``allow_config_mismatch`` (then a warning)."""
    rd = os.fspath(run_dir)
    if os.path.isfile(rd):
        raise HbarInputError(f"{rd} is a file, not a training run directory")
    if not os.path.isdir(rd):
        raise HbarInputError(f"run directory not found: {rd}")
    cfg = load_config(rd) if config is None else config
    if cfg.network.get("d") is None:
        raise HbarInputError("the config's network has no dimension 'd'; use the config.json of the run")
    _, tree, static = load_tree(os.path.join(rd, CHECKPOINT_FILE), cfg, allow_config_mismatch)
    score_fn = eqx.combine(tree["ema"] if ema else tree["params"], static)
    return score_fn, cfg.schedule_obj(), cfg


def checkpoint_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint header (epoch, step, d, network, ...) without loading weights."""
    header, _ = _read_checkpoint_header(os.path.join(os.fspath(run_dir), CHECKPOINT_FILE))
    return header


def check_dimension(x_or_d: Any, source: Any) -> int:
    """Check data (an (n, d) array or an int d) against a model's dimension.

    ``source`` is a run directory, a TrainConfig (with resolved ``network.d``) or an hbar
    network. Returns d; raises HbarInputError naming both dimensions when they differ."""
    if is_int(x_or_d):
        d = int(x_or_d)
    else:
        d = check_points(x_or_d, "data").shape[1]
    if isinstance(source, (str, os.PathLike)):
        what = f"the model in {os.fspath(source)}"
        dm = load_config(source).network.get("d")
    elif isinstance(source, TrainConfig):
        what, dm = "the config's network", source.network.get("d")
    elif hasattr(source, "d"):
        what, dm = f"the {type(source).__name__}", source.d
    else:
        raise HbarInputError(f"check_dimension: cannot read a dimension from {type(source).__name__}")
    if dm is None:
        raise HbarInputError(f"{what} has no recorded dimension")
    if int(dm) != d:
        raise HbarInputError(f"data have dimension {d} but {what} was built for d={int(dm)}")
    return d
