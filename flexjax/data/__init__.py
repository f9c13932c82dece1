"""Data for flexjax: real image datasets and video streams of drifting difficulty.

`load` returns reproducible train / val / test `Splits` of a registered
dataset (bundled MNIST sample and scikit-learn digits; full MNIST and
Fashion-MNIST installed by ``tools/setup_data.sh``; CIFAR-10 and image
folders from local directories); `batches` iterates over a `Dataset`.
`make_stream` / `load_video` film real images into clips whose nuisances
(scale, shift, rotation, blur, noise, occlusion, clutter) drift over time,
the input FlexDNN's early exits are evaluated on; `flexjax.data.video`
documents the generator. `load_clips` decodes real video clips shipped in
packages, split by clip and labelled by a reference model, through a
content-addressed cache (`flexjax.data.clips`); `flexjax.data.stills` cuts
random crops of opencv-doc's still images (unlabelled, for distilling exits);
`flexjax.data.sources` says where the data root and the cache are.

The clip names below resolve on first use: labelling clips needs the JAX
reference model, and the runtime (numpy + LiteRT only) imports this package
for the datasets without ever loading it.
"""

from __future__ import annotations

import importlib
from typing import Any

from flexjax.data.datasets import (
    DATASETS,
    FASHION_MNIST_CLASSES,
    Dataset,
    Splits,
    batches,
    load,
)
from flexjax.data.idx import IdxError, read_idx
from flexjax.data.sources import MissingSourceError, cache_root, data_root
from flexjax.data.video import (
    NUISANCES,
    VideoConfig,
    VideoStream,
    load_video,
    make_stream,
)

__all__ = [
    "CLIPS",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "NUISANCES",
    "REFERENCE_MODELS",
    "ClipConfig",
    "ClipError",
    "ClipFrames",
    "ClipSplits",
    "Dataset",
    "IdxError",
    "MissingSourceError",
    "Splits",
    "VideoConfig",
    "VideoStream",
    "batches",
    "cache_root",
    "data_root",
    "imagenet_class_names",
    "load",
    "load_clips",
    "load_video",
    "make_stream",
    "read_idx",
    "reference_predictions",
]

_CLIP_NAMES = frozenset(
    {
        "CLIPS",
        "REFERENCE_MODELS",
        "ClipConfig",
        "ClipError",
        "ClipFrames",
        "ClipSplits",
        "imagenet_class_names",
        "load_clips",
        "reference_predictions",
    }
)


def __getattr__(name: str) -> Any:
    if name not in _CLIP_NAMES:
        raise AttributeError(f"module 'flexjax.data' has no attribute {name!r}")
    return getattr(importlib.import_module("flexjax.data.clips"), name)
