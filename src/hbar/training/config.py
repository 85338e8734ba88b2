"""Training configuration (:class:`TrainConfig`), the training data it determines and the
optimiser it describes (docs/theory.md section 3 for the loss)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
from typing import Any

import numpy as np
import optax

from hbar.data import DATASETS, canonical_name, load_dataset, load_points
from hbar.networks import validate_network_config
from hbar.schedules import Schedule, schedule_from_config
from hbar.serialization import atomic_write, to_jsonable
from hbar.training.loss import WEIGHTINGS
from hbar.validation import HbarInputError

__all__ = ["TrainConfig", "make_training_data"]

_TEST_SEED_OFFSET = 1_000_003  # held-out data use data_seed + this offset


def is_int(v: Any) -> bool:
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
            if not is_int(v) or int(v) < lo:
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


def training_data_hash(x: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the float64 training points (stored in checkpoints)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:16]


def optimizer(lr: float, grad_clip: float | None) -> optax.GradientTransformation:
    """Adam(lr), after global-norm clipping at ``grad_clip`` when it is given."""
    opt = optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip is not None else opt
