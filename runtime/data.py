"""Input sources for runtime benchmarks, named on the command line.

* ``mnist5k:test`` / ``digits:val`` / ``<dataset>:<split>``: a split of a
  registered dataset, reproduced exactly as the bundle's training run split
  it (the manifest records the data config: seed, fractions, size, channels).
* ``video:<dataset>``: the test-split video stream of drifting difficulty, with
  the bundle's video settings (`flexjax.data.video`; the training report and
  export use the same seeds, so these are frames no threshold was tuned on).
* ``npz:PATH``: arrays ``x`` [N, H, W, C] float32 in [0, 1] and ``y`` [N].

`flexjax.data` is numpy-only, so this keeps the runtime free of JAX and
TensorFlow.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from flexjax import data as data_lib

SPLITS = ("train", "val", "test")


class Frames(NamedTuple):
    x: np.ndarray  # [N, H, W, C] float32
    y: np.ndarray  # [N] int
    source: str
    kind: str  # "images" or "video"
    difficulty: np.ndarray | None = None


def _splits(name: str, data_cfg: Mapping[str, Any]):
    def opt(key):
        v = data_cfg.get(key)
        return v or None

    return data_lib.load(
        name,
        path=data_cfg.get("path", "") if name == data_cfg.get("name") else "",
        seed=int(data_cfg.get("seed", 0)),
        val_fraction=float(data_cfg.get("val_fraction", 0.1)),
        test_fraction=float(data_cfg.get("test_fraction", 0.2)),
        image_size=opt("image_size"),
        channels=opt("channels"),
        limit=opt("limit"),
    )


def load(spec: str, manifest: Mapping[str, Any], limit: int | None = None) -> Frames:
    """Loads the frames named by `spec` for a bundle with this manifest.

    Raises:
      ValueError: malformed spec, unknown dataset/split, or frames that do not
        fit the bundle's input shape.
      FileNotFoundError: a missing npz / dataset path.
    """
    kind, sep, rest = spec.partition(":")
    if not sep or not rest:
        raise ValueError(
            f"--data must look like DATASET:SPLIT, video:DATASET or npz:PATH; got {spec!r}"
        )
    data_cfg = manifest.get("data", {})
    difficulty = None
    if kind == "npz":
        try:
            with np.load(rest) as z:
                x, y = np.asarray(z["x"], np.float32), np.asarray(z["y"])
        except KeyError as e:
            raise ValueError(f"{rest} must hold arrays 'x' and 'y' ({e})") from None
        except (OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise ValueError(f"{rest} is not a readable .npz file: {e}") from None
        what = "images"
    elif kind == "video":
        v = manifest.get("video") or {}
        splits = _splits(rest, data_cfg)
        vcfg = data_lib.VideoConfig(
            num_clips=int(v.get("num_clips", 40)),
            frames_per_clip=int(v.get("frames_per_clip", 50)),
            seed=int(v.get("seed", 0)),
        )
        stream = data_lib.make_stream(splits.test, vcfg)
        x, y, difficulty, what = stream.x, stream.y, stream.difficulty, "video"
    else:
        if rest not in SPLITS:
            raise ValueError(f"unknown split {rest!r} in --data={spec}; valid: {', '.join(SPLITS)}")
        ds = getattr(_splits(kind, data_cfg), rest)
        x, y, what = ds.x, ds.y, "images"
    if limit is not None:
        x, y = x[:limit], y[:limit]
        difficulty = None if difficulty is None else difficulty[:limit]
    want = tuple(manifest["input"]["shape"][1:])
    if x.ndim != 4 or tuple(x.shape[1:]) != want or len(x) != len(y) or not len(x):
        raise ValueError(
            f"--data={spec} gives frames {x.shape} / labels {y.shape}; the bundle takes [N, "
            f"{', '.join(map(str, want))}] with one label per frame"
        )
    return Frames(np.ascontiguousarray(x, np.float32), y.astype(np.int64), spec, what, difficulty)
