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
