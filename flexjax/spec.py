"""Networks as data: `Layer`, `Exit`, `Net`.

A network is a small, frozen, hashable, JSON-round-trippable value. Everything
else in flexjax -- the Flax module (`flexjax.models.build`), parameter names,
per-layer costs (`flexjax.costs`), export segments and partitions -- is derived
from it, so a position in the network ("layer 7", "exit_7") means the same thing
to training, transforms, export and the runtime.

Positions are 0-based indices into `Net.layers`. An `Exit(after=i)` hangs off
the *output* of backbone layer `i`; its default name is ``exit_{i}`` so that
removing another exit never renames it. The backbone's last layer produces the
logits of the exit named `FINAL`.

A composite layer (``residual``, ``inception``, ``mbconv``) is ONE position: its
branches are nested layer sequences and nothing can be attached inside it.

Shapes are per example, without the batch axis: images are ``(H, W, C)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from runtime.names import FINAL

SCHEMA_VERSION = 1

Shape = tuple[int, ...]


class SpecError(ValueError):
    """A network description that cannot be built (bad kind, argument or shape)."""


# ---------------------------------------------------------------------------
# Layer kinds: required/optional arguments and shape rules.
# ---------------------------------------------------------------------------

_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class _Kind:
    args: Mapping[str, Any]  # name -> default (or _REQUIRED)
    shape: Callable[[Layer, Shape, str], Shape]
    composite: bool = False


def _pair(v: Any, what: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, Sequence) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    raise SpecError(f"{what} must be an int or a pair of ints, got {v!r}")


def _spatial(
    h: int, w: int, k: tuple[int, int], s: tuple[int, int], padding: str, where: str
) -> tuple[int, int]:
    if padding == "SAME":
        return (math.ceil(h / s[0]), math.ceil(w / s[1]))
    oh, ow = (h - k[0]) // s[0] + 1, (w - k[1]) // s[1] + 1
    if h < k[0] or w < k[1]:
        raise SpecError(
            f"{where}: window {k} does not fit the {h}x{w} input with VALID padding; "
            "use a smaller window or padding='SAME'"
        )
    return (oh, ow)


def _need_image(shape: Shape, where: str) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise SpecError(f"{where}: expects an (H, W, C) feature map, got shape {shape}")
    return shape  # type: ignore[return-value]


def _conv_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    h, w, c = _need_image(shape, where)
    groups = layer["groups"]
    if c % groups or layer["features"] % groups:
        raise SpecError(
            f"{where}: groups={groups} must divide both the input channels ({c}) "
            f"and features ({layer['features']})"
        )
    oh, ow = _spatial(h, w, layer["kernel"], layer["stride"], layer["padding"], where)
    return (oh, ow, layer["features"])


def _low_rank_conv_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    h, w, c = _need_image(shape, where)
    if layer["rank"] < 1:
        raise SpecError(f"{where}: rank must be >= 1, got {layer['rank']}")
    oh, ow = _spatial(h, w, layer["kernel"], layer["stride"], layer["padding"], where)
    return (oh, ow, layer["features"])


def _dense_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    if len(shape) != 1:
        raise SpecError(
            f"{where}: expects a flat input, got shape {shape}; "
            "insert a 'flatten' or 'global_pool' layer before it"
        )
    if layer.kind == "low_rank_dense" and layer["rank"] < 1:
        raise SpecError(f"{where}: rank must be >= 1, got {layer['rank']}")
    return (layer["features"],)


def _pool_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    h, w, c = _need_image(shape, where)
    oh, ow = _spatial(h, w, layer["window"], layer["stride"], layer["padding"], where)
    return (oh, ow, c)


def _global_pool_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    return (_need_image(shape, where)[2],)


def _flatten_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    return (math.prod(shape),)


def _same_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    return shape


def _image_same_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    return _need_image(shape, where)


def _residual_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    if len(layer.branches) not in (1, 2):
        raise SpecError(
            f"{where}: a residual block has a body and an optional shortcut "
            f"branch, got {len(layer.branches)} branches"
        )
    body = infer_shapes(layer.branches[0], shape, f"{where} body")[-1][1]
    short = (
        infer_shapes(layer.branches[1], shape, f"{where} shortcut")[-1][1]
        if len(layer.branches) == 2 and layer.branches[1]
        else shape
    )
    if body != short:
        raise SpecError(
            f"{where}: body output {body} does not match shortcut output {short}; "
            "add a projection shortcut (conv 1x1 with the body's stride)"
        )
    return body


def _mbconv_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    if len(layer.branches) != 1 or not layer.branches[0]:
        raise SpecError(
            f"{where}: an mbconv block has exactly one non-empty body branch, "
            f"got {len(layer.branches)} branches"
        )
    body = infer_shapes(layer.branches[0], shape, f"{where} body")[-1][1]
    if layer["skip"] and body != tuple(shape):
        raise SpecError(
            f"{where}: skip=True adds the input {tuple(shape)} to the body output {body}; "
            "they must match (use skip=False for a block that changes stride or channels)"
        )
    return body


def _inception_shape(layer: Layer, shape: Shape, where: str) -> Shape:
    if len(layer.branches) < 2:
        raise SpecError(f"{where}: an inception block needs at least 2 branches")
    outs = []
    for b, branch in enumerate(layer.branches):
        out = infer_shapes(branch, shape, f"{where} branch {b}")[-1][1] if branch else shape
        outs.append(_need_image(out, f"{where} branch {b} output"))
    if len({o[:2] for o in outs}) != 1:
        raise SpecError(
            f"{where}: branch outputs must share H and W to be concatenated, "
            f"got {[o for o in outs]}"
        )
    return (outs[0][0], outs[0][1], sum(o[2] for o in outs))


_PAD = ("SAME", "VALID")

KINDS: dict[str, _Kind] = {
    "conv": _Kind(
        {
            "features": _REQUIRED,
            "kernel": 3,
            "stride": 1,
            "padding": "SAME",
            "groups": 1,
            "use_bias": True,
        },
        _conv_shape,
    ),
    "low_rank_conv": _Kind(
        {
            "features": _REQUIRED,
            "rank": _REQUIRED,
            "kernel": 3,
            "stride": 1,
            "padding": "SAME",
            "use_bias": True,
        },
        _low_rank_conv_shape,
    ),
    "dense": _Kind({"features": _REQUIRED, "use_bias": True}, _dense_shape),
    "low_rank_dense": _Kind(
        {"features": _REQUIRED, "rank": _REQUIRED, "use_bias": True}, _dense_shape
    ),
    "max_pool": _Kind({"window": 2, "stride": None, "padding": "VALID"}, _pool_shape),
    "avg_pool": _Kind({"window": 2, "stride": None, "padding": "VALID"}, _pool_shape),
    "global_pool": _Kind({}, _global_pool_shape),
    "flatten": _Kind({}, _flatten_shape),
    "relu": _Kind({}, _same_shape),
    "relu6": _Kind({}, _same_shape),
    "rescale": _Kind({"scale": 1.0, "offset": 0.0}, _same_shape),
    "lrn": _Kind({"size": 5, "alpha": 1e-4, "beta": 0.75, "bias": 1.0}, _image_same_shape),
    "batch_norm": _Kind({"momentum": 0.9, "epsilon": 1e-5}, _same_shape),
    "dropout": _Kind({"rate": 0.5}, _same_shape),
    "residual": _Kind({"activation": "relu"}, _residual_shape, composite=True),
    "inception": _Kind({}, _inception_shape, composite=True),
    "mbconv": _Kind({"skip": _REQUIRED}, _mbconv_shape, composite=True),
}

# Kinds whose Flax implementation owns parameters or state (they get a name).
PARAMETRIC = frozenset(
    {
        "conv",
        "low_rank_conv",
        "dense",
        "low_rank_dense",
        "batch_norm",
        "residual",
        "inception",
        "mbconv",
    }
)


def _normalize_args(kind: str, args: Mapping[str, Any], where: str) -> tuple[tuple[str, Any], ...]:
    spec = KINDS[kind]
    unknown = sorted(set(args) - set(spec.args))
    if unknown:
        raise SpecError(
            f"{where}: unknown argument(s) {unknown} for kind '{kind}'; valid: {sorted(spec.args)}"
        )
    out: dict[str, Any] = {}
    for name, default in spec.args.items():
        value = args.get(name, default)
        if value is _REQUIRED:
            raise SpecError(f"{where}: kind '{kind}' requires argument '{name}'")
        out[name] = value
    for name in ("kernel", "window"):
        if name in out:
            out[name] = _pair(out[name], f"{where}: {name}")
    if "stride" in out:
        out["stride"] = _pair(
            out["stride"] if out["stride"] is not None else out["window"], f"{where}: stride"
        )
    if "padding" in out:
        out["padding"] = str(out["padding"]).upper()
        if out["padding"] not in _PAD:
            raise SpecError(f"{where}: padding must be one of {_PAD}, got {args['padding']!r}")
    for name in ("features", "rank", "groups", "size"):
        if name in out and (not isinstance(out[name], int) or out[name] < 1):
            raise SpecError(f"{where}: {name} must be a positive int, got {out[name]!r}")
    if "rate" in out and not 0.0 <= float(out["rate"]) < 1.0:
        raise SpecError(f"{where}: dropout rate must be in [0, 1), got {out['rate']!r}")
    if kind == "residual" and out["activation"] not in ("relu", None):
        raise SpecError(f"{where}: activation must be 'relu' or None")
    if kind == "mbconv" and not isinstance(out["skip"], bool):
        raise SpecError(f"{where}: skip must be true or false, got {out['skip']!r}")
    if kind == "rescale":
        for name in ("scale", "offset"):
            if isinstance(out[name], bool) or not isinstance(out[name], (int, float)):
                raise SpecError(f"{where}: {name} must be a number, got {out[name]!r}")
            out[name] = float(out[name])
    return tuple(sorted(out.items()))


@dataclasses.dataclass(frozen=True)
class Layer:
    """One position of a network: a kind plus its hyper-parameters.

    Build layers with the constructors below (`conv`, `dense`, ...) or
    `Layer.make(kind, **args)`; both fill defaults, so equality and JSON are
    explicit. `branches` is only used by composite kinds.
    """

    kind: str
    args: tuple[tuple[str, Any], ...] = ()
    branches: tuple[tuple[Layer, ...], ...] = ()

    @staticmethod
    def make(
        kind: str, branches: Sequence[Sequence[Layer]] = (), where: str = "layer", **args: Any
    ) -> Layer:
        if kind not in KINDS:
            raise SpecError(f"{where}: unknown layer kind '{kind}'; valid: {sorted(KINDS)}")
        if branches and not KINDS[kind].composite:
            raise SpecError(f"{where}: kind '{kind}' takes no branches")
        return Layer(kind, _normalize_args(kind, args, where), tuple(tuple(b) for b in branches))

    def __getitem__(self, name: str) -> Any:
        for k, v in self.args:
            if k == name:
                return v
        raise KeyError(f"layer kind '{self.kind}' has no argument '{name}'")

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.args)

    def replace(self, **args: Any) -> Layer:
        """Returns a copy with some hyper-parameters changed (validated)."""
        return Layer.make(self.kind, self.branches, **{**self.params, **args})

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind}
        for k, v in self.args:
            d[k] = list(v) if isinstance(v, tuple) else v
        if self.branches:
            d["branches"] = [[layer.to_dict() for layer in b] for b in self.branches]
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = "layer") -> Layer:
        if not isinstance(d, Mapping) or "kind" not in d:
            raise SpecError(f"{where}: expected an object with a 'kind', got {d!r}")
        args = {k: v for k, v in d.items() if k not in ("kind", "branches")}
        branches = [
            [Layer.from_dict(x, f"{where} branch {b}[{j}]") for j, x in enumerate(br)]
            for b, br in enumerate(d.get("branches", ()))
        ]
        return Layer.make(d["kind"], branches, where=where, **args)


# Convenience constructors, so zoo definitions read like the papers' tables.
def conv(
    features: int,
    kernel: Any = 3,
    stride: Any = 1,
    padding: str = "SAME",
    groups: int = 1,
    use_bias: bool = True,
) -> Layer:
    return Layer.make(
        "conv",
        features=features,
        kernel=kernel,
        stride=stride,
        padding=padding,
        groups=groups,
        use_bias=use_bias,
    )


def dense(features: int, use_bias: bool = True) -> Layer:
    return Layer.make("dense", features=features, use_bias=use_bias)


def max_pool(window: Any = 2, stride: Any = None, padding: str = "VALID") -> Layer:
    return Layer.make("max_pool", window=window, stride=stride, padding=padding)


def avg_pool(window: Any = 2, stride: Any = None, padding: str = "VALID") -> Layer:
    return Layer.make("avg_pool", window=window, stride=stride, padding=padding)


def global_pool() -> Layer:
    return Layer.make("global_pool")


def flatten() -> Layer:
    return Layer.make("flatten")


def relu() -> Layer:
    return Layer.make("relu")


def relu6() -> Layer:
    return Layer.make("relu6")


def rescale(scale: float, offset: float = 0.0) -> Layer:
    """``x * scale + offset``: maps the [0, 1] images flexjax feeds to a model's input range."""
    return Layer.make("rescale", scale=scale, offset=offset)


def lrn(size: int = 5, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0) -> Layer:
    return Layer.make("lrn", size=size, alpha=alpha, beta=beta, bias=bias)


def batch_norm(momentum: float = 0.9, epsilon: float = 1e-5) -> Layer:
    return Layer.make("batch_norm", momentum=momentum, epsilon=epsilon)


def dropout(rate: float = 0.5) -> Layer:
    return Layer.make("dropout", rate=rate)


def residual(
    body: Sequence[Layer], shortcut: Sequence[Layer] = (), activation: str | None = "relu"
) -> Layer:
    branches = (tuple(body), tuple(shortcut)) if shortcut else (tuple(body),)
    return Layer.make("residual", branches, activation=activation)


def inception(*branches: Sequence[Layer]) -> Layer:
    return Layer.make("inception", branches)


def mbconv(body: Sequence[Layer], skip: bool) -> Layer:
    """A MobileNet-V2 / EfficientNet inverted-residual block as ONE position.

    `body` is the block's layers (1x1 expansion, depthwise kxk, 1x1 projection,
    with their batch norms and activations); `skip` adds the block's input to
    the body's output (no activation after the add), which needs the same shape.
    """
    return Layer.make("mbconv", (tuple(body),), skip=skip)


# ---------------------------------------------------------------------------
# Shape inference.
# ---------------------------------------------------------------------------


def infer_shapes(
    layers: Sequence[Layer], input_shape: Shape, where: str = "layer"
) -> list[tuple[Shape, Shape]]:
    """Returns `[(input_shape, output_shape)]` per layer.

    Raises:
      SpecError: naming the first position whose input does not fit.
    """
    out: list[tuple[Shape, Shape]] = []
    shape = tuple(input_shape)
    for i, layer in enumerate(layers):
        loc = f"{where} {i} ({layer.kind})"
        new = tuple(KINDS[layer.kind].shape(layer, shape, loc))
        if any(d < 1 for d in new):
            raise SpecError(f"{loc}: produces an empty output {new} from input {shape}")
        out.append((shape, new))
        shape = new
    return out


@dataclasses.dataclass(frozen=True)
class Exit:
    """An exit head hanging off the output of backbone layer `after`."""

    after: int
    layers: tuple[Layer, ...]
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.name:
            object.__setattr__(self, "name", f"exit_{self.after}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "after": self.after,
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any], where: str = "exit") -> Exit:
        unknown = sorted(set(d) - {"name", "after", "layers"})
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {unknown}; valid: after, layers, name")
        layers = tuple(
            Layer.from_dict(x, f"{where} layer {j}") for j, x in enumerate(d.get("layers", ()))
        )
        return Exit(int(d["after"]), layers, str(d.get("name", "")))


@dataclasses.dataclass(frozen=True)
class Net:
    """A multi-exit network: backbone layers in execution order plus exits.

    Validated on construction: every layer must fit its input, every exit must
    hang off an existing non-final position and end in `num_classes` logits.
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    layers: tuple[Layer, ...]
    exits: tuple[Exit, ...] = ()
    name: str = ""

    def __post_init__(self):
        object.__setattr__(self, "input_shape", tuple(int(d) for d in self.input_shape))
        object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "exits", tuple(self.exits))
        self._validate()

    def _validate(self) -> None:
        if len(self.input_shape) != 3 or min(self.input_shape) < 1:
            raise SpecError(
                f"input_shape must be (H, W, C) with positive sizes, got {self.input_shape}"
            )
        if self.num_classes < 2:
            raise SpecError(f"num_classes must be >= 2, got {self.num_classes}")
        if not self.layers:
            raise SpecError("a net needs at least one backbone layer")
        shapes = infer_shapes(self.layers, self.input_shape)
        if shapes[-1][1] != (self.num_classes,):
            raise SpecError(
                f"the backbone ends in shape {shapes[-1][1]}, expected logits "
                f"({self.num_classes},); end it with dense({self.num_classes})"
            )
        names, last = set(), -1
        for e in self.exits:
            if not 0 <= e.after < len(self.layers) - 1:
                raise SpecError(
                    f"{e.name}: position {e.after} is out of range; exits hang off "
                    f"backbone positions 0..{len(self.layers) - 2}"
                )
            if e.after <= last:
                raise SpecError(
                    f"{e.name}: exits must be sorted by strictly increasing "
                    f"position, got {e.after} after {last}"
                )
            if e.name in names or e.name == FINAL:
                raise SpecError(f"exit name '{e.name}' is used twice or reserved")
            if not e.layers:
                raise SpecError(f"{e.name}: an exit needs at least one layer")
            names.add(e.name)
            last = e.after
            out = infer_shapes(e.layers, shapes[e.after][1], f"{e.name} layer")[-1][1]
            if out != (self.num_classes,):
                raise SpecError(
                    f"{e.name}: the head ends in shape {out}, expected ({self.num_classes},)"
                )

    # -- derived views -------------------------------------------------------
    def shapes(self) -> list[tuple[Shape, Shape]]:
        """`[(input_shape, output_shape)]` for each backbone position."""
        return infer_shapes(self.layers, self.input_shape)

    @property
    def exit_names(self) -> tuple[str, ...]:
        """Every exit in execution order, ending with `FINAL`."""
        return tuple(e.name for e in self.exits) + (FINAL,)

    def exit_position(self, name: str) -> int:
        """The backbone position whose output an exit reads (FINAL: the last layer)."""
        if name == FINAL:
            return len(self.layers) - 1
        for e in self.exits:
            if e.name == name:
                return e.after
        raise KeyError(f"no exit named '{name}'; exits: {list(self.exit_names)}")

    def get_exit(self, name: str) -> Exit:
        for e in self.exits:
            if e.name == name:
                return e
        raise KeyError(f"no exit named '{name}'; exits: {[e.name for e in self.exits]}")

    def replace(self, **changes: Any) -> Net:
        return dataclasses.replace(self, **changes)

    # -- serialization -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "name": self.name,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "layers": [layer.to_dict() for layer in self.layers],
            "exits": [e.to_dict() for e in self.exits],
        }

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Net:
        if not isinstance(d, Mapping):
            raise SpecError(f"a net must be a JSON object, got {type(d).__name__}")
        schema = d.get("schema", SCHEMA_VERSION)
        if schema != SCHEMA_VERSION:
            raise SpecError(f"net schema {schema} is not supported (expected {SCHEMA_VERSION})")
        unknown = sorted(
            set(d) - {"schema", "name", "input_shape", "num_classes", "layers", "exits"}
        )
        if unknown:
            raise SpecError(f"unknown net field(s) {unknown}")
        for key in ("input_shape", "num_classes", "layers"):
            if key not in d:
                raise SpecError(f"net is missing the field '{key}'")
        layers = tuple(Layer.from_dict(x, f"layer {i}") for i, x in enumerate(d["layers"]))
        exits = tuple(Exit.from_dict(x, f"exit {i}") for i, x in enumerate(d.get("exits", ())))
        return Net(
            tuple(d["input_shape"]), int(d["num_classes"]), layers, exits, str(d.get("name", ""))
        )

    @staticmethod
    def from_json(text: str) -> Net:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"net spec is not valid JSON: {e}") from None
        return Net.from_dict(d)
