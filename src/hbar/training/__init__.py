"""Denoising score matching, training configs, checkpoints and resumable training
(docs/theory.md section 3 for the loss).

Modules
-------
:mod:`hbar.training.loss`        the DSM loss w(t) ||s(alpha x0 + sigma z, t) + z/sigma||^2 and its
                                 held-out estimate;
:mod:`hbar.training.config`      :class:`TrainConfig` (validated, JSON/TOML), the training data and
                                 the optimiser it determines;
:mod:`hbar.training.checkpoint`  run directories: config.json, checkpoint.eqx, losses.csv, loading;
:mod:`hbar.training.loop`        :func:`train`: Adam + EMA in jitted chunks, bit-identical resume.
"""

from hbar.training.checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOSSES_FILE,
    check_dimension,
    checkpoint_info,
    load_checkpoint,
    load_config,
)
from hbar.training.config import TrainConfig, make_training_data
from hbar.training.loop import TrainResult, train
from hbar.training.loss import dsm_loss, dsm_per_sample, dsm_weight, heldout_loss

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
