"""Edgent's per-layer-kind linear latency models, evaluated with numpy only.

Offline (`export.latency_fit`) a linear regression is fitted per layer kind
and per target (device, edge) on measured single-layer latencies; the
coefficients live in the bundle manifest under ``latency_models``. This
module is the single definition of the regression variables (the fit imports
it) and evaluates the models at run time.

Variables (Edgent, Table 1), from a layer descriptor (`export.partitions`):

* ``conv``: ``x1`` input feature-map amount ``H*W*C_in``; ``x2`` =
  ``(kernel/stride)^2 * filters``;
* ``relu``, ``lrn``, ``dropout``: ``x`` input size;
* ``max_pool`` / ``avg_pool`` / ``global_pool`` (kind ``pool``): ``x1`` input
  size, ``x2`` output size;
* ``dense``: ``x1`` input size, ``x2`` output size;
* model loading: ``x`` model size in bytes.

EfficientNet-Lite's kinds (not in Edgent's table):

* ``dwconv`` (a depthwise conv, ``groups`` = input channels): ``x1`` input
  amount, ``x2`` = ``(kernel/stride)^2`` (its work per input element);
* ``rescale`` (``x * a + b`` on the input image): ``x`` input size;
* ``mbconv`` (an inverted-residual block as a unit): ``x1`` the 1x1 convs'
  multiply-adds, ``x2`` the depthwise conv's, ``x3`` the elements the block
  reads and writes (input, every body output). Without an ``mbconv``
  regression a block costs the sum of its body's layers (``conv`` /
  ``dwconv``, batch norms folded, ``relu6`` fused) plus, with a skip, one
  ``rescale``-like elementwise pass over its output.

A model may also use the product ``x1*x2`` (named ``x1x2``): for a SAME conv
``2*x1*x2`` is exactly its FLOPs and for a dense layer ``x1*x2`` its weights,
so a regression linear in ``(x1, x2, x1x2)`` is still linear in Edgent's
variables plus their interaction. The fit reports both forms.

Whole-path latency of one signature = ``overhead_ms`` (one interpreter
invocation, measured) + the sum of its layers' predictions, where layers the
TFLite graph does not contain cost nothing: a ``relu`` fused into the conv /
dense before it, ``dropout`` (identity at inference) and ``flatten`` (a free
reshape).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

# Layer kind -> regression kind.
REGRESSION_KIND = {
    "conv": "conv",
    "relu": "relu",
    "relu6": "relu",
    "lrn": "lrn",
    "dropout": "dropout",
    "max_pool": "pool",
    "avg_pool": "pool",
    "global_pool": "pool",
    "dense": "dense",
    "rescale": "rescale",
    "mbconv": "mbconv",
}
# Edgent's variables per regression kind (the paper's form).
BASE_VARIABLES = {
    "conv": ("x1", "x2"),
    "relu": ("x",),
    "lrn": ("x",),
    "dropout": ("x",),
    "pool": ("x1", "x2"),
    "dense": ("x1", "x2"),
    "dwconv": ("x1", "x2"),
    "rescale": ("x",),
    "mbconv": ("x1", "x2", "x3"),
    "loading": ("x",),
}
# Kinds whose variables have no meaningful product (no "interaction" form).
NO_INTERACTION = ("mbconv",)
# Layers that do not exist in the TFLite graph (see the module docstring).
FREE_KINDS = ("flatten", "dropout")


class LatencyModelError(ValueError):
    """A latency model or layer descriptor the runtime cannot evaluate."""


def regression_kind(row: Mapping[str, Any]) -> str | None:
    """The regression kind of a layer descriptor (a depthwise conv is ``dwconv``)."""
    kind = REGRESSION_KIND.get(row["kind"])
    groups = int(row.get("groups", 1) or 1)
    if kind == "conv" and groups > 1 and groups == row["in_shape"][-1]:
        return "dwconv"
    return kind


def _mbconv_variables(row: Mapping[str, Any]) -> dict[str, float]:
    pw = dw = 0.0
    moved = float(math.prod(row["in_shape"]))
    for r in row["body"]:
        moved += math.prod(r["out_shape"])
        if r["kind"] != "conv":
            continue
        out = math.prod(r["out_shape"])
        k = r["kernel"]
        if regression_kind(r) == "dwconv":
            dw += out * k[0] * k[1]
        else:
            pw += out * k[0] * k[1] * r["in_shape"][-1]
    return {"x1": pw, "x2": dw, "x3": moved}


def raw_variables(row: Mapping[str, Any]) -> dict[str, float]:
    """Edgent's variables of one layer descriptor (``kind``, ``in_shape``, ``out_shape``, ...)."""
    kind = regression_kind(row)
    n_in, n_out = math.prod(row["in_shape"]), math.prod(row["out_shape"])
    if kind == "dwconv":
        k, s = row["kernel"], row["stride"]
        x2 = (k[0] * k[1]) / (s[0] * s[1])
        return {"x1": float(n_in), "x2": x2, "x1x2": n_in * x2}
    if kind == "mbconv":
        return _mbconv_variables(row)
    if kind == "conv":
        k, s = row["kernel"], row["stride"]
        x1 = float(n_in)
        x2 = (k[0] * k[1]) / (s[0] * s[1]) * row["features"]
        return {"x1": x1, "x2": x2, "x1x2": x1 * x2}
    if kind in ("relu", "lrn", "dropout", "rescale"):
        return {"x": float(n_in)}
    if kind in ("pool", "dense"):
        return {"x1": float(n_in), "x2": float(n_out), "x1x2": float(n_in) * n_out}
    raise LatencyModelError(f"no latency regression for layer kind {row['kind']!r}")


def design(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> np.ndarray:
    """The design matrix ``[len(rows), len(names)]`` of the named variables."""
    return np.array([[raw_variables(r)[n] for n in names] for r in rows], np.float64)


def _linear(model: Mapping[str, Any], values: Mapping[str, float]) -> float:
    coef = model["coef"]
    total = float(model["intercept"])
    for name, c in zip(model["variables"], coef):
        total += float(c) * values[name]
    return total


def check(model: Mapping[str, Any]) -> None:
    """Validates one target's model (``kinds``, ``overhead_ms``, optional ``loading``).

    Raises:
      LatencyModelError: a missing field or a coefficient that is not a finite number.
    """
    try:
        kinds = model["kinds"]
        float(model["overhead_ms"])
        for name, m in list(kinds.items()) + [("loading", model.get("loading"))]:
            if m is None:
                continue
            if len(m["coef"]) != len(m["variables"]):
                raise LatencyModelError(
                    f"{name}: {len(m['coef'])} coefficients for {m['variables']}"
                )
            values = [float(v) for v in [*m["coef"], m["intercept"]]]
            if not all(math.isfinite(v) for v in values):
                raise LatencyModelError(f"{name}: non-finite coefficients")
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, LatencyModelError):
            raise
        raise LatencyModelError(f"malformed latency model: {type(e).__name__} {e}") from None


def layer_ms(model: Mapping[str, Any], row: Mapping[str, Any]) -> float:
    """Predicted latency (ms) of one layer inside a signature (0 for layers TFLite drops)."""
    if row["kind"] in FREE_KINDS or row.get("fused"):
        return 0.0
    kind = regression_kind(row)
    if kind == "mbconv" and "mbconv" not in model["kinds"] and "body" in row:
        # The block as its parts; the skip's add costs an elementwise pass like a rescale.
        total = sum(layer_ms(model, r) for r in row["body"])
        if row.get("skip") and "rescale" in model["kinds"]:
            total += layer_ms(model, {"kind": "rescale", "in_shape": row["out_shape"],
                                      "out_shape": row["out_shape"]})  # fmt: skip
        return total
    if kind is None or kind not in model["kinds"]:
        raise LatencyModelError(
            f"the latency model has no regression for layer kind {row['kind']!r}; "
            f"it has {sorted(model['kinds'])}"
        )
    return max(0.0, _linear(model["kinds"][kind], raw_variables(row)))


def signature_ms(model: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> float:
    """Predicted latency of one signature made of `rows`: one invocation + its layers."""
    return float(model["overhead_ms"]) + sum(layer_ms(model, r) for r in rows)


def loading_ms(model: Mapping[str, Any], nbytes: float) -> float:
    """Predicted model-loading latency for `nbytes` of model (0 without a loading model)."""
    m = model.get("loading")
    return 0.0 if m is None else max(0.0, _linear(m, {"x": float(nbytes)}))


def path_rows(section: Mapping[str, Any], exit_name: str, start: int, stop: int) -> list[dict]:
    """Layer descriptors of backbone ``[start, stop)`` followed by exit `exit_name`'s head."""
    table = section["layer_table"]
    rows = list(table["backbone"][start:stop])
    if exit_name != "final":
        rows += table[exit_name]
    return rows
