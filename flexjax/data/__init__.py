"""Data for flexjax: real image datasets and video streams of drifting difficulty.

`load` returns reproducible train / val / test `Splits` of a registered
dataset (bundled MNIST sample and scikit-learn digits; CIFAR-10 and image
folders from local directories); `batches` iterates over a `Dataset`.
`make_stream` / `load_video` film real images into clips whose nuisances
(scale, shift, rotation, blur, noise, occlusion, clutter) drift over time,
the input FlexDNN's early exits are evaluated on; `flexjax.data.video`
documents the generator.
"""

from flexjax.data.datasets import DATASETS, Dataset, Splits, batches, load
from flexjax.data.video import (
    NUISANCES,
    VideoConfig,
    VideoStream,
    load_video,
    make_stream,
)

__all__ = [
    "DATASETS",
    "NUISANCES",
    "Dataset",
    "Splits",
    "VideoConfig",
    "VideoStream",
    "batches",
    "load",
    "load_video",
    "make_stream",
]
