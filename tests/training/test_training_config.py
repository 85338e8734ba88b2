"""hbar.training.config: TrainConfig validation, round trips and the paper's setting."""

import json

import pytest
from _training_cases import TINY

from hbar.schedules import CosineSchedule
from hbar.training import TrainConfig
from hbar.validation import HbarInputError


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


@pytest.mark.parametrize(
    "change, message",
    [
        ({"epochs": True}, "config field 'epochs': must be a number, not bool (got True)"),
        ({"lr": float("nan")}, "config field 'lr': input should be a finite number (got nan)"),
        ({"lr": 0}, "config field 'lr': input should be greater than 0 (got 0)"),
        ({"index_col": True}, "config field 'index_col': must be an integer >= 0, false, or absent (got True)"),
        ({"n_train": "some"}, "config field 'n_train': must be an integer >= 1 or \"all\" (got 'some')"),
        ({"dataset_kwargs": 3}, "config field 'dataset_kwargs'"),
        ({"n_test": -1, "seed": 1.5}, "config field 'n_test'.*; config field 'seed'"),  # every bad field at once
    ],
)
def test_typed_validation_messages(change, message):
    """The typed validator (pydantic, hbar.training.config._TrainFields) gives one HbarInputError
    naming each bad field, with the offending value."""
    with pytest.raises(HbarInputError, match=message.replace("(", r"\(").replace(")", r"\)")
                       if ".*" not in message else message):
        TrainConfig(**{**TINY, **change})


def test_numpy_scalars_and_integral_floats_are_normalised():
    import numpy as np

    cfg = TrainConfig(**{**TINY, "epochs": np.int64(5), "lr": np.float32(0.5), "n_test": 3.0,
                         "normalize_by_dim": np.bool_(True)})
    assert (cfg.epochs, cfg.lr, cfg.n_test, cfg.normalize_by_dim) == (5, 0.5, 3, True)
    assert type(cfg.epochs) is int and type(cfg.lr) is float and type(cfg.normalize_by_dim) is bool
    assert TrainConfig(data_path="x.npy", n_train="ALL").n_train is None
    assert TrainConfig(dataset="swiss_roll").n_train == 3000
    assert cfg.replace(epochs=7).epochs == 7
    with pytest.raises(HbarInputError, match="epochs"):
        cfg.replace(epochs=0)


def test_old_config_json_loads(tmp_path):
    """A config.json written before index_col existed (n_train stored as 3000) still loads."""
    old = {"batch_size": 512, "checkpoint_every": 1000, "data_path": None, "data_seed": None, "dataset": "swiss_roll",
           "dataset_kwargs": {}, "ema_decay": 0.999, "epochs": 16000, "grad_clip": None, "lr": 0.001, "n_test": 1000,
           "n_train": 3000, "network": {"name": "paper_mlp"}, "normalize_by_dim": False, "schedule": {"name": "simple"},
           "seed": 0, "test_path": None, "weighting": "g2"}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(old))
    cfg = TrainConfig.load(p)
    assert cfg.n_train == 3000 and cfg.index_col is None and cfg.network["width"] == 128
    assert TrainConfig.from_dict(json.loads(cfg.to_json())) == cfg


# ---- image data sets and the U-Net (docs/theory.md section 13.5) ------------------------------

def test_images_preset_equals_the_toml_configs():
    import os

    from hbar.training import TrainConfig

    root = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
    for name in ("mnist5k", "fashion_mnist"):
        cfg = TrainConfig.load(os.path.join(root, f"{name}_unet.toml"))
        assert cfg == TrainConfig.images(name)
        assert cfg.network["name"] == "unet" and cfg.network["schedule"] == cfg.schedule  # filled in


def test_unet_schedule_must_match_the_training_schedule():
    import pytest

    from hbar.training import TrainConfig
    from hbar.validation import HbarInputError

    with pytest.raises(HbarInputError, match="differs from the training schedule"):
        TrainConfig.images("mnist5k", network={"name": "unet", "schedule": "simple"})
    with pytest.raises(HbarInputError, match="image data set"):
        TrainConfig.images("swiss_roll")
    with pytest.raises(HbarInputError, match="dataset_kwargs"):
        TrainConfig.images("mnist5k", dataset_kwargs={"a": 1})


def test_image_training_data_are_bin_centres(monkeypatch):
    """Training set: bin centres 2 (k + 1/2) / levels - 1 of the 'train' split; held-out: the
    test images dequantised once (within half a bin of their centres); levels from the data set."""
    import numpy as np

    import hbar.images.datasets as ds
    from hbar.images.datasets import ImageSet
    from hbar.training import TrainConfig, make_training_data
    from hbar.training.config import training_levels

    rng = np.random.default_rng(0)
    fake = {s: rng.integers(0, 256, (m, 28, 28), dtype=np.uint8) for s, m in (("train", 40), ("test", 10))}

    def load(name, split="train", n=None, seed=0, data_dir=None):
        im = fake[split] if n is None else fake[split][np.random.default_rng(seed).permutation(len(fake[split]))[:n]]
        return ImageSet(images=im, labels=np.zeros(len(im), np.int64), levels=256, name=name, split=split)

    monkeypatch.setattr(ds, "load_images", load)
    cfg = TrainConfig.images("mnist5k", batch_size=8, n_test=5)
    x, xt = make_training_data(cfg)
    np.testing.assert_array_equal(x, 2 * (fake["train"].reshape(40, 784) + 0.5) / 256 - 1)
    assert xt.shape == (5, 784) and np.all(np.abs((xt + 1) * 128 - np.floor((xt + 1) * 128) - 0.5) <= 0.5)
    assert training_levels(cfg) == 256 and training_levels(TrainConfig(dataset="swiss_roll")) is None


@pytest.mark.parametrize("field", ["seed", "data_seed"])
def test_seeds_outside_the_numpy_range_are_clear_errors(field):
    with pytest.raises(HbarInputError, match=f"'{field}'.*less than"):
        TrainConfig(dataset="swiss_roll", **{field: 2**32})
    TrainConfig(dataset="swiss_roll", **{field: 2**32 - 1_000_004})  # the largest seed whose test offset fits


def test_replacing_the_schedule_of_an_image_preset_moves_the_unets_schedule_too():
    cfg = TrainConfig.images("mnist5k").replace(schedule={"name": "cosine"})
    assert cfg.network["schedule"] == cfg.schedule and cfg.schedule["name"] == "cosine"
    with pytest.raises(HbarInputError, match="differs from the training schedule"):
        TrainConfig.images("mnist5k", network={"name": "unet", "schedule": {"name": "cosine"}})
