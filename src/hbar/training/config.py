"""Training configuration (:class:`TrainConfig`), the training data it determines and the
optimiser it describes (docs/theory.md section 3 for the loss)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Annotated, Any, Literal

import numpy as np
import optax
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from hbar.data import DATASETS, canonical_name, load_dataset, load_points
from hbar.networks import validate_network_config
from hbar.schedules import Schedule, schedule_from_config
from hbar.serialization import atomic_write, to_jsonable
from hbar.training.loss import WEIGHTINGS
from hbar.validation import HbarInputError

__all__ = ["TrainConfig", "IMAGE_DATASETS", "make_training_data", "training_levels"]

_TEST_SEED_OFFSET = 1_000_003  # held-out data use data_seed + this offset
_SEED_LIMIT = 2**32 - _TEST_SEED_OFFSET  # numpy / scikit-learn seeds are < 2**32, offset included

#: image data sets trained from their pixels (:mod:`hbar.images.datasets`): the training set
#: holds bin centres and every batch is dequantised afresh (docs/theory.md section 13.5).
#: sklearn's 8x8 digits as images are "digits8x8" (17 levels); "digits" remains the point data
#: set of :mod:`hbar.data` (dequantised once when generated).
IMAGE_DATASETS = ("mnist5k", "fashion_mnist", "digits8x8")


def _canonical_dataset(name: str) -> str:
    """A name of :data:`hbar.data.DATASETS` or of :data:`IMAGE_DATASETS` (aliases allowed)."""
    if isinstance(name, str) and name.lower() in IMAGE_DATASETS:
        return name.lower()
    try:
        return canonical_name(name)
    except HbarInputError:
        from hbar.images.datasets import dataset_info

        try:
            key = dataset_info(name)["name"]
        except HbarInputError:
            key = None
        if key not in IMAGE_DATASETS:
            raise HbarInputError(f"unknown data set {name!r}; known: {sorted(DATASETS)} and the image data sets "
                                 f"{list(IMAGE_DATASETS)}") from None
        return key


def is_int(v: Any) -> bool:
    return (isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))) or (
        isinstance(v, float) and v.is_integer()
    )


def _plain_number(v: Any) -> Any:
    """Before-validator of the numeric fields: refuse bools and strings (JSON "512" or true is a
    mistake, not a number) and unwrap NumPy scalars; pydantic then checks the type and bounds
    (an int field takes 3.0, not 2.5)."""
    if isinstance(v, (bool, np.bool_, str, bytes)):
        raise ValueError("must be a number, not " + type(v).__name__)
    return v.item() if isinstance(v, np.generic) else v


def _plain_bool(v: Any) -> Any:
    return bool(v) if isinstance(v, np.bool_) else v


_Int = Annotated[int, BeforeValidator(_plain_number)]
_Float = Annotated[float, BeforeValidator(_plain_number), Field(allow_inf_nan=False)]
_Text = Annotated[str, StringConstraints(strict=True, min_length=1)]


class _TrainFields(BaseModel):
    """The typed schema of :class:`TrainConfig` (pydantic v2): types and bounds per field,
    then the rules between fields. Used by ``TrainConfig.__post_init__``; the values it
    returns are the normalised fields."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    dataset: _Text | None = None
    dataset_kwargs: dict[str, Any] = {}
    data_path: _Text | None = None
    test_path: _Text | None = None
    index_col: Any = None
    n_train: Any = None
    n_test: Annotated[_Int, Field(ge=0)] = 1000
    data_seed: Annotated[_Int, Field(ge=0, lt=_SEED_LIMIT)] | None = None
    schedule: Any = None
    network: Any = None
    lr: Annotated[_Float, Field(gt=0)] = 1e-3
    batch_size: Annotated[_Int, Field(ge=1)] = 512
    epochs: Annotated[_Int, Field(ge=1)] = 16000
    weighting: Literal[WEIGHTINGS] = "g2"  # type: ignore[valid-type]
    normalize_by_dim: Annotated[StrictBool, BeforeValidator(_plain_bool)] = False
    ema_decay: Annotated[_Float, Field(ge=0, lt=1)] = 0.999
    grad_clip: Annotated[_Float, Field(gt=0)] | None = None
    seed: Annotated[_Int, Field(ge=0, lt=_SEED_LIMIT)] = 0
    checkpoint_every: Annotated[_Int, Field(ge=1)] = 1000

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, v: str | None) -> str | None:
        return None if v is None else _canonical_dataset(v)

    @field_validator("data_path", "test_path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        return None if v is None else os.path.abspath(os.path.expanduser(v))

    @field_validator("index_col")
    @classmethod
    def _index_col(cls, v: Any) -> int | bool | None:
        if v is None or v is False or (isinstance(v, np.bool_) and not v):
            return None if v is None else False
        if is_int(v) and int(v) >= 0:
            return int(v)
        raise ValueError("must be an integer >= 0, false, or absent")

    @field_validator("n_train")
    @classmethod
    def _n_train(cls, v: Any) -> int | str | None:
        if v is None:
            return None
        if isinstance(v, str):
            if v.strip().lower() == "all":
                return "all"
        elif is_int(v) and int(v) >= 1:
            return int(v)
        raise ValueError('must be an integer >= 1 or "all"')

    @field_validator("schedule")
    @classmethod
    def _schedule(cls, v: Any) -> dict[str, Any]:
        return to_jsonable(schedule_from_config(v.to_config() if isinstance(v, Schedule) else v).to_config())

    @field_validator("network")
    @classmethod
    def _network(cls, v: Any) -> dict[str, Any]:
        return validate_network_config(v)

    @model_validator(mode="after")
    def _between_fields(self) -> _TrainFields:
        if (self.dataset is None) == (self.data_path is None):
            raise ValueError("config needs exactly one of 'dataset' (a data set name) or 'data_path' (a file)")
        if self.test_path is not None and self.data_path is None:
            raise ValueError("config field 'test_path' needs 'data_path' (named data sets generate their own test data)")
        if self.dataset in IMAGE_DATASETS:
            if self.dataset_kwargs:
                raise ValueError(f"config field 'dataset_kwargs' is not used by the image data set {self.dataset!r}")
        elif self.dataset is not None:
            allowed = DATASETS[self.dataset].kwargs
            unknown = set(self.dataset_kwargs) - set(allowed)
            if unknown:
                raise ValueError(f"config field 'dataset_kwargs': unknown parameter(s) {sorted(unknown)} for data set "
                                 f"{self.dataset!r}; allowed: {sorted(allowed)}")
            if self.n_train == "all":
                raise ValueError("config field 'n_train' = \"all\" needs a data file ('data_path'); a data set "
                                 "generates as many points as asked")
            if self.n_train is None:
                self.n_train = 3000
        elif self.dataset_kwargs:
            raise ValueError("config field 'dataset_kwargs' is only used with 'dataset'")
        if self.n_train == "all":
            self.n_train = None
        self.dataset_kwargs = to_jsonable(dict(self.dataset_kwargs))
        if isinstance(self.network, dict) and self.network.get("name") == "unet":
            sched = self.network.get("schedule")
            if sched is None:  # the U-Net's sigma(t) is that of the training schedule
                self.network = {**self.network, "schedule": self.schedule}
            elif sched != self.schedule:
                raise ValueError(f"config field 'network': the U-Net's schedule {sched} differs from the training "
                                 f"schedule {self.schedule} (leave it out: it is filled in)")
        if self.n_train is not None and self.batch_size > self.n_train:
            raise ValueError(f"config field 'batch_size' ({self.batch_size}) exceeds 'n_train' ({self.n_train}): "
                             "an epoch would have no full batch")
        return self


def _validate_fields(values: dict[str, Any]) -> dict[str, Any]:
    """Run :class:`_TrainFields` on ``values``; a ValidationError becomes one HbarInputError
    whose message names each bad field ("config field 'lr': input should be greater than 0
    (got -1)")."""
    try:
        m = _TrainFields.model_validate(values)
    except ValidationError as err:
        msgs = []
        for e in err.errors(include_url=False):
            text = str(e["msg"]).removeprefix("Value error, ")
            if not e["loc"]:  # a rule between fields: the message names them
                msgs.append(text)
                continue
            field = e["loc"][0]
            got = e.get("input")
            msgs.append(text if text.startswith("config field") else
                        f"config field {field!r}: {text[:1].lower()}{text[1:]} (got {got!r})")
        raise HbarInputError("; ".join(dict.fromkeys(msgs))) from None
    return {name: getattr(m, name) for name in values}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (JSON / TOML serialisable).

    Data: exactly one of ``dataset`` (a name in :data:`hbar.data.DATASETS`, with
    ``dataset_kwargs``, or an image data set of :data:`IMAGE_DATASETS`) or ``data_path``
    (a .npy/.npz/.csv/.txt file; ``test_path``
    optionally gives held-out points). ``n_train`` points are generated with ``data_seed``
    (default: ``seed``); ``n_test`` held-out points with data_seed + 1000003 (for data
    sets with a fixed split, e.g. digits, the 'train' / 'test' parts). ``n_train`` left out
    (None) or ``"all"``: every row of a file, 3000 points of a data set; a smaller number: a
    random subset of the file. File paths are stored absolute (a relative path is resolved
    against the current directory, or, in a config file, against that file's directory),
    so a run can be resumed from anywhere. ``index_col``: see :func:`hbar.data.load_points`
    (None: refuse a file whose first column looks like a row index; k: drop column k;
    False: keep every column). Image data sets (``"mnist5k"``, ``"fashion_mnist"``): the
    'train' split (``n_train`` None: all of it; an int: a seeded subset) as bin centres
    x = 2 (k + 1/2) / levels - 1, dequantised afresh in every training batch; held-out: up to
    ``n_test`` images of the 'test' split, dequantised once with a seeded generator.

    Model and loss: ``schedule`` (``Schedule.to_config()`` dict, a name or a Schedule),
    ``network`` (see :func:`hbar.networks.validate_network_config`; ``d`` is filled in
    from the data, and a U-Net's ``schedule`` from ``schedule``), ``weighting`` ('g2' or
    'sigma2'), ``normalize_by_dim`` (divide the
    loss by d).

    Optimisation: Adam with learning rate ``lr``, optional ``grad_clip`` (global norm),
    ``batch_size``, ``epochs``, EMA ``ema_decay`` per step, ``seed`` (initialisation and
    training randomness), ``checkpoint_every`` (epochs).
    """

    dataset: str | None = None
    dataset_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    data_path: str | None = None
    test_path: str | None = None
    index_col: int | bool | None = None
    n_train: int | str | None = None
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
        """Validate and normalise every field with the typed model :class:`_TrainFields`
        (pydantic); any error becomes one HbarInputError naming the field."""
        values = _validate_fields({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        for name, v in values.items():
            object.__setattr__(self, name, v)

    # ---- construction --------------------------------------------------------------
    @classmethod
    def paper(cls, dataset: str = "swiss_roll", schedule: Any = "simple", **overrides: Any) -> TrainConfig:
        """The paper's setting (docs/theory.md section 9): 3000 training points, PaperMLP
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

    @classmethod
    def images(cls, dataset: str = "mnist5k", **overrides: Any) -> TrainConfig:
        """Image training defaults (docs/theory.md section 13.5), sized for 2 CPU cores and
        unchanged otherwise on a GPU (raise ``epochs``, ``batch_size``, ``base_channels`` there):
        the 'train' split, a U-Net (base 16 channels, mults (1, 2, 2), 1 block per level,
        ~0.26M parameters, float32) on the VP-linear schedule, the eps-MSE loss (sigma^2
        weighting, divided by d), Adam lr 1e-3 with clipping at 1, batch 64, EMA 0.995 (a
        ~200-step horizon, so that the initial weights are forgotten in a short run). ``epochs``
        is set for ~25 min on 2 shared CPU cores at the measured ~1.3 steps/s: 30 for mnist5k
        (2100 steps, a checkpoint every 3 epochs) and 2 for fashion_mnist (1874 steps, one per
        epoch). ``overrides`` replace any field."""
        key = _canonical_dataset(dataset)
        if key not in IMAGE_DATASETS:
            raise HbarInputError(f"TrainConfig.images needs an image data set {list(IMAGE_DATASETS)}, got {dataset!r}")
        base: dict[str, Any] = dict(
            dataset=key,
            n_test=500,
            schedule="vp-linear",
            network={"name": "unet", "base_channels": 16, "channel_mults": [1, 2, 2], "blocks": 1, "groups": 4,
                     "embed_dim": 32, "dtype": "float32"},
            lr=1e-3,
            grad_clip=1.0,
            batch_size=64,
            epochs=30 if key == "mnist5k" else 2,
            weighting="sigma2",
            normalize_by_dim=True,
            ema_decay=0.995,
            checkpoint_every=3 if key == "mnist5k" else 1,
        )
        base.update(overrides)
        return cls(**base)

    @property
    def data_seed_resolved(self) -> int:
        return self.seed if self.data_seed is None else self.data_seed

    def schedule_obj(self) -> Schedule:
        return schedule_from_config(self.schedule)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; a new ``schedule`` also becomes the U-Net's when that was filled in
        from the old one (the U-Net's sigma(t) is the training schedule's, docs/theory.md section 13.4)."""
        if ("schedule" in changes and "network" not in changes and isinstance(self.network, dict)
                and self.network.get("name") == "unet" and self.network.get("schedule") == self.schedule):
            changes["network"] = {k: v for k, v in self.network.items() if k != "schedule"}
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
        if isinstance(d, dict):  # relative file paths are relative to the config file
            base = os.path.dirname(os.path.abspath(p))
            for key in ("data_path", "test_path"):
                v = d.get(key)
                if isinstance(v, str) and v and not os.path.isabs(os.path.expanduser(v)):
                    d = {**d, key: os.path.join(base, v)}
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
    if cfg.dataset in IMAGE_DATASETS:
        return _image_data(cfg, seed)
    if cfg.dataset is not None:
        kw = dict(cfg.dataset_kwargs)
        spec = DATASETS[cfg.dataset]
        kw_train, kw_test = dict(kw), dict(kw)
        if spec.has_split and "part" not in kw:
            kw_train["part"], kw_test["part"] = "train", "test"
        x = load_dataset(cfg.dataset, cfg.n_train, seed, **kw_train)
        xt = load_dataset(cfg.dataset, cfg.n_test, seed + _TEST_SEED_OFFSET, **kw_test) if cfg.n_test > 0 else None
        return x, xt
    x = load_points(cfg.data_path, index_col=cfg.index_col)
    if cfg.n_train is not None:
        if cfg.n_train > x.shape[0]:
            raise HbarInputError(f"n_train={cfg.n_train} but {cfg.data_path} has only {x.shape[0]} rows")
        if cfg.n_train < x.shape[0]:
            x = x[np.sort(np.random.default_rng(seed).choice(x.shape[0], cfg.n_train, replace=False))]
    if cfg.batch_size > x.shape[0]:
        raise HbarInputError(f"batch_size={cfg.batch_size} exceeds the {x.shape[0]} training points in {cfg.data_path} "
                             "(set batch_size, CLI --batch-size, to at most the number of rows)")
    xt = load_points(cfg.test_path, d=x.shape[1], index_col=cfg.index_col) if cfg.test_path is not None else None
    return x, xt


def _image_data(cfg: TrainConfig, seed: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Bin centres of the 'train' split (n_train None: all; else a seeded subset), and up to
    n_test 'test' images dequantised with default_rng(seed + 1000003)."""
    from hbar.images.datasets import load_images
    from hbar.images.preprocess import to_model_space

    tr = load_images(cfg.dataset, "train", n=cfg.n_train, seed=seed)
    x = to_model_space(tr.images, tr.levels)
    if cfg.batch_size > x.shape[0]:
        raise HbarInputError(f"batch_size={cfg.batch_size} exceeds the {x.shape[0]} training images of {cfg.dataset}")
    if cfg.n_test == 0:
        return x, None
    te = load_images(cfg.dataset, "test")
    if cfg.n_test < te.n:
        te = load_images(cfg.dataset, "test", n=cfg.n_test, seed=seed + _TEST_SEED_OFFSET)
    return x, to_model_space(te.images, te.levels, np.random.default_rng(seed + _TEST_SEED_OFFSET))


def training_levels(cfg: TrainConfig) -> int | None:
    """Pixel levels of an image data set (its training batches are dequantised with bin width
    2 / levels), None for point data."""
    if cfg.dataset not in IMAGE_DATASETS:
        return None
    from hbar.images.datasets import dataset_info

    return int(dataset_info(cfg.dataset)["levels"])


def training_data_hash(x: np.ndarray) -> str:
    """First 16 hex digits of the SHA-256 of the float64 training points (stored in checkpoints)."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float64).tobytes()).hexdigest()[:16]


def optimizer(lr: float, grad_clip: float | None) -> optax.GradientTransformation:
    """Adam(lr), after global-norm clipping at ``grad_clip`` when it is given."""
    opt = optax.adam(lr)
    return optax.chain(optax.clip_by_global_norm(grad_clip), opt) if grad_clip is not None else opt
