"""Denoising score matching (theory.md section 3), checkpoints and resumable training.

Loss (per sample, averaged over a batch):

    l(x0, t, z) = w(t) || s(alpha(t) x0 + sigma(t) z, t) + z / sigma(t) ||^2   [/ d if normalize_by_dim]

with t ~ U[t_min, T], z ~ N(0, I_d), x0 from the training set, and
w(t) = g(t)^2 (default, ``weighting="g2"``: the likelihood / path-KL weighting for which the
h = 1 path KL equals KL(p_T || pi) + (1/2) int g^2 E||grad log p_t - s||^2 dt up to a
constant) or w(t) = sigma(t)^2 (``weighting="sigma2"``, the "simple" weighting).
For the exact score the expected loss is its minimum,
E_t[ w(t) (d / sigma^2 - E_{p_t} ||grad log p_t||^2) ] (times 1/d if normalised).

Training (:func:`train`): Adam (optax) with optional global-norm gradient clipping, an
exponential moving average of the weights, ema <- decay ema + (1 - decay) params after
every step (initialised to the initial weights; the EMA weights are what
:func:`load_checkpoint` returns for sampling). Epochs run over a fixed training set of
``n_train`` points, reshuffled every epoch; an epoch has floor(n_train / batch_size) steps
(the incomplete last batch is dropped, as the paper: 3000 points, batch 512 -> 5 steps per
epoch, 16000 epochs -> 80 000 steps). All randomness is a pure function of
(seed, epoch, step): epoch e uses fold_in(train_key, e) for its permutation and its
per-step (t, z) keys, so a resumed run reproduces an uninterrupted one bit for bit.
Epochs are executed in jitted chunks (``lax.scan`` over epochs, each a scan over steps)
whose boundaries are fixed multiples of a chunk length derived from the config.

Run directory layout::

    run_dir/config.json      the full TrainConfig (JSON), written atomically at the start
    run_dir/checkpoint.eqx   one JSON header line, then equinox-serialised leaves of
                             {params, ema, opt_state, epoch, step, key, losses}
                             (header: format, version, epoch, step, d, network config,
                             payload size and SHA-256, training-data hash)
    run_dir/losses.csv       epoch,step,loss (mean DSM loss of each epoch)

Every file is written to a temporary file in the same directory, fsynced and moved into
place with ``os.replace``, so an interruption never leaves a half-written checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import Array, lax

from hbar.data import DATASETS, canonical_name, load_dataset, load_points
from hbar.networks import network_from_config, validate_network_config
from hbar.schedules import Schedule, schedule_from_config
from hbar.serialization import atomic_write, to_jsonable
from hbar.validation import HbarInputError, check_points

__all__ = [
    "TrainConfig",
    "TrainResult",
    "dsm_weight",
    "dsm_per_sample",
    "dsm_loss",
    "heldout_loss",
    "make_training_data",
    "train",
    "load_checkpoint",
    "load_config",
    "check_dimension",
    "checkpoint_info",
    "CHECKPOINT_FILE",
    "CONFIG_FILE",
    "LOSSES_FILE",
]

CHECKPOINT_FILE = "checkpoint.eqx"
CONFIG_FILE = "config.json"
LOSSES_FILE = "losses.csv"
_FORMAT = "hbar-checkpoint"
_VERSION = 1
_TEST_SEED_OFFSET = 1_000_003  # held-out data use data_seed + this offset
_CHUNK_STEPS = 1000  # target optimiser steps per jitted chunk
WEIGHTINGS = ("g2", "sigma2")


# ======================================================================================
# the loss


def dsm_weight(schedule: Schedule, t: Array, weighting: str = "g2") -> Array:
    """w(t) = g(t)^2 (``"g2"``) or sigma(t)^2 (``"sigma2"``); shape of t."""
    if weighting == "g2":
        return schedule.g2(t)
    if weighting == "sigma2":
        return schedule.sigma2(t)
    raise HbarInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def _score_rows(score: Callable, x: Array, t: Array) -> Array:
    """Evaluate score at one time per row: x (n, d), t (n,) -> (n, d).

    hbar networks take a time vector directly; other scores (scalar-t contract) are
    vmapped over rows."""
    if getattr(score, "accepts_time_vector", False):
        return score(x, t)
    return jax.vmap(lambda xi, ti: score(xi[None, :], ti)[0])(x, t)


def dsm_per_sample(
    score: Callable,
    schedule: Schedule,
    x0: Array,
    t: Array,
    z: Array,
    weighting: str = "g2",
    normalize_by_dim: bool = False,
) -> Array:
    """Per-sample DSM loss w(t_i) || s(alpha_i x0_i + sigma_i z_i, t_i) + z_i / sigma_i ||^2.

    x0 (n, d), t (n,), z (n, d) -> (n,). Divided by d if ``normalize_by_dim``."""
    x0 = jnp.asarray(x0)
    t = jnp.asarray(t, dtype=x0.dtype)
    z = jnp.asarray(z, dtype=x0.dtype)
    a = schedule.alpha(t)[:, None]
    sig = schedule.sigma(t)[:, None]
    xt = a * x0 + sig * z
    r = _score_rows(score, xt, t) + z / sig
    out = dsm_weight(schedule, t, weighting) * jnp.sum(r**2, axis=1)
    return out / x0.shape[1] if normalize_by_dim else out


def _sample_tz(schedule: Schedule, key: Array, n: int, d: int, dtype: Any) -> tuple[Array, Array]:
    kt, kz = jax.random.split(key)
    t = jax.random.uniform(kt, (n,), dtype=dtype, minval=schedule.t_min, maxval=schedule.T)
    z = jax.random.normal(kz, (n, d), dtype=dtype)
    return t, z


def dsm_loss(
    score: Callable,
    schedule: Schedule,
    x0: Array,
    key: Array,
    weighting: str = "g2",
    normalize_by_dim: bool = False,
) -> Array:
    """Batch DSM loss: mean over rows of :func:`dsm_per_sample` with t_i ~ U[t_min, T] and
    z_i ~ N(0, I) drawn from ``key``. x0 (n, d) -> scalar."""
    x0 = jnp.asarray(x0)
    t, z = _sample_tz(schedule, key, x0.shape[0], x0.shape[1], x0.dtype)
    return jnp.mean(dsm_per_sample(score, schedule, x0, t, z, weighting, normalize_by_dim))


@eqx.filter_jit
def _heldout_chunk(score, schedule, x, key, weighting, normalize_by_dim):
    t, z = _sample_tz(schedule, key, x.shape[0], x.shape[1], x.dtype)
    return dsm_per_sample(score, schedule, x, t, z, weighting, normalize_by_dim)


def heldout_loss(
    score: Callable,
    schedule: Schedule,
    x: Any,
    *,
    seed: int = 0,
    repeats: int = 1,
    weighting: str = "g2",
    normalize_by_dim: bool = False,
    batch_size: int = 4096,
) -> tuple[float, float]:
    """DSM loss of ``score`` on held-out points x (n, d): (mean, standard error).

    Every point is used ``repeats`` times with independent (t, z) (keys from ``seed``); the
    standard error is std / sqrt(n * repeats) of the per-sample losses. Deterministic for a
    fixed seed."""
    x = jnp.asarray(check_points(x, "held-out data"))
    if weighting not in WEIGHTINGS:
        raise HbarInputError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    key = jax.random.PRNGKey(seed)
    vals = []
    for r in range(int(repeats)):
        kr = jax.random.fold_in(key, r)
        for j, i0 in enumerate(range(0, x.shape[0], batch_size)):
            vals.append(np.asarray(_heldout_chunk(score, schedule, x[i0:i0 + batch_size],
                                                  jax.random.fold_in(kr, j), weighting, normalize_by_dim),
                                   dtype=np.float64))
    v = np.concatenate(vals)
    se = float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else float("nan")
    return float(v.mean()), se


# ======================================================================================
# configuration


def _is_int(v: Any) -> bool:
    return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))) or (
        isinstance(v, float) and v.is_integer()
    )


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (JSON / TOML serialisable).

    Data: exactly one of ``dataset`` (a name in :data:`hbar.data.DATASETS`, with
    ``dataset_kwargs``) or ``data_path`` (a .npy/.npz/.csv/.txt file; ``test_path``
    optionally gives held-out points). ``n_train`` points are generated with ``data_seed``
    (default: ``seed``); ``n_test`` held-out points with data_seed + 1000003 (for data
    sets with a fixed split, e.g. digits, the 'train' / 'test' parts). With a file,
    ``n_train=None`` uses all rows, a smaller ``n_train`` a random subset.

    Model and loss: ``schedule`` (``Schedule.to_config()`` dict, a name or a Schedule),
    ``network`` (see :func:`hbar.networks.validate_network_config`; ``d`` is filled in
    from the data), ``weighting`` ('g2' or 'sigma2'), ``normalize_by_dim`` (divide the
    loss by d).

    Optimisation: Adam with learning rate ``lr``, optional ``grad_clip`` (global norm),
    ``batch_size``, ``epochs``, EMA ``ema_decay`` per step, ``seed`` (initialisation and
    training randomness), ``checkpoint_every`` (epochs).
    """

    dataset: str | None = None
    dataset_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_path: str | None = None
    test_path: str | None = None
    n_train: int | None = 3000
    n_test: int = 1000
    data_seed: int | None = None
    schedule: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "simple"})
    network: dict[str, Any] = dataclasses.field(default_factory=lambda: {"name": "paper_mlp"})
    lr: float = 1e-3
    batch_size: int = 512
    epochs: int = 16000
    weighting: str = "g2"
    normalize_by_dim: bool = False
    ema_decay: float = 0.999
    grad_clip: float | None = None
    seed: int = 0
    checkpoint_every: int = 1000

    # ---- validation ------------------------------------------------------------
    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)

        def need_int(name: str, lo: int, optional: bool = False) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not _is_int(v) or int(v) < lo:
                raise HbarInputError(f"config field {name!r} must be an integer >= {lo}, got {v!r}")
            set_(name, int(v))

        def need_str(name: str, optional: bool = True) -> None:
            v = getattr(self, name)
            if v is None and optional:
                return
            if not isinstance(v, str) or not v:
                raise HbarInputError(f"config field {name!r} must be a non-empty string, got {v!r}")

        # data
        need_str("dataset")
        need_str("data_path")
        need_str("test_path")
        if (self.dataset is None) == (self.data_path is None):
            raise HbarInputError("config needs exactly one of 'dataset' (a data set name) or 'data_path' (a file)")
        if self.test_path is not None and self.data_path is None:
            raise HbarInputError("config field 'test_path' needs 'data_path' (named data sets generate their own test data)")
        if not isinstance(self.dataset_kwargs, dict):
            raise HbarInputError(f"config field 'dataset_kwargs' must be a table/dict, got {self.dataset_kwargs!r}")
        if self.dataset is not None:
            try:
                name = canonical_name(self.dataset)
            except HbarInputError as err:
                raise HbarInputError(f"config field 'dataset': {err}") from None
            set_("dataset", name)
            allowed = DATASETS[name].kwargs
            unknown = set(self.dataset_kwargs) - set(allowed)
            if unknown:
                raise HbarInputError(
                    f"config field 'dataset_kwargs': unknown parameter(s) {sorted(unknown)} for data set "
                    f"{name!r}; allowed: {sorted(allowed)}"
                )
        elif self.dataset_kwargs:
            raise HbarInputError("config field 'dataset_kwargs' is only used with 'dataset'")
        set_("dataset_kwargs", to_jsonable(dict(self.dataset_kwargs)))
        need_int("n_train", 1, optional=self.data_path is not None)
        need_int("n_test", 0)
        need_int("data_seed", 0, optional=True)
        # schedule
        sch = self.schedule
        if isinstance(sch, Schedule):
            sch = sch.to_config()
        try:
            sched = schedule_from_config(sch)
        except HbarInputError as err:
            raise HbarInputError(f"config field 'schedule': {err}") from None
        set_("schedule", to_jsonable(sched.to_config()))
        # network
        try:
            set_("network", validate_network_config(self.network))
        except HbarInputError as err:
            raise HbarInputError(f"config field 'network': {err}") from None
        # optimisation
        for name in ("lr", "ema_decay"):
            v = getattr(self, name)
            if not _is_num(v) or not math.isfinite(float(v)):
                raise HbarInputError(f"config field {name!r} must be a finite number, got {v!r}")
            set_(name, float(v))
        if not self.lr > 0:
            raise HbarInputError(f"config field 'lr' must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise HbarInputError(f"config field 'ema_decay' must be in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None:
            if not _is_num(self.grad_clip) or not (math.isfinite(float(self.grad_clip)) and self.grad_clip > 0):
                raise HbarInputError(f"config field 'grad_clip' must be a positive number or absent, got {self.grad_clip!r}")
            set_("grad_clip", float(self.grad_clip))
        need_int("batch_size", 1)
        need_int("epochs", 1)
        need_int("seed", 0)
        need_int("checkpoint_every", 1)
        if self.weighting not in WEIGHTINGS:
            raise HbarInputError(f"config field 'weighting' must be one of {WEIGHTINGS}, got {self.weighting!r}")
        if not isinstance(self.normalize_by_dim, (bool, np.bool_)):
            raise HbarInputError(f"config field 'normalize_by_dim' must be true or false, got {self.normalize_by_dim!r}")
        set_("normalize_by_dim", bool(self.normalize_by_dim))
        if self.n_train is not None and self.batch_size > self.n_train:
            raise HbarInputError(
                f"config field 'batch_size' ({self.batch_size}) exceeds 'n_train' ({self.n_train}): "
                "an epoch would have no full batch"
            )

    # ---- construction --------------------------------------------------------------
    @classmethod
    def paper(cls, dataset: str = "swiss_roll", schedule: Any = "simple", **overrides: Any) -> TrainConfig:
        """The paper's setting (theory.md section 9): 3000 training points, PaperMLP
        (3 x 128 swish, raw t, float32), Adam lr 1e-3, batch 512, 16000 epochs
        (5 steps each, 80 000 steps), g^2-weighted DSM. ``overrides`` replace any field."""
        base: dict[str, Any] = dict(
            dataset=dataset,
            n_train=3000,
            n_test=1000,
            schedule=schedule,
            network={"name": "paper_mlp", "width": 128, "depth": 3, "dtype": "float32"},
            lr=1e-3,
            batch_size=512,
            epochs=16000,
            weighting="g2",
        )
        base.update(overrides)
        return cls(**base)

    @property
    def data_seed_resolved(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def schedule_obj(self) -> Schedule:
        return schedule_from_config(self.schedule)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field (inverse: :meth:`from_dict`)."""
        return to_jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        """Build and validate from a dict; missing fields take their defaults, unknown
        fields or bad values raise HbarInputError naming the field."""
        if not isinstance(d, dict):
            raise HbarInputError(f"training config must be a table/dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise HbarInputError(f"unknown config field(s) {sorted(unknown)}; allowed: {sorted(names)}")
        try:
            return cls(**d)
        except TypeError as err:  # pragma: no cover - defensive
            raise HbarInputError(f"bad training config: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(_drop_none(self.to_dict()))

    def save(self, path: str | os.PathLike) -> None:
        """Write to ``path`` as JSON (.json) or TOML (.toml), atomically."""
        p = os.fspath(path)
        ext = os.path.splitext(p)[1].lower()
        if ext == ".json":
            text = self.to_json() + "\n"
        elif ext == ".toml":
            text = self.to_toml()
        else:
            raise HbarInputError(f"config file must end in .json or .toml, got {p}")
        atomic_write(p, text.encode("utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike) -> TrainConfig:
        """Read a config from a .json or .toml file (HbarInputError for a missing or
        malformed file, with the parser's message)."""
        p = os.fspath(path)
        if not os.path.isfile(p):
            raise HbarInputError(f"config file not found: {p}")
        ext = os.path.splitext(p)[1].lower()
        with open(p, "rb") as fh:
            raw = fh.read()
        try:
            if ext == ".json":
                d = json.loads(raw.decode("utf-8"))
            elif ext == ".toml":
                import tomllib

                d = tomllib.loads(raw.decode("utf-8"))
            else:
                raise HbarInputError(f"config file must end in .json or .toml, got {p}")
        except HbarInputError:
            raise
        except Exception as err:
            raise HbarInputError(f"{p}: cannot parse config ({type(err).__name__}: {err})") from err
        try:
            return cls.from_dict(d)
        except HbarInputError as err:
            raise HbarInputError(f"{p}: {err}") from None

    def steps_per_epoch(self, n_train: int | None = None) -> int:
        """floor(n_train / batch_size) (the incomplete last batch is dropped)."""
        n = self.n_train if n_train is None else n_train
        if n is None:
            raise HbarInputError("steps_per_epoch needs n_train (the size of the data file)")
        return n // self.batch_size


def _drop_none(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v


# ======================================================================================
# data


def make_training_data(cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """(x_train (n_train, d), x_test (n_test, d) or None), float64, deterministic."""
    seed = cfg.data_seed_resolved
    if cfg.dataset is not None:
        kw = dict(cfg.dataset_kwargs)
        spec = DATASETS[cfg.dataset]
        kw_train, kw_test = dict(kw), dict(kw)
        if spec.has_split and "part" not in kw:
            kw_train["part"], kw_test["part"] = "train", "test"
        x = load_dataset(cfg.dataset, cfg.n_train, seed, **kw_train)
        xt = load_dataset(cfg.dataset, cfg.n_test, seed + _TEST_SEED_OFFSET, **kw_test) if cfg.n_test > 0 else None
        return x, xt
    x = load_points(cfg.data_path)
    if cfg.n_train is not None:
        if cfg.n_train > x.shape[0]:
            raise HbarInputError(f"n_train={cfg.n_train} but {cfg.data_path} has only {x.shape[0]} rows")
        if cfg.n_train < x.shape[0]:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], cfg.n_train, replace=False))]
    if cfg.batch_size > x.shape[0]:
        raise HbarInputError(f"batch_size={cfg.batch_size} exceeds the {x.shape[0]} training points in {cfg.data_path}")
    xt = load_points(cfg.test_path, d=x.shape[1]) if cfg.test_path is not None else None
    return x, xt


def _data_hash(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:16]


# ======================================================================================
# the jitted training chunk


class _Hyper(NamedTuple):
    lr: float
    grad_clip: float | None
    ema_decay: float
    weighting: str
    normalize_by_dim: bool
    batch_size: int
    steps_per_epoch: int


def _optimizer(lr: float, grad_clip: float | None) -> optax.GradientTransformation:
    opt = optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip is not None else opt


@functools.partial(jax.jit, static_argnames=("static", "schedule", "hp", "n_epochs"))
def _run_chunk(state, data, train_key, e0, *, static, schedule, hp: _Hyper, n_epochs: int):
    """Run epochs e0 .. e0 + n_epochs - 1. state = (params, ema, opt_state).
    Returns (state, step losses (n_epochs, steps_per_epoch))."""
    opt = _optimizer(hp.lr, hp.grad_clip)
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
        ema = jax.tree_util.tree_map(lambda e, p: e + (1.0 - hp.ema_decay) * (p - e), ema, params)
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


# ======================================================================================
# files


def _losses_csv(losses: np.ndarray, spe: int) -> bytes:
    lines = ["epoch,step,loss"]
    lines += [f"{i + 1},{(i + 1) * spe},{v:.9g}" for i, v in enumerate(losses)]
    return ("\n".join(lines) + "\n").encode()


def _payload_tree(params, ema, opt_state, epoch: int, step: int, key: Array, losses: np.ndarray) -> dict:
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


def _save_checkpoint(run_dir: str, cfg: TrainConfig, tree: dict, extra: dict) -> None:
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
        **extra,
    }
    blob = json.dumps(header, sort_keys=True).encode() + b"\n" + payload
    atomic_write(os.path.join(run_dir, CHECKPOINT_FILE), blob)


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
    opt_state = _optimizer(cfg.lr, cfg.grad_clip).init(params)
    return params, static, opt_state


def _load_tree(path: str, cfg: TrainConfig) -> tuple[dict, dict, Any]:
    """Read and verify a checkpoint against ``cfg``. Returns (header, tree, static)."""
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
    params, static, opt_state = _templates(cfg)
    like = _payload_tree(params, params, opt_state, 0, 0, jnp.zeros((2,), jnp.uint32),
                         np.zeros(int(header["n_losses"]), np.float64))
    try:
        tree = eqx.tree_deserialise_leaves(io.BytesIO(payload), like)
    except RuntimeError as err:
        raise HbarInputError(f"{path}: weights do not match the architecture in the config ({err})") from err
    except Exception as err:
        raise HbarInputError(f"{path} is truncated or corrupt ({type(err).__name__}: {err})") from err
    return header, tree, static


# ======================================================================================
# public training API


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


def load_config(run_dir: str | os.PathLike) -> TrainConfig:
    """The TrainConfig stored in ``run_dir/config.json``."""
    p = os.path.join(os.fspath(run_dir), CONFIG_FILE)
    if not os.path.isfile(p):
        raise HbarInputError(f"no {CONFIG_FILE} in {os.fspath(run_dir)}: not a training run directory")
    return TrainConfig.load(p)


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
    data_hash = _data_hash(x_train)

    root = jax.random.PRNGKey(cfg.seed)
    init_key, train_key = jax.random.split(root)
    net = network_from_config(cfg.network, init_key)
    params, static = eqx.partition(net, eqx.is_inexact_array)
    opt_state = _optimizer(cfg.lr, cfg.grad_clip).init(params)
    ema = params
    epoch = 0
    losses = np.zeros(0, np.float64)

    have_ckpt = ckpt_path is not None and os.path.exists(ckpt_path)
    if have_ckpt and not resume and not overwrite:
        raise HbarInputError(f"{rd} already holds a checkpoint; pass resume=True to continue or overwrite=True to restart")
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
        header, tree, _ = _load_tree(ckpt_path, cfg)
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
        tree_ = _payload_tree(*state_, epoch_, epoch_ * spe, train_key, all_losses)
        _save_checkpoint(rd, cfg, tree_, {"data_hash": data_hash, "steps_per_epoch": spe})
        atomic_write(os.path.join(rd, LOSSES_FILE), _losses_csv(all_losses, spe))
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


def load_checkpoint(
    run_dir: str | os.PathLike, config: TrainConfig | None = None, ema: bool = True
) -> tuple[Any, Schedule, TrainConfig]:
    """(score_fn, schedule, config) from a run directory.

    Rebuilds the network from the stored config (or ``config``), loads the EMA weights
    (``ema=False``: the raw Adam weights) and returns it as a score function
    ``score_fn(x (n, d), t) -> (n, d)``. A missing, truncated or corrupt checkpoint, or a
    config whose architecture does not match the stored weights, raises HbarInputError."""
    rd = os.fspath(run_dir)
    if not os.path.isdir(rd):
        raise HbarInputError(f"run directory not found: {rd}")
    cfg = load_config(rd) if config is None else config
    if cfg.network.get("d") is None:
        raise HbarInputError("the config's network has no dimension 'd'; use the config.json of the run")
    _, tree, static = _load_tree(os.path.join(rd, CHECKPOINT_FILE), cfg)
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
    if _is_int(x_or_d):
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
