"""Edgent partition signatures: the device runs ``[0, p)``, the edge ``[p, exit]``.

For every exit ``k`` (side exits and ``final``) and every partition point
``p`` the planner may choose (`cut_points`), the partition model holds

* ``dev_pNN``: backbone positions ``[0, p)`` (input: the image; output
  ``activation``), shared by every exit whose path passes ``p``;
* ``edge_<k>_pNN``: positions ``[p, after_k]`` followed by exit ``k``'s head
  (kind ``path``), or for ``final`` positions ``[p, L)``; output ``logits``.
  ``edge_<k>_p00`` is the whole path of exit ``k``: what edge-only runs on the
  edge and device-only runs on the device.

Partition points are layer boundaries where a cut means something on TFLite:
never right before a ``relu`` or ``relu6`` (the converter fuses it into the conv / dense
before it), a ``dropout`` (identity at inference) or a ``flatten`` (a free
reshape: the same bytes as the cut before it). ``p = stop_k`` (after the
exit's backbone position) leaves only the head for the edge; "device-only"
is not a cut point but the planner's own choice of running ``edge_<k>_p00``
on the device.

The manifest section (`export_partitions`) records, per cut point, the
activation that crosses the network (shape, dtype, bytes) and, per layer, the
descriptors the runtime's latency model needs (`runtime.latency_model`), so
the runtime predicts every partition's latency without importing flexjax.

**Cut-tensor encodings** (`measure_encodings`, when calibration and
validation frames are given). A cut tensor may travel as float32, float16 or
int8 (`runtime.encoding`). For every cut with an edge signature, int8's
per-tensor scale and zero point are calibrated on the activations the
exported device prefix computes there for calibration frames (training
images), then every encoding's effect is *measured*: over validation frames,
device prefix -> encode -> decode -> edge path of every exit reading that
cut, in LiteRT, scored against the labels (accuracy) and against the float32
path (top-1 agreement). Stored per cut as
``activations[cut].encodings = [{name, scale, zero_point (int8), bytes,
exits: {exit: {accuracy, agreement}}}]`` (float32 first), with
``encoding_eval`` (frame counts); the planner (`runtime.planner`) chooses
exit, partition and encoding from them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from export import convert
from export.staging import ExportError
from flexjax.spec import FINAL, Layer, Net, infer_shapes
from runtime import names
from runtime.encoding import ENCODINGS, calibrate
from runtime.lite import Model

ENCODING_FRAMES = 256  # validation frames the encodings' accuracy effect is measured on

# Layers a partition point never precedes (see the module docstring).
_NO_CUT_BEFORE = ("relu", "relu6", "dropout", "flatten")
# Activations fused by the TFLite converter into the layer before them.
_FUSES_INTO = ("conv", "dense", "low_rank_conv", "low_rank_dense", "batch_norm")
# Inference batch norm after a conv is a per-channel scale and shift the converter folds
# into the conv's weights and bias.
_BN_FOLDS_INTO = ("conv",)


def cut_points(net: Net, allowed: Sequence[int] | None = None) -> list[int]:
    """Every partition point of the backbone, ``0 .. L`` (``L``: nothing on the edge).

    `allowed` (e.g. block boundaries) keeps only those interior points; 0 and L stay.

    Raises:
      ValueError: an allowed point that is not a partition point of `net`.
    """
    n = len(net.layers)
    every = [p for p in range(n + 1) if p in (0, n) or net.layers[p].kind not in _NO_CUT_BEFORE]
    if allowed is None:
        return every
    bad = sorted(set(allowed) - set(every))
    if bad:
        raise ValueError(f"partition point {bad[0]} is not a cut point of the net; valid: {every}")
    return sorted({0, n, *allowed})


def exit_stop(net: Net, name: str) -> int:
    """One past the backbone position exit `name` reads (``L`` for ``final``)."""
    return len(net.layers) if name == FINAL else net.exit_position(name) + 1


def plan_partitions(net: Net, cuts: Sequence[int] | None = None) -> list[convert.SignaturePlan]:
    """The device-prefix and edge-path signatures of `net`, device prefixes first."""
    shapes = net.shapes()
    cuts = cut_points(net, cuts)
    n = len(net.layers)

    def act(p: int) -> tuple[int, ...]:
        return tuple(net.input_shape) if p == 0 else tuple(shapes[p - 1][1])

    logits = (net.num_classes,)
    plans = [
        convert.SignaturePlan(
            names.device_name(p), "segment", 0, p, FINAL, "x", "activation", act(0), act(p)
        )
        for p in cuts
        if 0 < p < n
    ]
    for name in net.exit_names:
        stop = exit_stop(net, name)
        for p in cuts:
            if p > stop or p == n:
                continue
            kind = "segment" if name == FINAL else "path"
            plans.append(
                convert.SignaturePlan(names.edge_name(name, p), kind, p, stop, name, "x", "logits",
                                      act(p), logits)
            )  # fmt: skip
    return plans


def layer_rows(layers: tuple[Layer, ...], input_shape: tuple[int, ...]) -> list[dict]:
    """Latency-model descriptors of a layer sequence (kind, shapes, window, fused)."""
    rows = []
    prev = None
    for layer, (sin, sout) in zip(layers, infer_shapes(layers, input_shape)):
        row: dict[str, Any] = {
            "kind": layer.kind,
            "in_shape": list(sin),
            "out_shape": list(sout),
            "fused": (layer.kind in ("relu", "relu6") and prev in _FUSES_INTO)
            or (layer.kind == "batch_norm" and prev in _BN_FOLDS_INTO),
        }
        for arg in ("kernel", "stride", "window", "features", "groups", "skip"):
            if layer.get(arg) is not None:
                v = layer[arg]
                row[arg] = list(v) if isinstance(v, tuple) else v
        if layer.kind == "mbconv":  # its body, for a latency model of the parts
            row["body"] = layer_rows(layer.branches[0], tuple(sin))
        rows.append(row)
        prev = layer.kind
    return rows


def layer_table(net: Net) -> dict[str, list[dict]]:
    """Per-layer descriptors: ``{"backbone": [...], <exit name>: [head layers...]}``."""
    shapes = net.shapes()
    table = {"backbone": layer_rows(net.layers, tuple(net.input_shape))}
    for e in net.exits:
        table[e.name] = layer_rows(e.layers, tuple(shapes[e.after][1]))
    return table


def manifest_section(
    net: Net, plans: list[convert.SignaturePlan], model_file: str,
    cuts: Sequence[int] | None = None,
) -> dict:  # fmt: skip
    """The ``partitions`` manifest section for `plans` stored in `model_file`."""
    shapes = net.shapes()
    cuts = cut_points(net, cuts)
    n = len(net.layers)
    acts = {}
    for p in cuts:
        shape = tuple(net.input_shape) if p == 0 else tuple(shapes[p - 1][1])
        acts[names.cut_key(p)] = {
            "shape": [1, *shape],
            "dtype": "float32",
            "bytes": 4 * math.prod(shape),
        }
    by_name = {pl.name: pl for pl in plans}
    exits = []
    for name in net.exit_names:
        stop = exit_stop(net, name)
        edge = {names.cut_key(p): names.edge_name(name, p) for p in cuts if p <= stop and p < n}
        exits.append({"name": name, "stop": stop, "edge": edge})
    return {
        "model": model_file,
        "cut_points": cuts,
        "layers": len(net.layers),
        "device": {names.cut_key(p): names.device_name(p) for p in cuts if 0 < p < n},
        "exits": exits,
        "activations": acts,
        "layer_table": layer_table(net),
        "signatures": {name: pl.to_dict() for name, pl in by_name.items()},
        "logits_bytes": 4 * net.num_classes,
    }


def export_partitions(
    net: Net,
    variables: Mapping[str, Any],
    directory: str,
    *,
    precision: str = "fp32",
    check_x: np.ndarray | None = None,
    check_logits: Mapping[str, np.ndarray] | None = None,
    tolerance: float = 1e-4,
    calibration_x: np.ndarray | None = None,
    validation: tuple[np.ndarray, np.ndarray] | None = None,
    encoding_frames: int = ENCODING_FRAMES,
    cuts: Sequence[int] | None = None,
    log=print,
) -> dict:
    """Writes ``partitions.tflite`` into `directory`; returns its manifest section.

    Args:
      check_x, check_logits: images and the already parity-checked logits of
        every exit on them (the main model's); every device + edge pair is run
        on them in LiteRT and must reproduce those logits (fp32: within
        `tolerance`; other precisions: same top-1).
      calibration_x, validation: calibration images and ``(images, labels)``
        of the validation split; when both are given every cut's encodings are
        calibrated and measured (`measure_encodings`, on at most
        `encoding_frames` validation frames).
      cuts: interior partition points to export (`cut_points`); None = every one.

    Raises:
      ValueError: int8 (partitions would need per-cut calibration data).
      export.bundle.ExportError: a partition pair does not reproduce its exit's logits.
    """
    if precision == "int8":
        raise ValueError("partition signatures support fp32, fp16 and dynamic precision, not int8")
    plans = plan_partitions(net, cuts)
    buf = convert.to_tflite(net, variables, plans, precision=precision)
    path = os.path.join(directory, names.PARTITIONS_FILE)
    with open(path, "wb") as f:
        f.write(buf)
    section = manifest_section(net, plans, names.PARTITIONS_FILE, cuts)
    log(f"partitions: {len(plans)} signatures, {len(buf):,} bytes")
    if check_x is not None and check_logits is not None:
        section["parity"] = _check_pairs(path, section, check_x, check_logits, precision, tolerance)
    if calibration_x is not None and validation is not None:
        vx, vy = validation
        n = min(len(vx), encoding_frames)
        measure_encodings(Model(path), section, calibration_x, vx[:n], vy[:n])
        measured = sum("encodings" in a for a in section["activations"].values())
        log(f"partitions: {', '.join(ENCODINGS)} measured at {measured} cuts on {n} validation "
            f"frames (int8 calibrated on {len(calibration_x)})")  # fmt: skip
    return section


def measure_encodings(
    model: Model, section: dict, calibration_x: np.ndarray, val_x: np.ndarray, val_y: np.ndarray
) -> dict:
    """Calibrates int8 at every cut and measures each encoding's accuracy effect, in place.

    For each cut with an edge signature: the device prefix's activations on
    `calibration_x` give int8's scale / zero point (the input itself at cut 0);
    on `val_x` each encoding's round trip feeds every exit's edge path at that
    cut, scored against `val_y` (accuracy) and the float32 predictions
    (agreement). Adds ``encodings`` to ``section["activations"][cut]`` and
    ``section["encoding_eval"]``; returns the section.

    Raises:
      ValueError: no calibration or validation frames.
    """
    if len(calibration_x) == 0 or len(val_x) == 0 or len(val_x) != len(val_y):
        raise ValueError("encodings need calibration frames and labelled validation frames")
    readers: dict[str, list[tuple[str, str]]] = {}
    for e in section["exits"]:
        for p, edge in e["edge"].items():
            readers.setdefault(p, []).append((e["name"], edge))
    labels = np.asarray(val_y)
    for p, exits in readers.items():
        dev = section["device"].get(p)
        calib = _activations(model, dev, calibration_x)
        val = _activations(model, dev, val_x)
        shape = section["activations"][p]["shape"]
        entries, ref = [], {}
        for name in ENCODINGS:
            enc = calibrate(name, calib)
            decoded = [enc.roundtrip(a) for a in val]
            effects = {}
            for exit_name, edge in exits:
                sig = model.signature(edge)
                pred = np.array([int(sig(a).argmax()) for a in decoded])
                ref.setdefault(exit_name, pred)  # float32 comes first
                effects[exit_name] = {
                    "accuracy": float(np.mean(pred == labels)),
                    "agreement": float(np.mean(pred == ref[exit_name])),
                }
            entries.append({**enc.to_json(), "bytes": enc.nbytes(shape), "exits": effects})
        section["activations"][p]["encodings"] = entries
    section["encoding_eval"] = {
        "calibration_frames": int(len(calibration_x)),
        "validation_frames": int(len(val_x)),
    }
    return section


def _activations(model: Model, dev_sig: str | None, xs: np.ndarray) -> list[np.ndarray]:
    """What crosses the cut for each image: the device prefix's output (the image at cut 0)."""
    out = []
    for x in xs:
        h = np.ascontiguousarray(np.asarray(x, np.float32)[None])
        out.append(model.signature(dev_sig)(h) if dev_sig else h)
    return out


def _check_pairs(path, section, xs, ref, precision, tolerance) -> dict:
    model = Model(path)
    worst = 0.0
    for e in section["exits"]:
        for p, edge in e["edge"].items():
            dev = section["device"].get(p)
            got = []
            for x in xs:
                h = np.ascontiguousarray(x[None], np.float32)
                if dev:
                    h = model.signature(dev)(h)
                got.append(model.signature(edge)(h)[0])
            got = np.stack(got)
            want = ref[e["name"]][: len(xs)]
            diff = float(np.abs(got - want).max())
            worst = max(worst, diff)
            bad = (
                diff > tolerance
                if precision == "fp32"
                else (got.argmax(-1) != want.argmax(-1)).any()
            )
            if bad:
                raise ExportError(
                    f"partition {dev or 'input'} -> {edge} does not reproduce {e['name']}'s "
                    f"logits (max |d| = {diff:.2e})"
                )
    return {"examples": int(len(xs)), "max_abs_diff": worst, "precision": precision}
