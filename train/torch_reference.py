"""A PyTorch build of a flexjax `Net` and of its training step, for benchmarks only.

`python -m train.throughput_vs_torch` times flexjax's training step against
this one in one interleaved run. Nothing else imports this module, and the
default install does not need torch: it comes with the optional ``bench``
extra (``pip install -e .[train,bench]``).

The PyTorch net is derived from the same `Net` spec as the Flax module
(`TorchNet`), takes the same NHWC images, and gets flexjax's weights copied in
(`load_flax_variables`), so at the same weights the two produce the same
logits (`max_logit_difference`, float32, about 1e-6). The training step
(`TorchTrainer`) uses the same loss (BranchyNet's weighted sum of the exits'
mean cross-entropies, `flexjax.training.exit_weights`), the same optimizer and
schedule (`train.optimizer`, `learning_rate`, cosine decay, weight decay,
Nesterov momentum), the same random shift augmentation and the same batches in
the same order (`flexjax.data.batches`). Dropout masks and augmentation offsets
come from torch's generator, so the two runs are statistically, not bitwise,
the same.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from flexjax.spec import FINAL, Layer, Net, infer_shapes


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int | np.integer) else (int(v[0]), int(v[1]))


def _same_pads(size: int, k: int, s: int) -> tuple[int, int]:
    # XLA's SAME: total = max((ceil(n/s) - 1) * s + k - n, 0), the extra pixel at the end.
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


class _Conv(nn.Module):
    def __init__(self, layer: Layer, in_channels: int):
        super().__init__()
        self.k, self.s = _pair(layer["kernel"]), _pair(layer["stride"])
        self.same = layer["padding"] == "SAME"
        self.conv = nn.Conv2d(
            in_channels,
            layer["features"],
            self.k,
            self.s,
            groups=layer["groups"],
            bias=layer["use_bias"],
        )

    def forward(self, x):
        if self.same:
            (t, b), (lft, r) = (
                _same_pads(x.shape[2], self.k[0], self.s[0]),
                _same_pads(x.shape[3], self.k[1], self.s[1]),
            )
            if t == b and lft == r:
                return F.conv2d(
                    x,
                    self.conv.weight,
                    self.conv.bias,
                    self.s,
                    (t, lft),
                    groups=self.conv.groups,
                )
            x = F.pad(x, (lft, r, t, b))
        return self.conv(x)


class _Pool(nn.Module):
    def __init__(self, layer: Layer):
        super().__init__()
        self.kind = layer.kind
        self.k = _pair(layer["window"])
        self.s = _pair(layer["stride"] if layer["stride"] is not None else layer["window"])
        self.same = layer["padding"] == "SAME"

    def forward(self, x):
        pad = (0, 0)
        if self.same:
            (t, b), (lft, r) = (
                _same_pads(x.shape[2], self.k[0], self.s[0]),
                _same_pads(x.shape[3], self.k[1], self.s[1]),
            )
            if t == b and lft == r and 2 * t <= self.k[0] and 2 * lft <= self.k[1]:
                pad = (t, lft)
            else:
                fill = -math.inf if self.kind == "max_pool" else 0.0
                x = F.pad(x, (lft, r, t, b), value=fill)
        if self.kind == "max_pool":
            return F.max_pool2d(x, self.k, self.s, pad)
        return F.avg_pool2d(x, self.k, self.s, pad, count_include_pad=True)


class _Lrn(nn.Module):
    def __init__(self, layer: Layer):
        super().__init__()
        self.size, self.alpha = layer["size"], layer["alpha"]
        self.beta, self.bias = layer["beta"], layer["bias"]

    def forward(self, x):  # NCHW: the window runs over dim 1, as flexjax's over the last
        half = self.size // 2
        sq = F.pad(torch.square(x), (0, 0, 0, 0, half, self.size - 1 - half))
        c = x.shape[1]
        window = sum(sq[:, k : k + c] for k in range(self.size))
        return x / torch.pow(self.bias + (self.alpha / self.size) * window, self.beta)


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class _Block(nn.Module):
    def __init__(self, layer: Layer, shape: tuple[int, ...]):
        super().__init__()
        self.kind = layer.kind
        self.layer = layer
        self.branches = nn.ModuleList(
            [_Stack(b, shape) if b else nn.Identity() for b in layer.branches]
        )

    def forward(self, x):
        outs = [b(x) for b in self.branches]
        if self.kind == "residual":
            y = outs[0] + (outs[1] if len(outs) > 1 else x)
            return F.relu(y) if self.layer["activation"] == "relu" else y
        if self.kind == "mbconv":
            return outs[0] + x if self.layer["skip"] else outs[0]
        return torch.cat(outs, dim=1)


def _out_shape(layer: Layer, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(infer_shapes((layer,), shape)[0][1])


def _module(layer: Layer, shape: tuple[int, ...]) -> nn.Module:
    """One flexjax layer as a torch module on NCHW tensors; `shape` is its NHWC input."""
    k = layer.kind
    if k == "conv":
        return _Conv(layer, shape[-1])
    if k == "dense":
        return nn.Linear(shape[-1], layer["features"], bias=layer["use_bias"])
    if k in ("max_pool", "avg_pool"):
        return _Pool(layer)
    if k == "global_pool":
        return _Lambda(lambda x: x.mean(dim=(2, 3)))
    if k == "flatten":
        # NCHW -> NHWC first, so the dense weights see flexjax's feature order.
        return _Lambda(lambda x: x.permute(0, 2, 3, 1).reshape(x.shape[0], -1))
    if k == "relu":
        return nn.ReLU()
    if k == "relu6":
        return nn.ReLU6()
    if k == "rescale":
        scale, offset = layer["scale"], layer["offset"]
        return _Lambda(lambda x: x * scale + offset)
    if k == "lrn":
        return _Lrn(layer)
    if k == "batch_norm":
        return nn.BatchNorm2d(
            shape[-1], eps=layer["epsilon"], momentum=1.0 - layer["momentum"]
        ) if len(shape) == 3 else nn.BatchNorm1d(
            shape[-1], eps=layer["epsilon"], momentum=1.0 - layer["momentum"]
        )  # fmt: skip
    if k == "dropout":
        return nn.Dropout(layer["rate"])
    if k in ("residual", "inception", "mbconv"):
        return _Block(layer, shape)
    raise ValueError(f"no PyTorch implementation for layer kind '{k}' in the benchmark")


class _Stack(nn.Module):
    def __init__(self, layers: tuple[Layer, ...], shape: tuple[int, ...]):
        super().__init__()
        mods = []
        for layer in layers:
            mods.append(_module(layer, shape))
            shape = _out_shape(layer, shape)
        self.layers = nn.ModuleList(mods)
        self.out_shape = shape

    def forward(self, x):
        for m in self.layers:
            x = m(x)
        return x


class TorchNet(nn.Module):
    """`net` in PyTorch: ``forward(x [B, H, W, C]) -> {exit_name: logits}``, like flexjax's."""

    def __init__(self, net: Net, channels_last: bool = True):
        super().__init__()
        self.net = net
        self.channels_last = channels_last
        shapes = net.shapes()
        self.backbone = nn.ModuleList(
            [_module(layer, tuple(shapes[i][0])) for i, layer in enumerate(net.layers)]
        )
        self.heads = nn.ModuleDict(
            {e.name: _Stack(e.layers, tuple(shapes[e.after][1])) for e in net.exits}
        )
        self.after = {e.after: e.name for e in net.exits}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = x.permute(0, 3, 1, 2)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = x.contiguous(memory_format=fmt)
        out = {}
        for i, m in enumerate(self.backbone):
            x = m(x)
            if i in self.after:
                out[self.after[i]] = self.heads[self.after[i]](x)
        out[FINAL] = x
        return out


def _copy_layer(mod: nn.Module, params: Mapping, stats: Mapping) -> None:
    def t(a):
        return torch.from_numpy(np.array(a, np.float32))

    if isinstance(mod, _Conv):
        mod.conv.weight.data.copy_(t(params["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
        if mod.conv.bias is not None:
            mod.conv.bias.data.copy_(t(params["bias"]))
    elif isinstance(mod, nn.Linear):
        mod.weight.data.copy_(t(params["kernel"]).T)
        if mod.bias is not None:
            mod.bias.data.copy_(t(params["bias"]))
    elif isinstance(mod, nn.BatchNorm1d | nn.BatchNorm2d):
        mod.weight.data.copy_(t(params["scale"]))
        mod.bias.data.copy_(t(params["bias"]))
        mod.running_mean.copy_(t(stats["mean"]))
        mod.running_var.copy_(t(stats["var"]))
    elif isinstance(mod, _Block):
        for b, branch in enumerate(mod.branches):
            if isinstance(branch, _Stack):
                name = f"branch_{b}"
                _copy_stack(branch, params.get(name, {}), stats.get(name, {}))
    elif params:
        raise ValueError(f"cannot copy flexjax parameters into {type(mod).__name__}")


def _copy_stack(stack: _Stack, params: Mapping, stats: Mapping) -> None:
    for j, mod in enumerate(stack.layers):
        name = f"layer_{j:02d}"
        _copy_layer(mod, params.get(name, {}), stats.get(name, {}))


def load_flax_variables(model: TorchNet, variables: Mapping[str, Any]) -> TorchNet:
    """Copies flexjax variables (``{"params", "batch_stats"}``) into `model`; returns it."""
    params = variables["params"]
    stats = variables.get("batch_stats", {})
    with torch.no_grad():
        for i, mod in enumerate(model.backbone):
            name = f"layer_{i:02d}"
            _copy_layer(mod, params.get(name, {}), stats.get(name, {}))
        for name, head in model.heads.items():
            _copy_stack(head, params[name], stats.get(name, {}))
    return model


def max_logit_difference(net: Net, variables: Mapping[str, Any], x: np.ndarray) -> float:
    """Largest |flexjax - torch| logit over every exit, inference mode, at the same weights."""
    # lazy: JAX only for the check (the benchmark has it loaded anyway)
    from flexjax.models import build

    ref = build(net).apply(dict(variables), x, train=False)
    model = load_flax_variables(TorchNet(net), variables).eval()
    with torch.no_grad():
        got = model(torch.from_numpy(np.asarray(x, np.float32)))
    return max(float(np.max(np.abs(np.asarray(ref[n]) - got[n].numpy()))) for n in net.exit_names)


def random_shift(x: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """flexjax's `random_shift` on NHWC images: up to `shift` pixels, zero fill."""
    n, h, w, _ = x.shape
    padded = F.pad(x, (0, 0, shift, shift, shift, shift))
    oy, ox = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]
    cols = (ox[:, None] + torch.arange(w))[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols]


def _cosine(tcfg: ml_collections.ConfigDict, total_steps: int):
    # optax's schedules as a multiplier of the base learning rate, at the update count.
    warm = tcfg.warmup_steps
    if tcfg.schedule == "constant":
        return lambda t: min(1.0, t / warm) if warm else 1.0
    if warm > 0:
        decay = max(total_steps, warm + 1) - warm

        def f(t):
            if t < warm:
                return t / warm
            return 0.5 * (1 + math.cos(math.pi * min(t - warm, decay) / decay))

        return f
    total = max(total_steps, 1)
    return lambda t: 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


class TorchTrainer:
    """flexjax's joint training step in PyTorch eager: ``step(x, y)`` on numpy NHWC batches.

    Args:
      net: the spec (the same `Net` flexjax trains).
      variables: flexjax variables to start from (so both start at the same weights).
      tcfg: the config's ``train`` section (optimizer, schedule, augmentation).
      weights: per-exit loss weights (`flexjax.training.exit_weights`).
      total_steps: for the cosine schedule.
      seed: torch generator seed (dropout, augmentation).
    """

    def __init__(
        self,
        net: Net,
        variables: Mapping[str, Any],
        tcfg: ml_collections.ConfigDict,
        weights: np.ndarray,
        total_steps: int,
        seed: int = 0,
        channels_last: bool = True,
    ):
        torch.manual_seed(seed)
        self.net = net
        self.model = load_flax_variables(TorchNet(net, channels_last), variables).train()
        self.names = net.exit_names
        self.weights = [float(w) for w in weights]
        self.shift = int(tcfg.augment_shift)
        self.gen = torch.Generator().manual_seed(seed)
        params = list(self.model.parameters())
        lr, wd = tcfg.learning_rate, tcfg.weight_decay
        if tcfg.optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr, weight_decay=wd)
        elif tcfg.optimizer == "adamw":
            self.opt = torch.optim.AdamW(params, lr, weight_decay=wd)
        elif tcfg.optimizer == "sgd":
            self.opt = torch.optim.SGD(
                params, lr, momentum=tcfg.momentum, nesterov=True, weight_decay=wd
            )
        else:
            raise ValueError(f"unknown optimizer '{tcfg.optimizer}'")
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _cosine(tcfg, total_steps))

    def step(self, x: np.ndarray, y: np.ndarray) -> torch.Tensor:
        """One optimizer step; returns the (lazy) loss tensor."""
        xt = torch.from_numpy(x)
        if self.shift:
            xt = random_shift(xt, self.shift, self.gen)
        out = self.model(xt)
        yt = torch.from_numpy(y.astype(np.int64))
        loss = sum(w * F.cross_entropy(out[n], yt) for w, n in zip(self.weights, self.names))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
        """Logits of every exit (inference mode), in batches."""
        self.model.eval()
        outs: dict[str, list] = {n: [] for n in self.names}
        for i in range(0, len(x), batch_size):
            o = self.model(torch.from_numpy(np.asarray(x[i : i + batch_size], np.float32)))
            for n in self.names:
                outs[n].append(o[n].numpy())
        self.model.train()
        return {n: np.concatenate(v) for n, v in outs.items()}
