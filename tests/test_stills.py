"""Random crops of opencv-doc's still images (flexjax.data.stills) and their config options."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from flexjax import config as config_lib
from flexjax.data import sources, stills


def _installed() -> bool:
    try:
        stills.still_paths()
    except sources.MissingSourceError:
        return False
    return True


needs_opencv_doc = pytest.mark.skipif(not _installed(), reason="opencv-doc not installed")


def _fake_sysroot(tmp_path, names):
    """A sysroot whose opencv-doc data directory holds `names` (40x30 flat grey images)."""
    d = tmp_path / "sysroot" / stills.STILLS_DIR.lstrip("/")
    d.mkdir(parents=True)
    for i, name in enumerate(names):
        a = np.full((30, 40, 3), 100 * i % 250, np.uint8)  # image i: grey level 100 i mod 250
        Image.fromarray(a).save(d / name)
    return tmp_path / "sysroot"


def test_exclusion_list_is_respected_on_a_controlled_directory(tmp_path, monkeypatch):
    names = ["fruits.jpg", "zebra.png", "box.png", "box_in_scene.png", "Megamind.png",
             "cup_top.jpg", "left01.jpg", "right14.jpg", "chessboard.png", "notes.png",
             "sudoku.png", "LinuxLogo.jpg", "pic3.png", "readme.txt"]  # fmt: skip
    root = _fake_sysroot(tmp_path, [n for n in names if not n.endswith(".txt")])
    (root / stills.STILLS_DIR.lstrip("/") / "readme.txt").write_text("not an image")
    monkeypatch.setenv("FLEXJAX_SYSROOT", str(root))
    used = [os.path.basename(p) for p in stills.still_paths()]
    assert used == ["fruits.jpg", "zebra.png"]
    assert stills.excluded("box.png") and stills.excluded("left01.jpg")
    assert stills.excluded("left.jpg") is None  # a room, not a calibration shot
    x = stills.load_stills(6, 16)
    assert x.shape == (6, 16, 16, 3) and x.dtype == np.uint8
    # crops alternate between the two used images (grey 0, grey 100)
    grey = x.reshape(6, -1).mean(axis=1)
    assert list(grey < 50) == [True, False] * 3 and np.all(np.abs(grey[1::2] - 100) < 5)


def test_missing_package_is_one_line_naming_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXJAX_SYSROOT", str(tmp_path / "empty"))
    monkeypatch.setenv("FLEXJAX_DATA", str(tmp_path / "data"))
    with pytest.raises(sources.MissingSourceError) as e:
        stills.load_stills(3, 32)
    msg = str(e.value)
    assert "\n" not in msg and "opencv-doc" in msg and sources.SETUP_COMMAND in msg


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"n": -1, "size": 32}, "number of crops must be an integer >= 0"),
        ({"n": 2.5, "size": 32}, "number of crops must be an integer >= 0"),
        ({"n": 2, "size": 0}, "size must be an integer >= 1"),
        ({"n": 2, "size": 32, "scale": (0.0, 1.0)}, "0 < lo <= hi <= 1"),
        ({"n": 2, "size": 32, "scale": (0.8, 0.5)}, "0 < lo <= hi <= 1"),
        ({"n": 2, "size": 32, "scale": (0.5, 1.5)}, "0 < lo <= hi <= 1"),
        ({"n": 2, "size": 32, "scale": "big"}, "scale must be two numbers"),
        ({"n": 2, "size": 32, "scale": (0.5, float("nan"))}, "0 < lo <= hi <= 1"),
    ],
)
def test_bad_arguments_are_one_line_value_errors(kwargs, words):
    with pytest.raises(ValueError) as e:
        stills.load_stills(**kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


@needs_opencv_doc
def test_real_stills_exclude_the_evaluation_clips_content_and_patterns():
    directory = os.path.dirname(stills.still_paths()[0])
    used = {os.path.basename(p) for p in stills.still_paths()}
    present = set(os.listdir(directory))
    # the box of the box test clip and the calibration shots ship there, and are not used
    for name in ("box.png", "box_in_scene.png", "chessboard.png", "left01.jpg", "sudoku.png"):
        assert name in present and name not in used
    assert {"fruits.jpg", "baboon.jpg", "squirrel_cls.jpg", "starry_night.jpg"} <= used
    assert not any(n.startswith(("box", "Megamind")) for n in used)
    assert len(used) >= 30


@needs_opencv_doc
def test_real_crops_are_deterministic_prefix_stable_and_cover_the_images():
    a = stills.load_stills(40, 48, seed=3)
    assert a.shape == (40, 48, 48, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, stills.load_stills(40, 48, seed=3))
    np.testing.assert_array_equal(a[:10], stills.load_stills(10, 48, seed=3))  # prefix
    assert not np.array_equal(a, stills.load_stills(40, 48, seed=4))
    assert len({x.tobytes() for x in a}) == 40 and a.std() > 10
    assert stills.load_stills(0, 48).shape == (0, 48, 48, 3)


@needs_opencv_doc
def test_full_scale_crop_of_a_square_image_is_that_image_maybe_mirrored():
    names = [os.path.basename(p) for p in stills.still_paths()]
    k = names.index("apple.jpg")  # 512 x 512: a scale-1 crop is the whole image
    crop = stills.load_stills(k + 1, 64, scale=(1.0, 1.0))[k].astype(int)
    with Image.open(stills.still_paths()[k]) as im:
        whole = np.asarray(im.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), int)
    err = min(np.abs(crop - whole).mean(), np.abs(crop - whole[:, ::-1]).mean())
    assert err < 1.0


@pytest.mark.parametrize(
    "schema, key",
    [(config_lib.edgent_defaults, "distill"), (config_lib.flexdnn_lite_defaults, "lite")],
)
def test_stills_option_defaults_off_and_rejects_negative_counts(schema, key):
    c = schema()
    assert c[key].stills == 0
    for bad in (-1, -5000):
        d = c.to_dict()
        d[key]["stills"] = bad
        with pytest.raises(ValueError, match=rf"{key}\.stills"):
            config_lib.validate(ml_collections.ConfigDict(d), schema)
    d = c.to_dict()
    d[key]["stills"] = 2000
    assert config_lib.validate(ml_collections.ConfigDict(d), schema)[key].stills == 2000


@needs_opencv_doc
def test_flexdnn_lite_appends_stills_to_the_train_frames_only_when_asked():
    from pipelines import flexdnn_lite

    config = config_lib.flexdnn_lite_defaults()
    config.lite.image_size = 32
    x = np.zeros((5, 32, 32, 3), np.uint8)
    assert flexdnn_lite.with_stills(config, x, print) is x
    config.lite.stills = 7
    lines = []
    y = flexdnn_lite.with_stills(config, x, lines.append)
    assert y.shape == (12, 32, 32, 3) and y.dtype == np.uint8
    np.testing.assert_array_equal(y[:5], x)
    np.testing.assert_array_equal(y[5:], stills.load_stills(7, 32))
    assert "7 crops" in lines[0]


@needs_opencv_doc
def test_edgent_distillation_frames_get_the_stills_as_one_more_group():
    from types import SimpleNamespace

    from configs import clips_lite0_edgent
    from pipelines import edgent_distill

    config = clips_lite0_edgent.get_config("smoke")
    config.distill.train_tiles = ()
    config.distill.flip = False
    config.distill.stills = 3
    size = config.distill.image_size
    train = SimpleNamespace(frames=np.zeros((2, size, size, 3), np.uint8), clip=np.array([0, 0]),
                            clips=("carphone",))  # fmt: skip
    frames, clip, counts = edgent_distill._augmented(config, SimpleNamespace(train=train))
    assert frames.shape == (5, size, size, 3) and list(clip) == [0, 0, 1, 1, 1]
    assert counts == {"carphone": 2, "stills": 3}
    np.testing.assert_array_equal(frames[2:], stills.load_stills(3, size))
    config.distill.stills = -1
    with pytest.raises(ValueError, match="distill.stills must be an integer >= 0"):
        edgent_distill.check(config)
