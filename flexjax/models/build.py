"""Derives a Flax module from a `Net`.

Parameter names are a function of position only: backbone layer ``i`` owns
``params["layer_07"]``; the head of exit ``exit_3`` owns
``params["exit_3"]["layer_01"]``; branch ``b`` of a composite at position ``i``
owns ``params["layer_0i"]["branch_b"]["layer_0j"]``. Transforms and export
address parameters through these names.

The same module runs any contiguous range of backbone positions (`start`,
`stop`), which is what export segments and device/edge partitions are built
from.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from flexjax.spec import FINAL, PARAMETRIC, Layer, Net


def layer_name(position: int) -> str:
    return f"layer_{position:02d}"


# -- depthwise convolutions ----------------------------------------------------------------------
#
# XLA:CPU runs a depthwise convolution (feature_group_count == channels) through a
# generic grouped-conv kernel: measured 0.06 GFLOP/s forward on a 32x48x48x96 3x3
# layer, and its filter gradient as a full C x C convolution (EfficientNet-Lite0
# trained at 0.09x PyTorch; docs/training_profile.md). Here the same arithmetic is
# kh*kw strided slices times a per-channel weight, summed: elementwise ops XLA fuses
# (forward 11x, forward+backward 7x faster on that layer), with a closed-form
# backward (filter gradient = slice * g reduced; input gradient = interior-padded
# adds, as max_pool's). Export needs TFLite's DEPTHWISE_CONV_2D, so inside
# `export_lowering()` the layer lowers to lax.conv_general_dilated as before.

_EXPORT_LOWERING = contextvars.ContextVar("flexjax_export_lowering", default=False)


@contextlib.contextmanager
def export_lowering() -> Iterator[None]:
    """Within: layers lower to the ops TFLite converts (used while tracing for export)."""
    token = _EXPORT_LOWERING.set(True)
    try:
        yield
    finally:
        _EXPORT_LOWERING.reset(token)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):  # fmt: skip
    """`lax.conv_general_dilated`, with depthwise NHWC convolutions as fused slices.

    Only the plain depthwise case (channel multiplier 1, no dilation, default
    precision, NHWC/HWIO as Flax's nn.Conv passes them) takes the sliced form,
    and never inside `export_lowering()`. Results equal the convolution up to the
    order of float additions.
    """
    c = lhs.shape[-1]
    depthwise = (
        not _EXPORT_LOWERING.get()
        and lhs.ndim == 4 and rhs.shape[2:] == (1, c) and feature_group_count == c > 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and precision is None and preferred_element_type is None
        and dimension_numbers == jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC"))
    )  # fmt: skip
    if not depthwise:
        return jax.lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, precision=precision,
            preferred_element_type=preferred_element_type,
        )  # fmt: skip
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], window_strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _depthwise(lhs, rhs, tuple(int(s) for s in window_strides), pads)


def _depthwise_windows(xp, kh, kw, ho, wo, sh, sw):
    n, _, _, c = xp.shape
    for i in range(kh):
        for j in range(kw):
            end = (n, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c)
            yield i, j, jax.lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _depthwise_out_hw(x, w, strides, pads):
    (kh, kw), (sh, sw) = w.shape[:2], strides
    hp, wp = x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    return (hp - kh) // sh + 1, (wp - kw) // sw + 1


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise(x, w, strides, pads):
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    ho, wo = _depthwise_out_hw(x, w, strides, pads)
    out = None
    for i, j, window in _depthwise_windows(xp, *w.shape[:2], ho, wo, *strides):
        term = window * w[i, j, 0]
        out = term if out is None else out + term
    return out


def _depthwise_fwd(x, w, strides, pads):
    return _depthwise(x, w, strides, pads), (x, w)


def _depthwise_bwd(strides, pads, res, g):
    x, w = res
    (kh, kw), (sh, sw), (_, ho, wo, _) = w.shape[:2], strides, g.shape
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    hp, wp = xp.shape[1:3]
    windows = _depthwise_windows(xp, kh, kw, ho, wo, sh, sw)
    dw = jnp.stack([jnp.sum(window * g, axis=(0, 1, 2)) for _, _, window in windows])
    zero = jnp.zeros((), g.dtype)
    gp = None
    for i in range(kh):
        for j in range(kw):
            hi, wj = i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1
            config = ((0, 0, 0), (i, hp - hi, sh - 1), (j, wp - wj, sw - 1), (0, 0, 0))
            term = jax.lax.pad(g * w[i, j, 0], zero, config)
            gp = term if gp is None else gp + term
    (top, bottom), (left, right) = pads
    return gp[:, top : hp - bottom, left : wp - right, :], dw.reshape(w.shape).astype(w.dtype)


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


def _channel_window_sum(v: jax.Array, before: int, after: int) -> jax.Array:
    # sum_{k=-before..after} v[..., c + k], zero outside: pad + shifted adds (elementwise only).
    c = v.shape[-1]
    padded = jnp.pad(v, [(0, 0)] * (v.ndim - 1) + [(before, after)])
    return sum(padded[..., k : k + c] for k in range(before + after + 1))


def _lrn(x: jax.Array, layer: Layer) -> jax.Array:
    # Cross-channel LRN (AlexNet): x / (bias + alpha/size * sum_{window} x^2)^beta.
    # Written with pad + shifted adds so it lowers to elementwise ops only.
    return _lrn_vjp(x, layer["size"], layer["alpha"], layer["beta"], layer["bias"])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lrn_vjp(x, size, alpha, beta, bias):
    half = size // 2
    window = _channel_window_sum(jnp.square(x), half, size - 1 - half)
    return x / jnp.power(bias + (alpha / size) * window, beta)


def _lrn_fwd(x, size, alpha, beta, bias):
    return _lrn_vjp(x, size, alpha, beta, bias), x


def _lrn_bwd(size, alpha, beta, bias, x, g):
    # Closed form. Autodiff's transpose of the five shifted slices is an add of five
    # pads that XLA:CPU runs as large copy fusions (11% of an AlexNet step); here the
    # transposed window sum is the same pad + shifted adds as the forward.
    half = size // 2
    d = bias + (alpha / size) * _channel_window_sum(jnp.square(x), half, size - 1 - half)
    d_beta = jnp.power(d, -beta)
    back = _channel_window_sum(g * x * d_beta / d, size - 1 - half, half)
    return (g * d_beta - (2.0 * alpha * beta / size) * x * back,)


_lrn_vjp.defvjp(_lrn_fwd, _lrn_bwd)


def max_pool(x: jax.Array, window: tuple[int, int], stride: tuple[int, int], padding: str):
    """Max pooling over NHWC `x`: flax's `nn.max_pool` forward, a cheaper exact gradient.

    The forward is the same single ``reduce_window`` (what export converts).
    JAX's own gradient of it lowers on XLA:CPU to ``select_and_scatter``
    (a variadic value/index reduce-window, iotas and a scatter): 20-35% of a
    LeNet or AlexNet training step (docs/training_profile.md). This backward
    routes each output gradient to the first maximum of its window in
    row-major order -- the same element ``select_and_scatter`` picks -- with
    one strided slice, compare and interior-padded add per window offset, all
    elementwise. Non-overlapping windows give bit-identical gradients;
    overlapping ones differ only by the order of the float additions.
    """
    dims, strides = (1, *window, 1), (1, *stride, 1)
    pads = jax.lax.padtype_to_pads(x.shape, dims, strides, padding)
    return _max_pool_vjp(x, dims, strides, tuple(pads))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_vjp(x, dims, strides, pads):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, pads)


def _max_pool_fwd(x, dims, strides, pads):
    y = _max_pool_vjp(x, dims, strides, pads)
    return y, (x, y)


def _max_pool_bwd(dims, strides, pads, res, g):
    x, y = res
    xp = jnp.pad(x, pads, constant_values=-jnp.inf)
    (_, hp, wp, _), (_, ho, wo, _) = xp.shape, y.shape
    (_, kh, kw, _), (_, sh, sw, _) = dims, strides
    taken = jnp.zeros(y.shape, bool)
    gp = jnp.zeros(xp.shape, g.dtype)
    zero = jnp.zeros((), g.dtype)
    for i in range(kh):
        for j in range(kw):
            hi, wj = i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1
            window = jax.lax.slice(xp, (0, i, j, 0), (xp.shape[0], hi, wj, xp.shape[3]), strides)
            hit = (window == y) & ~taken
            taken = taken | hit
            gp = gp + jax.lax.pad(
                jnp.where(hit, g, zero),
                zero,
                ((0, 0, 0), (i, hp - hi, sh - 1), (j, wp - wj, sw - 1), (0, 0, 0)),
            )
    (top, bottom), (left, right) = pads[1], pads[2]
    return (gp[:, top : hp - bottom, left : wp - right, :],)


_max_pool_vjp.defvjp(_max_pool_fwd, _max_pool_bwd)


class _LowRankConv(nn.Module):
    layer: Layer

    @nn.compact
    def __call__(self, x):
        lay = self.layer
        x = nn.Conv(
            lay["rank"], lay["kernel"], lay["stride"], lay["padding"], use_bias=False, name="u"
        )(x)
        return nn.Conv(lay["features"], (1, 1), use_bias=lay["use_bias"], name="v")(x)


class _LowRankDense(nn.Module):
    layer: Layer

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.layer["rank"], use_bias=False, name="u")(x)
        return nn.Dense(self.layer["features"], use_bias=self.layer["use_bias"], name="v")(x)


class _Block(nn.Module):
    """A composite position (residual, inception, mbconv); branches are sub-stacks."""

    layer: Layer

    @nn.compact
    def __call__(self, x, train: bool = False):
        outs = []
        for b, branch in enumerate(self.layer.branches):
            outs.append(_Stack(branch, name=f"branch_{b}")(x, train) if branch else x)
        if self.layer.kind == "residual":
            y = outs[0] + (outs[1] if len(outs) > 1 else x)
            return nn.relu(y) if self.layer["activation"] == "relu" else y
        if self.layer.kind == "mbconv":
            return outs[0] + x if self.layer["skip"] else outs[0]
        return jnp.concatenate(outs, axis=-1)


def apply_layer(layer: Layer, x: jax.Array, *, train: bool, name: str) -> jax.Array:
    """Applies one layer; must be called inside a compact Flax method."""
    k = layer.kind
    if k == "conv":
        return nn.Conv(
            layer["features"],
            layer["kernel"],
            layer["stride"],
            layer["padding"],
            feature_group_count=layer["groups"],
            use_bias=layer["use_bias"],
            conv_general_dilated=conv_general_dilated,
            name=name,
        )(x)
    if k == "dense":
        return nn.Dense(layer["features"], use_bias=layer["use_bias"], name=name)(x)
    if k == "low_rank_conv":
        return _LowRankConv(layer, name=name)(x)
    if k == "low_rank_dense":
        return _LowRankDense(layer, name=name)(x)
    if k == "max_pool" and x.ndim == 4:
        return max_pool(x, layer["window"], layer["stride"], layer["padding"])
    if k == "max_pool":
        return nn.max_pool(x, layer["window"], layer["stride"], layer["padding"])
    if k == "avg_pool":
        return nn.avg_pool(x, layer["window"], layer["stride"], layer["padding"])
    if k == "global_pool":
        return jnp.mean(x, axis=(1, 2))
    if k == "flatten":
        return x.reshape(x.shape[0], -1)
    if k == "relu":
        return nn.relu(x)
    if k == "relu6":
        return nn.relu6(x)
    if k == "rescale":
        return x * layer["scale"] + layer["offset"]
    if k == "lrn":
        return _lrn(x, layer)
    if k == "batch_norm":
        return nn.BatchNorm(
            use_running_average=not train,
            momentum=layer["momentum"],
            epsilon=layer["epsilon"],
            name=name,
        )(x)
    if k == "dropout":
        return nn.Dropout(layer["rate"], deterministic=not train)(x)
    if k in ("residual", "inception", "mbconv"):
        return _Block(layer, name=name)(x, train)
    raise ValueError(f"no Flax implementation for layer kind '{k}'")


class _Stack(nn.Module):
    """A plain sequence of layers named ``layer_00, layer_01, ...`` (heads, branches)."""

    layers: tuple[Layer, ...]

    @nn.compact
    def __call__(self, x, train: bool = False):
        for j, layer in enumerate(self.layers):
            x = apply_layer(layer, x, train=train, name=layer_name(j))
        return x


class MultiExitModel(nn.Module):
    """The Flax module of a `Net`.

    `__call__(x, train)` returns ``{exit_name: logits}`` for every exit in
    execution order, ending with `FINAL`. With `start`/`stop` it runs only
    backbone positions ``[start, stop)`` on ``x`` (an activation when
    ``start > 0``) and returns the exits in that range plus, under the key
    ``"activation"``, the output of position ``stop - 1``.

    `freeze_backbone=True` runs the backbone in inference mode (BatchNorm
    running statistics, no dropout) and stops gradients into it, for training
    exits on a frozen, already-trained backbone.
    """

    net: Net

    @nn.compact
    def __call__(
        self,
        x,
        train: bool = False,
        *,
        start: int = 0,
        stop: int | None = None,
        heads: bool = True,
        freeze_backbone: bool = False,
    ):
        net = self.net
        stop = len(net.layers) if stop is None else stop
        backbone_train = train and not freeze_backbone
        exits = {e.after: e for e in net.exits} if heads else {}
        out: dict[str, jax.Array] = {}
        for i in range(start, stop):
            x = apply_layer(net.layers[i], x, train=backbone_train, name=layer_name(i))
            if i in exits:
                h = jax.lax.stop_gradient(x) if freeze_backbone else x
                e = exits[i]
                out[e.name] = _Stack(e.layers, name=e.name)(h, train)
        if stop == len(net.layers):
            out[FINAL] = x
        else:
            out["activation"] = x
        return out


def build(net: Net) -> MultiExitModel:
    """Returns the Flax module for `net` (see `MultiExitModel`)."""
    return MultiExitModel(net)


def init(net: Net, rng: jax.Array, batch_size: int = 1) -> dict:
    """Initializes variables (``{"params": ..., "batch_stats": ...}``) for `net`."""
    x = jnp.zeros((batch_size, *net.input_shape), jnp.float32)
    variables = build(net).init({"params": rng, "dropout": rng}, x, train=False)
    return dict(variables)


def head_apply(net: Net, variables: dict, exit_name: str, h: jax.Array) -> jax.Array:
    """Runs one exit head on the activation it hangs off (inference mode)."""
    e = net.get_exit(exit_name)
    sub = {col: tree[exit_name] for col, tree in variables.items() if exit_name in tree}
    return _Stack(e.layers).apply(sub, h, False)


def count_params(tree: dict) -> int:
    return int(sum(x.size for x in jax.tree.leaves(tree)))


def param_names(net: Net) -> Sequence[str]:
    """Top-level parameter names of `net`, in execution order."""
    names = [layer_name(i) for i, layer in enumerate(net.layers) if layer.kind in PARAMETRIC]
    return names + [e.name for e in net.exits]
