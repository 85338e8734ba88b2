"""Image models (issue 10, docs/theory.md section 13): data sets read offline, preprocessing
to the [-1, 1) model space with uniform dequantisation, bits/dim, and the closed-form
Gaussian (PCA) baseline; sample quality (section 13.6): a small CNN classifier trained once
and cached, feature Fréchet distance, pixel W2, and PNG image grids.

Not imported by ``import hbar``: use ``import hbar.images`` (or its submodules). The
submodules imported here load NumPy only (JAX on first use), except ``classifier``, which
imports JAX and equinox at load time as ``import hbar`` itself does; matplotlib is loaded
only when a grid is written.
"""

from hbar.images import classifier, datasets, gaussian_baseline, grid, idx, preprocess, quality
from hbar.images.classifier import Classifier, load_or_train_classifier, train_classifier
from hbar.images.datasets import ImageSet, dataset_info, load_images
from hbar.images.gaussian_baseline import GaussianBaseline, image_baseline, select_k
from hbar.images.grid import save_image_grid, tile_images
from hbar.images.idx import read_idx, write_idx
from hbar.images.preprocess import bits_per_dim, dequantize_jax, from_model_space, to_model_space
from hbar.images.quality import QualityResult, feature_frechet_distance, sample_quality

__all__ = [
    "datasets", "gaussian_baseline", "idx", "preprocess",
    "ImageSet", "load_images", "dataset_info", "read_idx", "write_idx",
    "to_model_space", "from_model_space", "bits_per_dim", "dequantize_jax",
    "GaussianBaseline", "image_baseline", "select_k",
    "classifier", "quality", "grid", "Classifier", "train_classifier", "load_or_train_classifier",
    "feature_frechet_distance", "sample_quality", "QualityResult", "save_image_grid", "tile_images",
]
