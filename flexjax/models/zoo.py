"""The model zoo: named `Net` builders.

Every builder returns a `Net` (data, not code), takes the input shape and
number of classes, and a `width` multiplier so the paper-size networks can be
trained on a CPU. Side exits are BranchyNet-style heads (conv + dense) at the
positions the papers use; FlexDNN (later) replaces them with searched heads.

Deviations from the original papers, all for on-phone export (GPU delegate):
pooling inside inception blocks is max pooling (SAME average pooling lowers to
an op the TFLite GPU delegate does not support), and every network keeps
static shapes.

The EfficientNet-Lite family is the exception to "trained on a CPU": its specs
match the published ImageNet weights exactly (`flexjax.models.pretrained`
loads them), one MBConv block per position.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

from flexjax.spec import (
    Exit,
    Layer,
    Net,
    batch_norm,
    conv,
    dense,
    dropout,
    flatten,
    global_pool,
    inception,
    lrn,
    max_pool,
    mbconv,
    relu,
    relu6,
    rescale,
    residual,
)


def _w(base: int, width: float) -> int:
    return max(1, int(round(base * width)))


def branchy_head(
    in_shape: tuple[int, ...], num_classes: int, features: int = 32
) -> tuple[Layer, ...]:
    """A BranchyNet-style exit: conv 3x3 (+ pooling on large maps), relu, dense."""
    if len(in_shape) == 1:
        return (dense(num_classes),)
    h = in_shape[0]
    layers = [conv(features, 3, stride=2 if h > 16 else 1)]
    if h > 4:
        layers.append(max_pool(2, padding="SAME"))
    layers += [relu(), flatten(), dense(num_classes)]
    return tuple(layers)


def _attach(
    layers: Sequence[Layer],
    input_shape,
    num_classes: int,
    positions: Sequence[int],
    name: str,
    head_features: int = 32,
) -> Net:
    backbone = Net(tuple(input_shape), num_classes, tuple(layers), (), name)
    shapes = backbone.shapes()
    exits = tuple(
        Exit(p, branchy_head(shapes[p][1], num_classes, head_features)) for p in sorted(positions)
    )
    return backbone.replace(exits=exits)


def _default_positions(layers: Sequence[Layer], fractions: Sequence[float]) -> list[int]:
    """Block boundaries (after relu / pool / composite) closest to depth fractions."""
    candidates = [
        i
        for i, layer in enumerate(layers[:-1])
        if layer.kind in ("relu", "max_pool", "residual", "inception")
    ]
    picked: list[int] = []
    for f in fractions:
        target = f * (len(layers) - 1)
        best = min(candidates, key=lambda i: abs(i - target))
        if best not in picked:
            picked.append(best)
    return sorted(picked)


def lenet_branchy(
    input_shape=(28, 28, 1),
    num_classes: int = 10,
    width: float = 1.0,
    exits: Sequence[int] | None = None,
) -> Net:
    """BranchyNet's LeNet (MNIST): one side exit after the first conv block."""
    layers = [
        conv(_w(20, width), 5, padding="VALID"),
        max_pool(2),
        relu(),
        conv(_w(50, width), 5, padding="VALID"),
        max_pool(2),
        relu(),
        flatten(),
        dense(_w(500, width)),
        relu(),
        dropout(0.3),
        dense(num_classes),
    ]
    backbone = Net(tuple(input_shape), num_classes, tuple(layers), (), "lenet_branchy")
    positions = [2] if exits is None else exits
    shapes = backbone.shapes()
    heads = []
    for p in positions:
        shape = shapes[p][1]
        if len(shape) == 3 and p == 2:
            # BranchyNet's LeNet branch: conv 3x3, pool, relu, linear.
            heads.append(
                Exit(
                    p,
                    (
                        conv(_w(10, width), 3),
                        max_pool(2, padding="SAME"),
                        relu(),
                        flatten(),
                        dense(num_classes),
                    ),
                )
            )
        else:
            heads.append(Exit(p, branchy_head(shape, num_classes, _w(16, width))))
    return backbone.replace(exits=tuple(heads))


def alexnet_branchy(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    width: float = 1.0,
    use_lrn: bool = True,
    exits: Sequence[int] | None = None,
) -> Net:
    """Edgent's BranchyNet AlexNet (CIFAR-10 layout) with five exit points.

    Edgent trains "AlexNet with five exit points": four side exits, after
    conv1, conv2, conv3 and conv4 blocks, plus the full network's classifier
    (exit point 5, `FINAL`). Also builds at 28x28x1 for MNIST.
    """
    norm = [lrn()] if use_lrn else []
    layers = (
        [conv(_w(64, width), 5), relu(), max_pool(3, 2, "SAME")]
        + norm
        + [conv(_w(192, width), 5), relu(), max_pool(3, 2, "SAME")]
        + norm
        + [
            conv(_w(384, width), 3),
            relu(),
            conv(_w(256, width), 3),
            relu(),
            conv(_w(256, width), 3),
            relu(),
            max_pool(3, 2, "SAME"),
            flatten(),
            dense(_w(384, width)),
            relu(),
            dropout(0.5),
            dense(_w(192, width)),
            relu(),
            dropout(0.5),
            dense(num_classes),
        ]
    )
    if exits is None:
        # Outputs of block 1 and 2 (after pool/LRN), conv3 and conv4 (after relu).
        b1 = 3 if use_lrn else 2
        b2 = b1 + 4 if use_lrn else b1 + 3
        exits = [b1, b2, b2 + 2, b2 + 4]
    return _attach(
        layers,
        input_shape,
        num_classes,
        exits,
        "alexnet_branchy",
        _w(32, width) if width < 1 else 32,
    )


def _conv_bn(features: int, kernel: Any = 3, stride: Any = 1) -> list[Layer]:
    return [conv(features, kernel, stride, use_bias=False), batch_norm(), relu()]


def vgg16(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    width: float = 1.0,
    exits: Sequence[int] | None = None,
    dense_features: int = 512,
) -> Net:
    """VGG-16 (13 conv + classifier), BN after every conv; one position per op.

    Default side exits: BranchyNet-style heads at about 1/3 and 2/3 of the depth.
    """
    layers: list[Layer] = []
    for features, n in [(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)]:
        for _ in range(n):
            layers += _conv_bn(_w(features, width))
        layers.append(max_pool(2, padding="SAME"))
    layers += [
        flatten(),
        dense(_w(dense_features, width)),
        relu(),
        dropout(0.5),
        dense(num_classes),
    ]
    positions = _default_positions(layers, (1 / 3, 2 / 3)) if exits is None else exits
    return _attach(layers, input_shape, num_classes, positions, "vgg16")


def _inception_a(width: float, pool_features: int) -> Layer:
    return inception(
        _conv_bn(_w(64, width), 1),
        _conv_bn(_w(48, width), 1) + _conv_bn(_w(64, width), 5),
        _conv_bn(_w(64, width), 1) + _conv_bn(_w(96, width), 3) + _conv_bn(_w(96, width), 3),
        [max_pool(3, 1, "SAME")] + _conv_bn(_w(pool_features, width), 1),
    )


def _reduction_b(width: float) -> Layer:
    return inception(
        _conv_bn(_w(384, width), 3, 2),
        _conv_bn(_w(64, width), 1) + _conv_bn(_w(96, width), 3) + _conv_bn(_w(96, width), 3, 2),
        [max_pool(3, 2, "SAME")],
    )


def _inception_c(width: float, c7: int, k: int) -> Layer:
    return inception(
        _conv_bn(_w(192, width), 1),
        _conv_bn(_w(c7, width), 1)
        + _conv_bn(_w(c7, width), (1, k))
        + _conv_bn(_w(192, width), (k, 1)),
        _conv_bn(_w(c7, width), 1)
        + _conv_bn(_w(c7, width), (k, 1))
        + _conv_bn(_w(c7, width), (1, k))
        + _conv_bn(_w(c7, width), (k, 1))
        + _conv_bn(_w(192, width), (1, k)),
        [max_pool(3, 1, "SAME")] + _conv_bn(_w(192, width), 1),
    )


def _reduction_d(width: float) -> Layer:
    return inception(
        _conv_bn(_w(192, width), 1) + _conv_bn(_w(320, width), 3, 2),
        _conv_bn(_w(192, width), 1)
        + _conv_bn(_w(192, width), (1, 7))
        + _conv_bn(_w(192, width), (7, 1))
        + _conv_bn(_w(192, width), 3, 2),
        [max_pool(3, 2, "SAME")],
    )


def _inception_e(width: float) -> Layer:
    return inception(
        _conv_bn(_w(320, width), 1),
        _conv_bn(_w(384, width), 1) + _conv_bn(_w(384, width), (1, 3)),
        _conv_bn(_w(384, width), 1) + _conv_bn(_w(384, width), (3, 1)),
        _conv_bn(_w(448, width), 1)
        + _conv_bn(_w(384, width), 3)
        + _conv_bn(_w(384, width), (1, 3)),
        [max_pool(3, 1, "SAME")] + _conv_bn(_w(192, width), 1),
    )


def inception_v3(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    width: float = 1.0,
    exits: Sequence[int] | None = None,
) -> Net:
    """Inception-V3 at small resolution: stem, 3xA, B, 4xC, D, 2xE, classifier.

    Every inception block is ONE position. The stem keeps stride 1 (the
    original's stride-2 stem is meant for 299x299 inputs); the 7x1/1x7
    factorized convolutions and the E block's split 1x3/3x1 are kept (E's
    split branches are four parallel branches here).
    """
    layers: list[Layer] = (
        _conv_bn(_w(32, width), 3)
        + _conv_bn(_w(32, width), 3)
        + _conv_bn(_w(64, width), 3)
        + [max_pool(3, 2, "SAME")]
    )
    layers += [
        _inception_a(width, 32),
        _inception_a(width, 64),
        _inception_a(width, 64),
        _reduction_b(width),
    ]
    layers += [_inception_c(width, c7, 7) for c7 in (128, 160, 160, 192)]
    layers += [
        _reduction_d(width),
        _inception_e(width),
        _inception_e(width),
        global_pool(),
        dropout(0.2),
        dense(num_classes),
    ]
    positions = _default_positions(layers, (1 / 3, 2 / 3)) if exits is None else exits
    return _attach(layers, input_shape, num_classes, positions, "inception_v3")


def resnet(
    input_shape=(32, 32, 3),
    num_classes: int = 10,
    depth: int = 20,
    width: float = 1.0,
    exits: Sequence[int] | None = None,
) -> Net:
    """CIFAR ResNet (depth = 6n + 2; 110 is BranchyNet's ResNet-110)."""
    if (depth - 2) % 6:
        raise ValueError(f"resnet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    layers: list[Layer] = _conv_bn(_w(16, width), 3)
    in_features = _w(16, width)
    for stage, base in enumerate((16, 32, 64)):
        features = _w(base, width)
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            body = [
                conv(features, 3, stride, use_bias=False),
                batch_norm(),
                relu(),
                conv(features, 3, use_bias=False),
                batch_norm(),
            ]
            short = (
                [conv(features, 1, stride, use_bias=False), batch_norm()]
                if stride != 1 or features != in_features
                else []
            )
            layers.append(residual(body, short))
            in_features = features
    layers += [global_pool(), dense(num_classes)]
    positions = _default_positions(layers, (1 / 3, 2 / 3)) if exits is None else exits
    return _attach(layers, input_shape, num_classes, positions, f"resnet{depth}")


# EfficientNet-B0's stages: (repeats, kernel, stride, expansion ratio, output filters).
_EFFICIENTNET_B0_STAGES = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


@dataclasses.dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite scaling: multipliers, native resolution, classifier dropout."""

    width: float
    depth: float
    resolution: int
    dropout: float


EFFICIENTNET_LITE: dict[str, LiteVariant] = {
    "efficientnet_lite0": LiteVariant(1.0, 1.0, 224, 0.2),
    "efficientnet_lite1": LiteVariant(1.0, 1.1, 240, 0.2),
    "efficientnet_lite2": LiteVariant(1.1, 1.2, 260, 0.3),
}
# The Lite models take (x - 127) / 128 for pixels x in 0..255; flexjax feeds [0, 1].
LITE_INPUT_SCALE = 255.0 / 128.0
LITE_INPUT_OFFSET = -127.0 / 128.0
# Total stride of the network: smaller inputs leave nothing for the last stage.
_LITE_MIN_SIZE = 32


def _round_filters(filters: int, width: float, divisor: int = 8) -> int:
    # EfficientNet's rounding (tensorflow/tpu efficientnet_model.round_filters).
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


def _bn_lite() -> Layer:
    # TF's EfficientNet: momentum 0.99, epsilon 1e-3.
    return batch_norm(momentum=0.99, epsilon=1e-3)


def _mbconv_lite(in_f: int, out_f: int, expand: int, kernel: int, stride: int) -> Layer:
    mid = in_f * expand
    body: list[Layer] = []
    if expand != 1:
        body += [conv(mid, 1, use_bias=False), _bn_lite(), relu6()]
    body += [
        conv(mid, kernel, stride, groups=mid, use_bias=False),
        _bn_lite(),
        relu6(),
        conv(out_f, 1, use_bias=False),
        _bn_lite(),
    ]
    return mbconv(body, skip=stride == 1 and in_f == out_f)


def lite_head(
    in_shape: tuple[int, ...], num_classes: int, features: int = 256
) -> tuple[Layer, ...]:
    """An exit for EfficientNet-Lite: 1x1 conv, BN, ReLU6, global pooling, dense."""
    if len(in_shape) == 1:
        return (dense(num_classes),)
    return (
        conv(features, 1, use_bias=False),
        _bn_lite(),
        relu6(),
        global_pool(),
        dense(num_classes),
    )


def efficientnet_lite(
    name: str,
    input_shape: Sequence[int] | None = None,
    num_classes: int = 1000,
    image_size: int | None = None,
    exits: Sequence[int] = (),
    head_features: int = 256,
) -> Net:
    """EfficientNet-Lite0/1/2 (Tan & Le 2019; the "lite" edge variants).

    Lite drops squeeze-excite, uses ReLU6, keeps the stem (32) and head (1280)
    widths and the first and last stages' repeats fixed, and scales the rest
    with the variant's width and depth multipliers. Layout:

    position 0: ``rescale`` ([0, 1] images to the original's (x*255 - 127) / 128),
    1-3: stem conv 3x3/2, BN, ReLU6; then ONE position per MBConv block
    (exits and partition cuts address block boundaries); then head conv 1x1,
    BN, ReLU6, global pooling, dropout, dense logits.

    Args:
      name: a key of `EFFICIENTNET_LITE`.
      input_shape: (H, W, 3); default: the variant's native square resolution.
      num_classes: 1000 for the ImageNet weights.
      image_size: shorthand for ``input_shape=(image_size, image_size, 3)``.
      exits: backbone positions to hang `lite_head` exits off (default: none).
      head_features: width of those exits' 1x1 conv.

    Raises:
      ValueError: unknown variant, input that is not RGB, smaller than 32 px
        or contradicting `image_size`.
    """
    if name not in EFFICIENTNET_LITE:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; valid: {', '.join(EFFICIENTNET_LITE)}"
        )
    v = EFFICIENTNET_LITE[name]
    if image_size is not None:
        shape = (int(image_size), int(image_size), 3)
        if input_shape is not None and tuple(input_shape) != shape:
            raise ValueError(
                f"{name}: image_size={image_size} contradicts input_shape={tuple(input_shape)}"
            )
    else:
        shape = tuple(input_shape) if input_shape is not None else (v.resolution, v.resolution, 3)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(f"{name}: expects RGB input (H, W, 3), got input_shape={shape}")
    if min(shape[:2]) < _LITE_MIN_SIZE:
        raise ValueError(
            f"{name}: input {shape[0]}x{shape[1]} is too small; "
            f"use at least {_LITE_MIN_SIZE} px (native: {v.resolution})"
        )
    layers: list[Layer] = [
        rescale(LITE_INPUT_SCALE, LITE_INPUT_OFFSET),
        conv(32, 3, 2, use_bias=False),
        _bn_lite(),
        relu6(),
    ]
    in_f = 32
    last = len(_EFFICIENTNET_B0_STAGES) - 1
    for i, (repeats, kernel, stride, expand, out) in enumerate(_EFFICIENTNET_B0_STAGES):
        out_f = _round_filters(out, v.width)
        n = repeats if i in (0, last) else int(math.ceil(v.depth * repeats))
        for b in range(n):
            layers.append(_mbconv_lite(in_f, out_f, expand, kernel, stride if b == 0 else 1))
            in_f = out_f
    layers += [
        conv(1280, 1, use_bias=False),
        _bn_lite(),
        relu6(),
        global_pool(),
        dropout(v.dropout),
        dense(num_classes),
    ]
    backbone = Net(shape, num_classes, tuple(layers), (), name)
    shapes = backbone.shapes()
    heads = []
    for p in sorted(exits):
        if not 0 <= p < len(layers) - 1:
            raise ValueError(f"{name}: exit position {p} is out of range 0..{len(layers) - 2}")
        heads.append(Exit(p, lite_head(shapes[p][1], num_classes, head_features)))
    return backbone.replace(exits=tuple(heads))


def _lite(name: str) -> Callable[..., Net]:
    def builder(
        input_shape: Sequence[int] | None = None,
        num_classes: int = 1000,
        image_size: int | None = None,
        exits: Sequence[int] = (),
        head_features: int = 256,
    ) -> Net:
        return efficientnet_lite(name, input_shape, num_classes, image_size, exits, head_features)

    builder.__name__ = name
    builder.__doc__ = (
        f"{name} (see `efficientnet_lite`; native {EFFICIENTNET_LITE[name].resolution} px)."
    )
    return builder


efficientnet_lite0 = _lite("efficientnet_lite0")
efficientnet_lite1 = _lite("efficientnet_lite1")
efficientnet_lite2 = _lite("efficientnet_lite2")


MODELS: dict[str, Callable[..., Net]] = {
    "alexnet_branchy": alexnet_branchy,
    "efficientnet_lite0": efficientnet_lite0,
    "efficientnet_lite1": efficientnet_lite1,
    "efficientnet_lite2": efficientnet_lite2,
    "inception_v3": inception_v3,
    "lenet_branchy": lenet_branchy,
    "resnet": resnet,
    "vgg16": vgg16,
}


def get_model(name: str, **kwargs: Any) -> Net:
    """Builds a registered network by name.

    Raises:
      ValueError: unknown name (the message lists the registered ones) or bad
        keyword arguments for that builder.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; valid: {', '.join(sorted(MODELS))}")
    try:
        return MODELS[name](**kwargs)
    except TypeError as e:
        raise ValueError(f"bad arguments for model '{name}': {e}") from None


__all__ = [
    "EFFICIENTNET_LITE",
    "MODELS",
    "LiteVariant",
    "branchy_head",
    "efficientnet_lite",
    "get_model",
    "lite_head",
    *sorted(MODELS),
]
