"""MCDNN's catalog on the pretrained EfficientNet-Lite family, measured on the real clips.

  python -m train.lite_catalog --config=configs/clips_lite_catalog.py --workdir=runs/lite_catalog
  python -m train.lite_catalog --config=configs/clips_lite_catalog.py:smoke --workdir=/tmp/lc

Variants (issue 15, item 1: the "input resolution" and "low-bit weights" axes):
``efficientnet_lite0`` at 224 / 192 / 176 / 160 / 128 px, each with

* ``fp32``, ``fp16``, ``dynamic``, ``int8``: the TFLite converter's own modes
  (`export.convert.PRECISIONS`; ``dynamic`` = int8 weights, float activations;
  ``int8`` = integer weights and activations, activation ranges calibrated on
  64 training-clip frames, float input/output);
* ``mixed4``: litert-quantizer (`export.quantize`): 4-bit weights in blocks of
  32 for the classifier (``FULLY_CONNECTED``, 27% of Lite0's weights; the only
  op 0.11.0 quantizes blockwise) and 8-bit per-channel weights for the 1x1 /
  3x3 and depthwise convolutions, all "dynamic" (integer kernels, float
  activations);
* ``int4_conv`` (Lite0 at 224 px only, an ``extras`` entry): 4-bit per-channel
  weights for every ``CONV_2D`` as well, which the quantizer accepts. The
  model collapses (0% agreement), and not because of LiteRT: the same 4-bit
  weights stored weight-only give exactly the top-1 of the fp32 file with the
  dequantized weights written back as floats
  (`export.quantize.dequantized_float_model`, BENCHMARKS.md). Min-max 4-bit
  post-training weights on the BN-folded convolutions need quantization-aware
  fine-tuning; it stays in the catalog as a measured negative result;

plus ``efficientnet_lite1`` / ``lite2`` in fp32 at their native 240 / 260 px.
The original every ratio is against is Lite0, fp32, 224 px.

Data: the test clips (box, megamind at 5 fps: 133 frames) labelled by
EfficientNet-Lite2 at 260 px (`flexjax.data.clips`; "accuracy" is agreement
with that reference). Frames are decoded at 224 / 240 / 260 px (the clip
cache); a variant at another size gets the frames of the smallest decoded
size above it, resized (Pillow bilinear, antialiased).
"""

import ml_collections

from flexjax.config import lite_catalog_defaults

# litert-quantizer recipes: one rule per TFLite op type (export.quantize).
MIXED4 = [
    {"op": "FULLY_CONNECTED", "bits": 4, "granularity": "blockwise_32", "mode": "dynamic"},
    {"op": "CONV_2D", "bits": 8, "granularity": "channelwise", "mode": "dynamic"},
    {"op": "DEPTHWISE_CONV_2D", "bits": 8, "granularity": "channelwise", "mode": "dynamic"},
]
# 4-bit CONV_2D weights too: accepted and run faithfully, but the accuracy collapses.
INT4_CONV = [
    {"op": "FULLY_CONNECTED", "bits": 4, "granularity": "blockwise_32", "mode": "dynamic"},
    {"op": "CONV_2D", "bits": 4, "granularity": "channelwise", "mode": "dynamic"},
]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = lite_catalog_defaults()
    c.models = ("efficientnet_lite0",)
    c.resolutions = (224, 192, 176, 160, 128)
    c.weights = ("fp32", "fp16", "dynamic", "int8", "mixed4")
    c.originals = ("efficientnet_lite1", "efficientnet_lite2")
    c.recipes = [{"name": "mixed4", "rules": MIXED4}, {"name": "int4_conv", "rules": INT4_CONV}]
    c.extras = [{"model": "efficientnet_lite0", "resolution": 224, "weights": "int4_conv"}]
    c.clips.decode_resolutions = (224, 240, 260)
    c.calibration_frames = 64
    c.bench.rounds = 3
    c.bench.frames = 20
    if arg == "smoke":
        # A few tiny frames labelled by Lite0 itself at 64 px: the whole pipeline in seconds.
        c.resolutions = (64,)
        c.weights = ("fp32", "int8", "mixed4")
        c.originals = ()
        c.extras = []
        c.original.resolution = 64
        c.clips.train = "bikes"
        c.clips.test = "carphone"
        c.clips.max_frames = 4
        c.clips.decode_resolutions = (64,)
        c.clips.reference = "efficientnet_lite0"
        c.clips.reference_resolution = 64
        c.calibration_frames = 4
        c.bench.rounds = 1
        c.bench.frames = 2
        c.bench.warmup = 1
        c.bench.load_repeats = 1
    elif arg:
        raise ValueError(f"unknown config argument {arg!r}; valid: smoke")
    return c
