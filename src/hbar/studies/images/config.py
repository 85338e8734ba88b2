"""Sizes of the image noise study (docs/theory.md section 13.7)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hbar.serialization import to_jsonable
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["ImageStudyConfig"]


@dataclasses.dataclass(frozen=True)
class ImageStudyConfig:
    """Every size of the image study.

    One model (a U-Net score, docs/theory.md section 13.4) is trained on ``dataset`` with the
    training config ``train`` (a dict of :class:`hbar.training.TrainConfig` fields; ``None``:
    the data set's image preset). Likelihoods: NLL0 (bits/dim) and the one-loop C1 with its
    standard error on ``n_nll`` test images (``probes`` fluctuation samples per image on the
    log-SNR grids of the step ladder ``ol_steps``, whose last two levels give the discretisation
    estimate; probability-flow solves at rtol = atol = ``nll_tol``).
    Samples: ``n_samples`` images at every h in ``h_values`` (Euler-Maruyama, ``sample_steps``
    steps; h = 0 is the probability-flow ODE with the same steps), scored by the feature
    Frechet distance of a classifier trained on the same data (``n_fd`` test images as the
    reference), its predicted-class histogram, and exact W2 on pixels with ``n_w2`` images.
    """

    name: str = "full"
    dataset: str = "mnist5k"
    train: dict[str, Any] | None = None
    n_nll: int = 24
    nll_tol: float = 1e-4
    probes: int = 4
    ol_steps: tuple[int, ...] = (8, 16)
    h_values: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0)
    n_samples: int = 500
    sample_steps: int = 100
    sample_batch: int = 250
    n_w2: int = 250
    n_fd_reference: int = 500
    classifier_epochs: int = 8
    grid_images: int = 64
    baseline_components: int | str = "cv"

    def __post_init__(self) -> None:
        for f in ("n_nll", "probes", "n_samples", "sample_steps", "sample_batch", "n_w2",
                  "n_fd_reference", "classifier_epochs", "grid_images"):
            check_positive_int(getattr(self, f), f)
        if (not isinstance(self.ol_steps, tuple) or not self.ol_steps
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in self.ol_steps)
                or any(b % a or b == a for a, b in zip(self.ol_steps, self.ol_steps[1:]))):
            raise HbarInputError(f"ol_steps must be a tuple of positive integers, each a multiple (> 1) of the one "
                                 f"before (a step ladder), got {self.ol_steps!r}")
        if not self.h_values or any((not isinstance(h, (int, float))) or h < 0 or h != h for h in self.h_values):
            raise HbarInputError(f"h_values must be a non-empty tuple of numbers >= 0, got {self.h_values!r}")
        if self.n_w2 > self.n_samples or self.n_w2 > self.n_fd_reference:
            raise HbarInputError(f"n_w2 = {self.n_w2} must not exceed n_samples = {self.n_samples} "
                                 f"nor n_fd_reference = {self.n_fd_reference}")

    @classmethod
    def full(cls, dataset: str = "mnist5k") -> ImageStudyConfig:
        return cls(name="full", dataset=dataset)

    @classmethod
    def quick(cls) -> ImageStudyConfig:
        """About a minute on 2 cores: 8x8 digits, a small U-Net, short training (tests, smoke runs)."""
        return cls(name="quick", dataset="digits8x8",
                   train={"epochs": 30, "network": {"name": "unet", "base_channels": 8, "channel_mults": [1, 2],
                                                     "blocks": 1, "groups": 4, "embed_dim": 16, "dtype": "float32"}},
                   n_nll=8, probes=2, ol_steps=(4, 8), n_samples=64, sample_steps=32, sample_batch=64, n_w2=32,
                   n_fd_reference=64, classifier_epochs=3, grid_images=16)

    def to_dict(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self))
