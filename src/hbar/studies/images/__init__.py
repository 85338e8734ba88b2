"""The image noise study (docs/theory.md section 13.7): for one U-Net score trained on an image
data set (MNIST-5k, Fashion-MNIST or the 8x8 digits), NLL0 in bits/dim against the closed-form
Gaussian (PCA) baseline, the one-loop C1 per image with its standard error and the WKB-1 line,
and sample quality (feature Frechet distance, class histogram, pixel W2) at several h: does the
sign of C1 predict which h gives better samples and likelihood?

Modules: ``config`` (:class:`ImageStudyConfig`), ``experiments`` (stage functions), ``plots``,
``report``, ``pipeline`` (:func:`run_images`). Stages are cached under ``out_dir/stages`` and a
rerun resumes (:mod:`hbar.studies.stages`). Importing this package changes no global state.
"""

from .config import ImageStudyConfig
from .pipeline import run_images

__all__ = ["ImageStudyConfig", "run_images"]
