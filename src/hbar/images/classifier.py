"""A small CNN classifier whose penultimate layer is the feature space of the sample-quality
metric (the "FID surrogate" for MNIST-like data; docs/theory.md section 13.6).

Inputs are images in hbar's model space (see :mod:`hbar.images.preprocess`): flattened
x = 2 (k + u) / levels - 1 in [-1, 1)^d, shape (n, d) with d = H W; the image shape (H, W) is a
static field of the module. Architecture (float32 parameters)::

    x (n, H W) -> (n, 1, H, W)
      -> for c in channels: [Conv 3x3 'SAME' c, ReLU, max-pool 2x2 stride 2]
      -> flatten -> Dense hidden, ReLU            = features(x), shape (n, hidden)
      -> Dense n_classes                          = logits(x)

For 28 x 28 with channels (16, 32): 28 -> 14 -> 7, 32 * 7 * 7 = 1568 -> 128 -> 10 (about 206k
parameters); for 8 x 8: 8 -> 4 -> 2. Training (:func:`train_classifier`) is Adam on the mean
cross-entropy over minibatches; images given as integer pixels (an :class:`ImageSet`) are
dequantised afresh in every batch (u ~ U[0, 1)), so the classifier sees the same continuous
inputs as a diffusion model and its samples.

:func:`load_or_train_classifier` trains once per (data set, seed, architecture, recipe) and
caches the weights (equinox leaf serialisation, the format of hbar's checkpoint.eqx) plus a
JSON record (data set, split, sizes, seed, architecture, recipe, test accuracy, wall time,
SHA-256 of the weights) in ``cache_dir/classifier-<name>-<hash>/``, written atomically
(:func:`hbar.serialization.atomic_write`); a damaged cache raises a clear error.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import Array

from hbar.serialization import atomic_write, to_jsonable
from hbar.validation import HbarInputError, check_number, check_positive_int

__all__ = ["Classifier", "train_classifier", "classifier_accuracy", "load_or_train_classifier",
           "CLASSIFIER_RECORD", "CLASSIFIER_WEIGHTS"]

CLASSIFIER_WEIGHTS = "weights.eqx"
CLASSIFIER_RECORD = "record.json"
_FORMAT = "hbar-classifier"
_VERSION = 1
_EVAL_BATCH = 500


def _as_key(key: Any) -> Array:
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return jax.random.PRNGKey(int(key))
    return key


def _check_shape(shape: Any) -> tuple[int, int]:
    try:
        h, w = shape
    except (TypeError, ValueError):
        raise HbarInputError(f"shape must be (H, W), got {shape!r}") from None
    return check_positive_int(h, "image height"), check_positive_int(w, "image width")


def _check_channels(channels: Any) -> tuple[int, ...]:
    if isinstance(channels, (int, np.integer)) or not hasattr(channels, "__iter__"):
        raise HbarInputError(f"channels must be a sequence of positive integers, got {channels!r}")
    out = tuple(check_positive_int(c, "classifier channels") for c in channels)
    if not out:
        raise HbarInputError("channels must name at least one convolution stage")
    return out


class Classifier(eqx.Module):
    """CNN classifier on flattened model-space images x (n, H W) (see the module docstring).

    ``features(x)`` (n, hidden) is the penultimate layer (after its ReLU), ``logits(x)``
    (n, n_classes), ``predict(x)`` (n,) int labels, ``predict_proba(x)`` (n, n_classes).
    These evaluate in chunks of ``batch_size`` rows (one compiled shape) and return NumPy
    arrays; :meth:`apply` is the traceable (features, logits) of one batch."""

    convs: tuple[eqx.nn.Conv2d, ...]
    hidden: eqx.nn.Linear
    head: eqx.nn.Linear
    shape: tuple[int, int] = eqx.field(static=True)
    channels: tuple[int, ...] = eqx.field(static=True)
    feature_dim: int = eqx.field(static=True)
    n_classes: int = eqx.field(static=True)

    def __init__(self, shape: tuple[int, int], n_classes: int = 10, channels: Any = (16, 32), hidden: int = 128,
                 *, key: Any):
        self.shape = _check_shape(shape)
        self.channels = _check_channels(channels)
        self.feature_dim = check_positive_int(hidden, "classifier hidden width")
        self.n_classes = check_positive_int(n_classes, "n_classes")
        if self.n_classes < 2:
            raise HbarInputError(f"a classifier needs at least 2 classes, got {self.n_classes}")
        h, w = self.shape
        for _ in self.channels:
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise HbarInputError(f"images of shape {self.shape} are too small for {len(self.channels)} 2x2 poolings")
        keys = jax.random.split(_as_key(key), len(self.channels) + 2)
        c_in = [1, *self.channels[:-1]]
        self.convs = tuple(eqx.nn.Conv2d(ci, co, 3, padding="SAME", dtype=jnp.float32, key=k)
                           for ci, co, k in zip(c_in, self.channels, keys[:-2]))
        self.hidden = eqx.nn.Linear(self.channels[-1] * h * w, self.feature_dim, dtype=jnp.float32, key=keys[-2])
        self.head = eqx.nn.Linear(self.feature_dim, self.n_classes, dtype=jnp.float32, key=keys[-1])

    @property
    def d(self) -> int:
        return self.shape[0] * self.shape[1]

    def config(self) -> dict[str, Any]:
        """The architecture as a JSON-safe dict (rebuilds the module with ``Classifier(**cfg, key=0)``)."""
        return {"shape": list(self.shape), "n_classes": self.n_classes, "channels": list(self.channels),
                "hidden": self.feature_dim}

    def apply(self, x: Array) -> tuple[Array, Array]:
        """Traceable forward pass of one batch: x (b, H W) -> (features (b, hidden), logits (b, n_classes))."""
        h = jnp.asarray(x, jnp.float32).reshape(-1, 1, *self.shape)
        for conv in self.convs:
            h = jax.nn.relu(jax.vmap(conv)(h))
            h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
        f = jax.nn.relu(jax.vmap(self.hidden)(h.reshape(h.shape[0], -1)))
        return f, jax.vmap(self.head)(f)

    def _check_x(self, x: Any) -> np.ndarray:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise HbarInputError(f"classifier input must be numeric, got dtype {arr.dtype}")
        if arr.ndim != 2 or arr.shape[1] != self.d or arr.shape[0] == 0:
            raise HbarInputError(f"classifier input must have shape (n, {self.d}) for images {self.shape}, got {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise HbarInputError("classifier input contains NaN or inf")
        return arr.astype(np.float32)

    def _chunked(self, x: Any, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        arr = self._check_x(x)
        bs = min(check_positive_int(batch_size, "batch_size"), arr.shape[0])
        feats, logits = [], []
        for i in range(0, arr.shape[0], bs):
            xb = arr[i:i + bs]
            m = xb.shape[0]
            if m < bs:  # pad to the compiled shape
                xb = np.concatenate([xb, np.zeros((bs - m, arr.shape[1]), np.float32)])
            f, lg = _apply_jit(self, xb)
            feats.append(np.asarray(f)[:m])
            logits.append(np.asarray(lg)[:m])
        return np.concatenate(feats), np.concatenate(logits)

    def features(self, x: Any, batch_size: int = _EVAL_BATCH) -> np.ndarray:
        """Penultimate-layer features, (n, H W) -> (n, hidden) float32."""
        return self._chunked(x, batch_size)[0]

    def logits(self, x: Any, batch_size: int = _EVAL_BATCH) -> np.ndarray:
        """Class logits, (n, H W) -> (n, n_classes)."""
        return self._chunked(x, batch_size)[1]

    def predict_proba(self, x: Any, batch_size: int = _EVAL_BATCH) -> np.ndarray:
        """Softmax class probabilities, (n, H W) -> (n, n_classes)."""
        lg = self.logits(x, batch_size).astype(np.float64)
        lg -= lg.max(axis=1, keepdims=True)
        p = np.exp(lg)
        return p / p.sum(axis=1, keepdims=True)

    def predict(self, x: Any, batch_size: int = _EVAL_BATCH) -> np.ndarray:
        """Predicted labels, (n, H W) -> (n,) int64."""
        return np.argmax(self.logits(x, batch_size), axis=1).astype(np.int64)


@eqx.filter_jit
def _apply_jit(model: Classifier, x: Array) -> tuple[Array, Array]:
    return model.apply(x)


def _check_labels(labels: Any, n: int, n_classes: int | None = None) -> np.ndarray:
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise HbarInputError(f"labels must have shape ({n},), got {lab.shape}")
    if lab.dtype.kind not in "iu":
        raise HbarInputError(f"labels must be integers, got dtype {lab.dtype}")
    if lab.min() < 0 or (n_classes is not None and lab.max() >= n_classes):
        top = "n_classes - 1" if n_classes is None else n_classes - 1
        raise HbarInputError(f"labels must lie in 0..{top}, got values in [{lab.min()}, {lab.max()}]")
    return lab.astype(np.int32)


def _training_inputs(data: Any, labels: Any, shape: Any,
                     levels: Any) -> tuple[np.ndarray, np.ndarray, tuple[int, int], int | None]:
    """(inputs (n, d) float32, labels (n,), shape, levels or None).

    An ImageSet (anything with ``images``, ``labels``, ``levels``) or uint8/integer images
    (n, H, W) with ``levels``: integer pixels, dequantised per batch (levels is returned).
    A float (n, d) array: model-space points used as they are (levels None)."""
    if all(hasattr(data, a) for a in ("images", "labels", "levels")):
        if labels is not None:
            raise HbarInputError("labels come with the ImageSet; do not pass them separately")
        images, labels, levels = np.asarray(data.images), data.labels, data.levels
        data = images
    arr = np.asarray(data)
    if arr.dtype.kind in "iu":
        if levels is None:
            raise HbarInputError("integer pixel images need their number of levels (levels=256 for 8-bit images)")
        from hbar.images.preprocess import _levels, _pixels  # the shared pixel checks

        lv = _levels(levels)
        if arr.ndim == 3:
            shape = arr.shape[1:] if shape is None else shape
        k = _pixels(arr, lv).astype(np.float32)
        lv_out: int | None = lv
    else:
        if arr.ndim != 2:
            raise HbarInputError(f"model-space training inputs must have shape (n, d), got {arr.shape}")
        k = arr.astype(np.float32)
        if not np.all(np.isfinite(k)):
            raise HbarInputError("training inputs contain NaN or inf")
        lv_out = None
    if shape is None:
        side = math.isqrt(k.shape[1])
        if side * side != k.shape[1]:
            raise HbarInputError(f"cannot infer a square image shape from d={k.shape[1]}: pass shape=(H, W)")
        shape = (side, side)
    shape = _check_shape(shape)
    if shape[0] * shape[1] != k.shape[1]:
        raise HbarInputError(f"images of shape {shape} have d={shape[0] * shape[1]}, the data have d={k.shape[1]}")
    if labels is None:
        raise HbarInputError("train_classifier needs labels (or an ImageSet, which carries them)")
    return k, _check_labels(labels, k.shape[0]), shape, lv_out


def train_classifier(
    data: Any,
    labels: Any = None,
    *,
    shape: tuple[int, int] | None = None,
    levels: int | None = None,
    n_classes: int | None = None,
    channels: Any = (16, 32),
    hidden: int = 128,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-3,
    key: Any = 0,
    progress: Callable[[str], None] | None = None,
) -> Classifier:
    """Train a :class:`Classifier` with Adam (optax) on the mean cross-entropy.

    Args:
        data: an ImageSet (integer pixels + labels + levels), integer images (n, H, W) or
            (n, d) with ``levels``, or model-space points x (n, d) float in [-1, 1).
            Integer pixels are dequantised afresh in every batch,
            x = 2 (k + u) / levels - 1 with u ~ U[0, 1) (:func:`hbar.images.preprocess.dequantize_jax`).
        labels: (n,) integer class labels (not with an ImageSet).
        shape: image shape (H, W); inferred from (n, H, W) images or a square d.
        levels: pixel levels of integer images (256 for 8 bits, 17 for the 8x8 digits).
        n_classes: number of classes (default max label + 1).
        channels, hidden: architecture (see the module docstring).
        epochs, batch_size, lr: the recipe: shuffled minibatches, the last partial one dropped.
        key: PRNG key or int seed (initialisation, shuffling, dequantisation).
        progress: called with a one-line message after every epoch.

    Returns:
        The trained classifier (float32 parameters).
    """
    k, lab, shape, lv = _training_inputs(data, labels, shape, levels)
    n = k.shape[0]
    n_cls = int(lab.max()) + 1 if n_classes is None else check_positive_int(n_classes, "n_classes")
    if lab.max() >= n_cls:
        raise HbarInputError(f"labels go up to {lab.max()} but n_classes={n_cls}")
    epochs = check_positive_int(epochs, "epochs")
    bs = min(check_positive_int(batch_size, "batch_size"), n)
    lr = check_number(lr, "lr", positive=True)
    key = _as_key(key)
    k_init, key = jax.random.split(key)
    model = Classifier(shape, n_cls, channels, hidden, key=k_init)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt, step = _train_step(static, lv, lr)
    opt_state = opt.init(params)
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(words, dtype=np.uint32).tolist())  # shuffling, on the host
    n_batches = n // bs
    i_step = 0
    for epoch in range(epochs):
        perm = rng.permutation(n)
        t0 = time.perf_counter()
        losses = []
        for b in range(n_batches):
            idx = perm[b * bs:(b + 1) * bs]
            params, opt_state, loss = step(params, opt_state, k[idx], lab[idx], key, i_step)
            losses.append(loss)
            i_step += 1
        if progress is not None:
            progress(f"classifier epoch {epoch + 1}/{epochs}: loss {float(jnp.mean(jnp.stack(losses))):.4f} "
                     f"({time.perf_counter() - t0:.1f} s)")
    return eqx.combine(params, static)


@functools.lru_cache(maxsize=8)
def _train_step(static: Classifier, levels: int | None, lr: float) -> tuple[Any, Callable]:
    """(optimiser, jitted Adam step) for one architecture (the parameter-free ``static`` part of
    the module, hashable), pixel levels (None: inputs are already model-space points) and
    learning rate; cached so that repeated trainings with one recipe compile once.

    step(params, opt_state, batch (b, d), labels (b,), key, i) -> (params, opt_state, mean loss); the
    dequantisation noise of step i uses ``fold_in(key, i)``."""
    import optax

    opt = optax.adam(lr)

    def loss_fn(p, xb, yb):
        _, logits = eqx.combine(p, static).apply(xb)
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    @jax.jit
    def step(p, s, kb, yb, key, i):
        xb = kb if levels is None else _dequantize(jax.random.fold_in(key, i), kb, levels)
        loss, g = jax.value_and_grad(loss_fn)(p, xb, yb)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, loss

    return opt, step


def _dequantize(key: Array, k: Array, levels: int) -> Array:
    from hbar.images.preprocess import dequantize_jax

    return dequantize_jax(key, k, levels)


def classifier_accuracy(classifier: Classifier, x: Any, labels: Any) -> float:
    """Fraction of rows of x (n, H W) whose predicted label equals ``labels`` (n,)."""
    pred = classifier.predict(x)
    return float(np.mean(pred == _check_labels(labels, pred.shape[0])))


# ---------------------------------------------------------------------------------------------
# cache


def _recipe(dataset_name: str, n_train: int | None, seed: int, channels: Any, hidden: int, epochs: int,
            batch_size: int, lr: float) -> dict[str, Any]:
    return {"format": _FORMAT, "version": _VERSION, "dataset": dataset_name, "split": "train",
            "n_train": n_train, "seed": seed, "channels": list(_check_channels(channels)),
            "hidden": check_positive_int(hidden, "classifier hidden width"),
            "epochs": check_positive_int(epochs, "epochs"), "batch_size": check_positive_int(batch_size, "batch_size"),
            "lr": check_number(lr, "lr", positive=True), "dequantised": True}


def _serialise(model: Classifier) -> bytes:
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, model)
    return buf.getvalue()


def _load_cached(folder: str, recipe: dict[str, Any]) -> tuple[Classifier, dict[str, Any]]:
    rec_path = os.path.join(folder, CLASSIFIER_RECORD)
    w_path = os.path.join(folder, CLASSIFIER_WEIGHTS)
    hint = f"delete {folder} to retrain"
    try:
        with open(rec_path, encoding="utf-8") as fh:
            record = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HbarInputError(f"damaged classifier cache: {rec_path} is unreadable ({err}); {hint}") from None
    if not isinstance(record, dict) or not isinstance(record.get("recipe"), dict) or "architecture" not in record:
        raise HbarInputError(f"damaged classifier cache: {rec_path} is not a classifier record; {hint}")
    if record["recipe"] != recipe:
        raise HbarInputError(f"classifier cache {folder} was trained with {record['recipe']}, not {recipe}; {hint}")
    if not os.path.isfile(w_path):
        raise HbarInputError(f"damaged classifier cache: {w_path} is missing; {hint}")
    with open(w_path, "rb") as fh:
        blob = fh.read()
    if hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        raise HbarInputError(f"damaged classifier cache: SHA-256 of {w_path} does not match its record; {hint}")
    arch = record["architecture"]
    try:
        like = Classifier(tuple(arch["shape"]), arch["n_classes"], tuple(arch["channels"]), arch["hidden"], key=0)
        model = eqx.tree_deserialise_leaves(io.BytesIO(blob), like)
    except Exception as err:
        raise HbarInputError(f"damaged classifier cache: {w_path} does not load ({type(err).__name__}: {err}); {hint}") from None
    return model, record


def load_or_train_classifier(
    cache_dir: str | os.PathLike,
    dataset_name: str,
    *,
    n_train: int | None = None,
    seed: int = 0,
    channels: Any = (16, 32),
    hidden: int = 128,
    epochs: int | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    progress: Callable[[str], None] | None = None,
) -> tuple[Classifier, dict[str, Any]]:
    """The classifier of a data set of :func:`hbar.images.datasets.load_images`, trained once and cached.

    Looks in ``cache_dir/classifier-<dataset_name>-<hash of the recipe>/`` for ``record.json``
    and ``weights.eqx``; when absent, trains on the ``train`` split (``n_train`` first images
    of it, default all; dequantised batches), measures the accuracy on the ``test`` split (bin
    centres) and writes both files atomically (weights first, the record last). ``epochs``
    defaults to 10 for up to 10k training images and 3 above (Fashion-MNIST: 60k).

    Returns:
        (classifier, record); the record holds the recipe (data set, split, n_train, seed,
        architecture and training settings), ``test_accuracy``, ``n_test``, ``train_seconds``,
        the weights' ``sha256`` and ``created`` (UTC).

    Raises:
        HbarInputError: a damaged cache (unreadable record, missing weights, SHA-256 mismatch),
            with the folder to delete; an unknown data set (from load_images).
    """
    from hbar.images.datasets import load_images
    from hbar.images.preprocess import to_model_space

    if not isinstance(dataset_name, str) or not dataset_name:
        raise HbarInputError(f"dataset_name must be a non-empty string, got {dataset_name!r}")
    seed = int(check_number(seed, "seed", nonnegative=True))
    if n_train is not None:
        n_train = check_positive_int(n_train, "n_train")
    train_set = None
    if epochs is None:
        train_set = load_images(dataset_name, "train", n=n_train, seed=seed)
        epochs = 10 if len(train_set.labels) <= 10_000 else 3
    recipe = _recipe(dataset_name, n_train, seed, channels, hidden, epochs, batch_size, lr)
    tag = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in dataset_name)
    folder = os.path.join(os.fspath(cache_dir), f"classifier-{safe}-{tag}")
    if os.path.isfile(os.path.join(folder, CLASSIFIER_RECORD)):
        return _load_cached(folder, recipe)
    if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
        raise HbarInputError(f"cache_dir {os.fspath(cache_dir)} exists and is not a directory")
    if train_set is None:
        train_set = load_images(dataset_name, "train", n=n_train, seed=seed)
    test_set = load_images(dataset_name, "test")
    t0 = time.perf_counter()
    model = train_classifier(train_set, channels=channels, hidden=hidden, epochs=epochs, batch_size=batch_size,
                             lr=lr, n_classes=max(int(train_set.labels.max()), int(test_set.labels.max())) + 1,
                             key=seed, progress=progress)
    train_seconds = time.perf_counter() - t0
    x_test = to_model_space(test_set.images, test_set.levels)
    acc = classifier_accuracy(model, x_test, test_set.labels)
    blob = _serialise(model)
    record = {
        "recipe": recipe,
        "architecture": model.config(),
        "n_train_images": int(len(train_set.labels)),
        "levels": int(train_set.levels),
        "test_split": "test",
        "n_test": int(len(test_set.labels)),
        "test_accuracy": acc,
        "train_seconds": train_seconds,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    atomic_write(os.path.join(folder, CLASSIFIER_WEIGHTS), blob)
    atomic_write(os.path.join(folder, CLASSIFIER_RECORD),
                 (json.dumps(to_jsonable(record), indent=2, sort_keys=True, allow_nan=False) + "\n").encode())
    if progress is not None:
        progress(f"classifier for {dataset_name}: test accuracy {acc:.4f} on {record['n_test']} images "
                 f"({train_seconds:.0f} s), cached in {folder}")
    return model, record
