"""Per-layer costs derived from a `Net` (no JAX needed).

Conventions (batch 1, the deployment case):

* FLOPs count a multiply-add as 2. Bias adds are not counted (they fold into
  the multiply-adds on every backend we target). Pooling counts one op per
  window element per output, ReLU and ReLU6 one per element, inference
  BatchNorm two per element (scale + shift), ``rescale`` two per element, LRN
  ``size + 4`` per element, residual (and ``mbconv`` skip) adds one per
  element. Dropout and flatten are free.
* `multiply_adds` counts only the multiply-adds of conv and dense layers
  (the "MACs" / "MAdds" figure papers publish).
* ``params`` are trainable parameters; ``state`` are non-trained variables
  (BatchNorm running mean/variance). ``param_bytes`` covers both, since both
  are loaded to run the layer.
* ``in_bytes``/``out_bytes`` are activation sizes: what Edgent transmits when
  the network is cut before/after the layer.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from flexjax.spec import Layer, Net, Shape, infer_shapes
from runtime import criteria


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Cost of one layer (or a sum of layers) at batch 1."""

    flops: int = 0
    params: int = 0
    state: int = 0
    param_bytes: int = 0
    in_bytes: int = 0
    out_bytes: int = 0

    def __add__(self, other: LayerCost) -> LayerCost:
        # Activations of a sum: what enters the first and leaves the last part.
        return LayerCost(
            self.flops + other.flops,
            self.params + other.params,
            self.state + other.state,
            self.param_bytes + other.param_bytes,
            self.in_bytes or other.in_bytes,
            other.out_bytes or self.out_bytes,
        )

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def total(costs: Sequence[LayerCost]) -> LayerCost:
    """The summed cost of a sequence of layers (e.g. one export segment)."""
    out = LayerCost()
    for c in costs:
        out = out + c
    return out


def _counts(layer: Layer, in_shape: Shape, out_shape: Shape) -> tuple[int, int, int]:
    """(flops, params, state) of one layer."""
    k = layer.kind
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    bias = lambda f: f if layer.get("use_bias") else 0  # noqa: E731
    if k == "conv":
        kh, kw = layer["kernel"]
        per_out = kh * kw * in_shape[-1] // layer["groups"]
        return 2 * n_out * per_out, per_out * layer["features"] + bias(layer["features"]), 0
    if k == "low_rank_conv":
        kh, kw = layer["kernel"]
        r, f = layer["rank"], layer["features"]
        spatial = out_shape[0] * out_shape[1]
        flops = 2 * spatial * r * kh * kw * in_shape[-1] + 2 * spatial * f * r
        return flops, kh * kw * in_shape[-1] * r + r * f + bias(f), 0
    if k == "dense":
        f = layer["features"]
        return 2 * n_in * f, n_in * f + bias(f), 0
    if k == "low_rank_dense":
        r, f = layer["rank"], layer["features"]
        return 2 * (n_in * r + r * f), n_in * r + r * f + bias(f), 0
    if k in ("max_pool", "avg_pool"):
        kh, kw = layer["window"]
        return n_out * kh * kw, 0, 0
    if k == "global_pool":
        return n_in, 0, 0
    if k in ("relu", "relu6"):
        return n_out, 0, 0
    if k == "rescale":
        return 2 * n_out, 0, 0
    if k == "lrn":
        return n_out * (layer["size"] + 4), 0, 0
    if k == "batch_norm":
        c = in_shape[-1]
        return 2 * n_out, 2 * c, 2 * c
    if k in ("dropout", "flatten"):
        return 0, 0, 0
    if k in ("residual", "inception", "mbconv"):
        flops = params = state = 0
        for branch in layer.branches:
            if branch:
                c = total(sequence_costs(branch, in_shape))
                flops, params, state = flops + c.flops, params + c.params, state + c.state
        if k == "residual":
            flops += n_out * (2 if layer["activation"] == "relu" else 1)
        elif k == "mbconv" and layer["skip"]:
            flops += n_out
        return flops, params, state
    raise ValueError(f"no cost model for layer kind '{k}'")


def _macs(layers: Sequence[Layer], input_shape: Shape) -> int:
    out = 0
    for layer, (sin, sout) in zip(layers, infer_shapes(layers, input_shape)):
        if layer.kind in ("conv", "low_rank_conv", "dense", "low_rank_dense"):
            out += _counts(layer, sin, sout)[0] // 2
        for branch in layer.branches:
            if branch:
                out += _macs(branch, sin)
    return out


def multiply_adds(net: Net) -> int:
    """Multiply-adds of the backbone's conv and dense layers at batch 1 (published "MACs").

    Unlike `of(...).backbone_flops / 2`, this leaves out batch norm, activations,
    pooling and adds, which papers do not count.
    """
    return _macs(net.layers, net.input_shape)


def sequence_costs(
    layers: Sequence[Layer],
    input_shape: Shape,
    *,
    bytes_per_param: int = 4,
    bytes_per_activation: int = 4,
) -> list[LayerCost]:
    """Costs of each layer of a sequence fed with `input_shape`."""
    out = []
    for layer, (sin, sout) in zip(layers, infer_shapes(layers, input_shape)):
        flops, params, state = _counts(layer, sin, sout)
        out.append(
            LayerCost(
                flops,
                params,
                state,
                (params + state) * bytes_per_param,
                math.prod(sin) * bytes_per_activation,
                math.prod(sout) * bytes_per_activation,
            )
        )
    return out


@dataclasses.dataclass(frozen=True)
class NetCosts:
    """Costs of a whole multi-exit net.

    Attributes:
      layers: one `LayerCost` per backbone position.
      heads: exit name -> cost of that exit's head (side exits only).
      exit_flops: exit name -> FLOPs spent on a frame that leaves at that exit:
        the backbone up to the exit's position plus every head evaluated on the
        way (earlier heads failed, this one passed). For `FINAL`: the whole
        backbone plus every side head.
    """

    net: Net
    layers: tuple[LayerCost, ...]
    heads: Mapping[str, LayerCost]
    exit_flops: Mapping[str, int]

    @property
    def backbone(self) -> LayerCost:
        return total(self.layers)

    @property
    def backbone_flops(self) -> int:
        return self.backbone.flops

    def expected_flops(self, exit_rates: Mapping[str, float]) -> float:
        """Expected FLOPs per input given the fraction of inputs leaving at each exit."""
        unknown = set(exit_rates) - set(self.exit_flops)
        if unknown:
            raise KeyError(f"unknown exits {sorted(unknown)}; known: {list(self.exit_flops)}")
        return float(sum(rate * self.exit_flops[name] for name, rate in exit_rates.items()))

    def to_dict(self) -> dict:
        return {
            "layers": [c.to_dict() for c in self.layers],
            "heads": {k: v.to_dict() for k, v in self.heads.items()},
            "exit_flops": dict(self.exit_flops),
            "backbone_flops": self.backbone_flops,
        }


def of(net: Net, *, bytes_per_param: int = 4, bytes_per_activation: int = 4) -> NetCosts:
    """Per-layer, per-head and per-exit costs of `net` (see module docstring)."""
    kw = dict(bytes_per_param=bytes_per_param, bytes_per_activation=bytes_per_activation)
    layers = tuple(sequence_costs(net.layers, net.input_shape, **kw))
    shapes = net.shapes()
    heads = {e.name: total(sequence_costs(e.layers, shapes[e.after][1], **kw)) for e in net.exits}
    stops = [e.after + 1 for e in net.exits] + [len(layers)]
    segments = [sum(c.flops for c in layers[a:b]) for a, b in zip([0, *stops[:-1]], stops)]
    leave = criteria.leave_costs(segments, [heads[e.name].flops for e in net.exits] + [0])
    exit_flops = dict(zip(net.exit_names, leave))
    return NetCosts(net, layers, heads, exit_flops)
