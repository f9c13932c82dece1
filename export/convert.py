"""`(net, variables)` -> one multi-signature TFLite flatbuffer.

Signatures are derived from the net's exits (see `plan_signatures`):

* ``segment_<k>``: backbone positions from just after the previous exit up to
  and including the position exit ``<k>`` hangs off (input: the image or the
  previous segment's activation; output ``activation``);
* ``exit_<k>``: the head of that exit (input: the activation; output ``logits``);
* ``stage_<k>`` (with ``stages=True``, what a bundle exports): ``segment_<k>`` then
  ``exit_<k>`` in one graph, two outputs ``activation`` and ``logits``
  (`runtime.names.STAGE_OUTPUTS`): the early-exit executor's one interpreter call per
  stage (the head always runs after its segment);
* ``segment_final``: the rest of the backbone (output ``logits``);
* ``full``: the whole backbone in one graph, the input-agnostic baseline.

`<k>` is the exit's name without its ``exit_`` prefix, so the default exit
``exit_3`` gives ``segment_3`` and ``exit_3``. Every signature has static
batch 1 (REFERENCE.md: a polymorphic batch adds SHAPE/GATHER ops and keeps
BatchNorm unfolded).

Route (REFERENCE.md): `jax2tf.convert` (native serialization) -> a SavedModel
whose signatures are a ``{name: concrete_function}`` dict -> `TFLiteConverter`.
Parameters are `tf.Variable`s shared by every signature, so a weight used by
``segment_3`` and ``full`` is stored once in the flatbuffer.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flexjax import models
from flexjax.models.build import export_lowering
from flexjax.spec import FINAL, PARAMETRIC, Net
from runtime.names import ACTIVATION, FULL, LOGITS, head_name, segment_name, stage_name

PRECISIONS = ("fp32", "fp16", "dynamic", "int8")


@dataclasses.dataclass(frozen=True)
class SignaturePlan:
    """What one signature computes.

    Attributes:
      name: signature name in the flatbuffer.
      kind: ``segment`` (backbone positions [start, stop)), ``head`` (the head
        of `exit`), ``path`` (positions [start, stop) then the head of `exit`:
        the edge side of an Edgent partition), ``stage`` (positions [start, stop)
        then the head of `exit`, outputs the activation AND the logits) or ``full``
        (positions [0, L) as one graph).
      start, stop: backbone positions covered (for a head: the exit's position
        + 1 for both, i.e. no backbone).
      exit: the exit this signature leads to (`FINAL` for the last segment and
        ``full``).
      input_name, output_name: tensor names in the signature.
      input_shape, output_shape: shapes without the batch dimension.
      extra_outputs: ``(name, shape)`` of outputs after the first (a stage's logits).
    """

    name: str
    kind: str
    start: int
    stop: int
    exit: str
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    extra_outputs: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def outputs(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """``(name, shape without batch)`` of every output, in the signature's fixed order."""
        return ((self.output_name, self.output_shape), *self.extra_outputs)

    def to_dict(self) -> dict:
        """The manifest's entry: one output as ``output_name`` / ``output_shape``; several as
        ``outputs``, a list of ``{"name", "shape"}`` in the signature's order."""
        d = dataclasses.asdict(self)
        del d["extra_outputs"]
        d["input_shape"] = [1, *self.input_shape]
        if self.extra_outputs:
            del d["output_name"], d["output_shape"]
            d["outputs"] = [{"name": n, "shape": [1, *s]} for n, s in self.outputs]
        else:
            d["output_shape"] = [1, *self.output_shape]
        return d


def plan_signatures(net: Net, *, stages: bool = False) -> list[SignaturePlan]:
    """The signatures of `net`'s bundle, in execution order, then ``full``.

    `stages`: after each side exit's segment and head, its ``stage`` signature (both in one
    graph; what a bundle ships for the one-call-per-stage executor).
    """
    shapes = net.shapes()
    input_shape = tuple(net.input_shape)

    def in_shape(pos: int) -> tuple[int, ...]:
        return input_shape if pos == 0 else tuple(shapes[pos - 1][1])

    plans: list[SignaturePlan] = []
    start = 0
    for e in net.exits:
        stop = e.after + 1
        act = tuple(shapes[e.after][1])
        plans.append(
            SignaturePlan(
                segment_name(e.name), "segment", start, stop, e.name,
                "x", ACTIVATION, in_shape(start), act,
            )
        )  # fmt: skip
        plans.append(
            SignaturePlan(
                head_name(e.name), "head", stop, stop,
                e.name, ACTIVATION, LOGITS, act, (net.num_classes,),
            )
        )  # fmt: skip
        if stages:
            plans.append(
                SignaturePlan(
                    stage_name(e.name), "stage", start, stop, e.name, "x", ACTIVATION,
                    in_shape(start), act, ((LOGITS, (net.num_classes,)),),
                )
            )  # fmt: skip
        start = stop
    n = len(net.layers)
    logits = (net.num_classes,)
    plans.append(
        SignaturePlan(segment_name(FINAL), "segment", start, n, FINAL, "x", "logits",
                      in_shape(start), logits)
    )  # fmt: skip
    plans.append(SignaturePlan(FULL, "full", 0, n, FINAL, "x", "logits", input_shape, logits))
    names = [p.name for p in plans]
    if len(set(names)) != len(names):
        raise ValueError(f"exit names give clashing signature names: {names}")
    return plans


def signature_variables(net: Net, variables: Mapping[str, Any], plan: SignaturePlan) -> dict:
    """The variables one signature reads (so it captures no unrelated weights)."""
    if plan.kind == "head":
        keys = {plan.exit}
    else:
        keys = {plan.exit} if plan.kind in ("path", "stage") else set()
        keys |= {
            models.layer_name(i)
            for i in range(plan.start, plan.stop)
            if net.layers[i].kind in PARAMETRIC
        }
    out: dict = {}
    for col, tree in variables.items():
        sub = {k: v for k, v in tree.items() if k in keys}
        if sub:
            out[col] = sub
    return out


def signature_fn(net: Net, plan: SignaturePlan) -> Callable[[dict, jax.Array], Any]:
    """A pure JAX function ``(variables, x) -> output`` for one signature.

    A ``stage`` returns a tuple ``(activation, logits)`` (its `SignaturePlan.outputs` order).
    """
    model = models.build(net)
    if plan.kind == "head":

        def run_head(variables, x):
            return models.head_apply(net, variables, plan.exit, x)

        return run_head
    if plan.kind == "path":

        def run_path(variables, x):
            if plan.stop > plan.start:
                out = model.apply(
                    variables, x, False, start=plan.start, stop=plan.stop, heads=False
                )
                x = out["activation"]
            return models.head_apply(net, variables, plan.exit, x)

        return run_path
    if plan.kind == "stage":

        def run_stage(variables, x):
            out = model.apply(variables, x, False, start=plan.start, stop=plan.stop, heads=False)
            h = out["activation"]
            return h, models.head_apply(net, variables, plan.exit, h)

        return run_stage

    def run_segment(variables, x):
        out = model.apply(variables, x, False, start=plan.start, stop=plan.stop, heads=False)
        return out[FINAL] if plan.stop == len(net.layers) else out["activation"]

    return run_segment


def jax_outputs(
    net: Net, variables: Mapping[str, Any], plan: SignaturePlan, x: np.ndarray, batch: int = 128
) -> np.ndarray | tuple[np.ndarray, ...]:
    """Runs one signature's computation in JAX (jit, inference mode) on a batch of inputs.

    Returns the output, or for a several-output signature (a stage) a tuple in its order.
    """
    fn = jax.jit(signature_fn(net, plan))
    sub = signature_variables(net, variables, plan)
    outs = [fn(sub, x[i : i + batch]) for i in range(0, len(x), batch)]
    if plan.extra_outputs:
        return tuple(
            np.concatenate([np.asarray(o[j]) for o in outs]).astype(np.float32)
            for j in range(len(plan.outputs))
        )
    return np.concatenate([np.asarray(o) for o in outs]).astype(np.float32)


def _converter_options(converter, precision: str, sparsity: bool, representative) -> None:
    # lazy: TensorFlow takes seconds to import and only conversion needs it
    import tensorflow as tf

    opts = []
    if precision == "fp16":
        opts = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "dynamic":
        opts = [tf.lite.Optimize.DEFAULT]
    elif precision == "int8":
        if representative is None:
            raise ValueError("int8 export needs a representative dataset")
        opts = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
    elif precision != "fp32":
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    if sparsity:
        opts.append(tf.lite.Optimize.EXPERIMENTAL_SPARSITY)
    converter.optimizations = opts


def to_tflite(
    net: Net,
    variables: Mapping[str, Any],
    plans: Sequence[SignaturePlan],
    *,
    precision: str = "fp32",
    sparsity: bool = False,
    representative: Mapping[str, np.ndarray] | None = None,
    num_calibration: int = 100,
) -> bytes:
    """Converts `net` into one TFLite flatbuffer with a signature per plan.

    Args:
      representative: signature name -> [N, ...] real inputs of that signature
        (int8 only): the activation ranges of every signature are calibrated on
        inputs it will really see.
    """
    return to_tflite_many(
        [(net, variables, plans)], precision=precision, sparsity=sparsity,
        representative=representative, num_calibration=num_calibration,
    )  # fmt: skip


def to_tflite_many(
    parts: Sequence[tuple[Net, Mapping[str, Any], Sequence[SignaturePlan]]],
    *,
    precision: str = "fp32",
    sparsity: bool = False,
    representative: Mapping[str, np.ndarray] | None = None,
    num_calibration: int = 100,
) -> bytes:
    """Like `to_tflite`, for the signatures of several nets in one flatbuffer.

    What the Edgent latency sweep needs: many one-layer nets, one signature
    each, converted in one pass. Signature names must be unique across parts.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    # Traced with the ops TFLite converts (depthwise convolutions as DEPTHWISE_CONV_2D).
    with export_lowering():
        return _to_tflite_many(parts, precision, sparsity, representative, num_calibration)


def _to_tflite_many(parts, precision, sparsity, representative, num_calibration) -> bytes:
    # lazy: TensorFlow takes seconds to import and only conversion needs it
    import tensorflow as tf
    from jax.experimental import jax2tf

    module = tf.Module()
    module.params = []
    signatures = {}
    all_plans = []
    for net, variables, plans in parts:
        np_vars = jax.tree.map(lambda a: np.asarray(a, np.float32), dict(variables))
        params = jax.tree.map(lambda a: tf.Variable(a, trainable=False), np_vars)
        module.params.append(params)
        for plan in plans:
            if plan.name in signatures:
                raise ValueError(f"signature name {plan.name!r} is used twice")
            sub_np = signature_variables(net, np_vars, plan)
            # The same tf.Variable objects, picked by the same keys.
            sub_tf = {c: {k: params[c][k] for k in t} for c, t in sub_np.items()}
            converted = jax2tf.convert(signature_fn(net, plan), with_gradient=False)

            spec = tf.TensorSpec((1, *plan.input_shape), tf.float32, name=plan.input_name)
            fn = tf.function(
                _closure(converted, sub_tf, [n for n, _ in plan.outputs]),
                input_signature=[spec],
                autograph=False,
            )
            signatures[plan.name] = fn.get_concrete_function()
            setattr(module, f"fn_{len(signatures)}", fn)
            all_plans.append(plan)

    rep_fn = None
    if precision == "int8":
        if not representative:
            raise ValueError("int8 export needs representative inputs for every signature")

        def rep_fn():
            for plan in all_plans:
                xs = representative[plan.name][:num_calibration]
                for x in xs:
                    yield plan.name, {plan.input_name: x[None].astype(np.float32)}

    with tempfile.TemporaryDirectory(prefix="flexjax_savedmodel_") as tmp:
        path = os.path.join(tmp, "model")
        tf.saved_model.save(module, path, signatures=signatures)
        converter = tf.lite.TFLiteConverter.from_saved_model(path, signature_keys=list(signatures))
        _converter_options(converter, precision, sparsity, rep_fn)
        return bytes(converter.convert())


def _closure(fn: Callable, variables: dict, output_names: Sequence[str]) -> Callable:
    # A closure, not default arguments: tf.function would treat those as inputs.
    def wrapped(x):
        y = fn(variables, x)
        return dict(zip(output_names, y)) if len(output_names) > 1 else {output_names[0]: y}

    return wrapped


def representative_inputs(
    net: Net, variables: Mapping[str, Any], plans: Iterable[SignaturePlan], x: np.ndarray
) -> dict[str, np.ndarray]:
    """Real inputs of every signature, from images `x` run through the JAX model."""
    out: dict[str, np.ndarray] = {}
    acts: dict[int, np.ndarray] = {0: x.astype(np.float32)}
    for plan in plans:
        if plan.kind == "full":
            out[plan.name] = acts[0]
        elif plan.kind == "segment":
            out[plan.name] = acts[plan.start]
            if plan.stop < len(net.layers):
                acts[plan.stop] = jax_outputs(net, variables, plan, acts[plan.start])
        else:
            out[plan.name] = acts[plan.start]
    return out
