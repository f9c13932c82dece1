"""Low-bit weights for an exported fp32 TFLite model, through ``litert-quantizer``.

``litert-quantizer`` (PyPI ``litert-quantizer==0.11.0``, the maintained LiteRT
post-training quantizer; it pins ``ai-edge-litert==2.3.0`` as this project does)
rewrites an fp32 ``.tflite`` flatbuffer: per TFLite op type, weights become
2/4/8-bit integers, per channel, per tensor or in blocks of 32..256 values along
the input dimension. A *recipe* here is a list of plain-data rules::

    {"op": "FULLY_CONNECTED", "bits": 4, "granularity": "blockwise_32", "mode": "dynamic"}

* ``op``: a TFLite op name (``CONV_2D``, ``DEPTHWISE_CONV_2D``, ``FULLY_CONNECTED``, ...);
* ``bits``: 2, 4 or 8;
* ``granularity``: ``channelwise``, ``tensorwise`` or ``blockwise_{32,64,128,256}``;
* ``mode``: ``dynamic`` (integer weights, activations quantized on the fly by
  the kernel: smaller *and* integer compute) or ``weight_only`` (weights
  dequantized to float before the op: smaller, float compute).

What the quantizer accepts per op is its own policy (``default_policy``); in
0.11.0, blockwise 4-bit weights exist for ``FULLY_CONNECTED`` only, and 4-bit
``CONV_2D`` weights are channelwise. `check_recipe` refuses anything else
before any model is touched, with one line that lists what the op supports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MODES = ("dynamic", "weight_only")
BITS = (2, 4, 8)
GRANULARITIES = (
    "channelwise", "tensorwise", "blockwise_32", "blockwise_64", "blockwise_128", "blockwise_256",
)  # fmt: skip
RULE_KEYS = ("op", "bits", "granularity", "mode")


class QuantizeError(ValueError):
    """A recipe the quantizer cannot apply (a clear, one-line message)."""


def _lib():
    try:  # lazy: litert-quantizer is the optional `train` extra's and slow to import
        from litert_quantizer import qtyping, recipe_manager
    except ImportError as e:  # pragma: no cover - the dependency is pinned in setup.cfg
        raise QuantizeError(
            f"litert-quantizer is not installed ({e}); run: pip install litert-quantizer==0.11.0"
        ) from None
    return qtyping, recipe_manager


def _describe(rule: Mapping[str, Any]) -> str:
    return f"{rule['mode']} int{rule['bits']} {rule['granularity']}"


def supported(op: str) -> list[str]:
    """What the quantizer's policy allows for the weights of TFLite op `op`.

    Entries read ``<mode> int<bits> <granularity>``, e.g. ``dynamic int4 channelwise``.
    """
    qtyping, _ = _lib()
    # lazy: litert-quantizer is the optional `train` extra's and slow to import
    from litert_quantizer.default_policy import DEFAULT_CONFIG_CHECK_POLICY

    try:
        configs = DEFAULT_CONFIG_CHECK_POLICY[qtyping.TFLOperationName(op)]
    except (ValueError, KeyError):
        return []
    out = set()
    for c in configs:
        w = c.weight_tensor_config
        if c.activation_tensor_config is not None or w is None:
            continue  # static (activation-quantized) configs are not weight-only recipes
        if w.dtype != qtyping.TensorDataType.INT or not w.symmetric:
            continue
        if c.compute_precision == qtyping.ComputePrecision.INTEGER and not c.explicit_dequantize:
            mode = "dynamic"
        elif c.compute_precision == qtyping.ComputePrecision.FLOAT and c.explicit_dequantize:
            mode = "weight_only"
        else:
            continue
        gran = str(getattr(w.granularity, "value", w.granularity)).lower()
        out.add(f"{mode} int{w.num_bits} {gran}")
    return sorted(out)


def _normalize(rule: Any, where: str) -> dict[str, Any]:
    if not isinstance(rule, Mapping):
        raise QuantizeError(f"{where}: a rule must be a mapping with keys {', '.join(RULE_KEYS)}")
    unknown = sorted(set(rule) - set(RULE_KEYS))
    missing = [k for k in RULE_KEYS if k not in rule]
    if unknown or missing:
        raise QuantizeError(
            f"{where}: rule keys must be exactly {', '.join(RULE_KEYS)}"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    op, bits = str(rule["op"]).upper(), rule["bits"]
    gran, mode = str(rule["granularity"]).lower(), str(rule["mode"]).lower()
    if mode not in MODES:
        raise QuantizeError(f"{where}: unknown mode {rule['mode']!r}; valid: {', '.join(MODES)}")
    if isinstance(bits, bool) or bits not in BITS:
        raise QuantizeError(f"{where}: bits must be one of {BITS}, got {bits!r}")
    if gran not in GRANULARITIES:
        raise QuantizeError(
            f"{where}: unknown granularity {rule['granularity']!r}; "
            f"valid: {', '.join(GRANULARITIES)}"
        )
    return {"op": op, "bits": int(bits), "granularity": gran, "mode": mode}


def check_recipe(rules: Sequence[Any], name: str = "recipe") -> list[dict[str, Any]]:
    """Normalizes a recipe and checks every rule against the quantizer's own policy.

    Returns the rules with canonical spellings (``op`` upper case, the rest lower case).

    Raises:
      QuantizeError: an empty recipe, a malformed rule, an unknown op / mode /
        granularity, or a combination the quantizer does not support for that
        op (the message lists what it does support).
    """
    qtyping, recipe_manager = _lib()
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence) or not rules:
        raise QuantizeError(f"quantizer recipe {name!r} must be a non-empty list of rules")
    out = []
    manager = recipe_manager.RecipeManager()
    for i, raw in enumerate(rules):
        where = f"quantizer recipe {name!r} rule {i}"
        rule = _normalize(raw, where)
        try:
            op = qtyping.TFLOperationName(rule["op"])
        except ValueError:
            raise QuantizeError(f"{where}: unknown TFLite op {raw['op']!r}") from None
        ok = supported(rule["op"])
        if _describe(rule) not in ok:
            raise QuantizeError(
                f"{where}: litert-quantizer does not support {_describe(rule)} weights on "
                f"{rule['op']}; it supports: {', '.join(ok) or 'nothing (no weights to quantize)'}"
            )
        try:  # the quantizer's own check (the policy above is what it consults)
            _add(manager, qtyping, op, rule)
        except ValueError as e:
            raise QuantizeError(f"{where}: {str(e).splitlines()[0][:300]}") from None
        out.append(rule)
    return out


def _add(manager, qtyping, op, rule: Mapping[str, Any]) -> None:
    """Adds one rule to a `RecipeManager` or a `Quantizer` (the same two methods)."""
    gran = qtyping.QuantGranularity(rule["granularity"].upper())
    add = (
        manager.add_dynamic_config if rule["mode"] == "dynamic" else manager.add_weight_only_config
    )
    # Each op gets its own regex scope entry; ".*" matches every tensor of that op type.
    add(".*", op, rule["bits"], gran)


def quantize(float_model: bytes, rules: Sequence[Any], name: str = "recipe") -> bytes:
    """Applies a recipe (`check_recipe`) to an fp32 TFLite flatbuffer; returns the new flatbuffer.

    Ops the recipe does not name keep float weights. Signatures, input and
    output tensors are unchanged (float32), so the runtime calls the result as
    it calls the original.

    Raises:
      QuantizeError: a bad recipe, or the quantizer failing on this model.
    """
    rules = check_recipe(rules, name)
    qtyping, _ = _lib()
    # lazy: litert-quantizer is the optional `train` extra's and slow to import
    from litert_quantizer import quantizer

    q = quantizer.Quantizer(bytearray(float_model))
    for rule in rules:
        _add(q, qtyping, qtyping.TFLOperationName(rule["op"]), rule)
    try:
        result = q.quantize(enable_progress_bar=False, enable_progress_report=False)
    except (ValueError, RuntimeError) as e:
        raise QuantizeError(
            f"litert-quantizer failed on {name!r}: {str(e).splitlines()[0]}"
        ) from None
    return bytes(result.quantized_model)


_INT8, _INT4 = 9, 17  # TFLite TensorType codes


def _unpack(t, data: bytes) -> np.ndarray:
    """A quantized constant's integer values (INT4: two per byte, low nibble first)."""
    raw = np.frombuffer(data, np.uint8)
    if t.type == _INT8:
        return raw.view(np.int8).astype(np.float32)
    lo, hi = (raw & 0x0F).astype(np.int8), (raw >> 4).astype(np.int8)
    vals = np.stack([lo, hi], 1).reshape(-1)
    vals[vals > 7] -= 16
    return vals.astype(np.float32)


def dequantized_float_model(float_model: bytes, quantized_model: bytes) -> bytes:
    """The fp32 model with every weight the quantizer stored as int8 / int4 replaced by
    its dequantized value (``scale * (q - zero_point)``), still as float32.

    Running this and a *weight-only* quantized model must give the same outputs: the
    difference between it and `float_model` is then the quantization error alone, not
    the runtime's low-bit kernels. Tensors are matched by name (the quantizer keeps them).

    Raises:
      QuantizeError: a quantized weight without a float tensor of the same name and shape.
    """
    # lazy: LiteRT's flatbuffer tools are only needed to rewrite int4 weights
    from ai_edge_litert.tools import flatbuffer_utils as fb

    fm, qm = (
        fb.read_model_from_bytearray(bytearray(float_model)),
        fb.read_model_from_bytearray(bytearray(quantized_model)),
    )
    floats = {t.name: t for t in fm.subgraphs[0].tensors}
    for t in qm.subgraphs[0].tensors:
        data = qm.buffers[t.buffer].data if t.buffer < len(qm.buffers) else None
        if t.type not in (_INT8, _INT4) or data is None or len(data) == 0:
            continue  # not a constant weight
        ref = floats.get(t.name)
        shape = tuple(int(d) for d in t.shape)
        if ref is None or tuple(int(d) for d in ref.shape) != shape:
            raise QuantizeError(f"quantized weight {t.name!r} has no float twin of shape {shape}")
        q = _unpack(t, bytes(data))[: int(np.prod(shape))].reshape(shape)
        qp = t.quantization
        scale = np.asarray(qp.scale, np.float32)
        zero = np.asarray(qp.zeroPoint if qp.zeroPoint is not None else 0, np.float32)
        if scale.size > 1:  # per channel (blockwise scales would need the block layout)
            if scale.size != shape[qp.quantizedDimension]:
                raise QuantizeError(f"weight {t.name!r}: blockwise scales are not supported here")
            bshape = [1] * len(shape)
            bshape[qp.quantizedDimension] = -1
            scale = scale.reshape(bshape)
            zero = zero.reshape(bshape) if zero.size > 1 else zero
        deq = ((q - zero) * scale).astype(np.float32)
        fm.buffers[ref.buffer].data = np.frombuffer(deq.tobytes(), np.uint8)
    return bytes(fb.convert_object_to_bytearray(fm))
