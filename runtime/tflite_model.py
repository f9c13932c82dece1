"""Read a TFLite flatbuffer per signature and check GPU-delegate compatibility.

`read_model(data)` (alias `gpu_report`) parses the ``.tflite`` bytes with the flatbuffer
bindings that ship with ``ai_edge_litert`` (``schema_py_generated``; no interpreter, no
TensorFlow) and returns one `SignatureInfo` per signature: its input/output tensors, the op
histogram and maximum tensor rank of its subgraph, and whether the LiteRT GPU delegate would
take every op of that subgraph.

The GPU check is ours because ``tf.lite.experimental.Analyzer(gpu_compatibility=True)`` is a
no-op in TF 2.21. It mirrors ``CheckGpuDelegateCompatibility`` in
``tensorflow/lite/tools/versioning/gpu_compatibility.cc`` (the op checks that used to live in
``TFLiteOperationParser::IsSupported`` of ``delegates/gpu/common/model_builder.cc``) plus the
tensor-type filter that ``GetOpsToReplace`` applies in ``model_builder.cc``. An op is
compatible when all of these hold:

* its builtin code is in `GPU_OPS` (CUSTOM ops and all STABLEHLO_* ops never are);
* no input/output tensor has rank > 4 or a dynamic (-1) dimension;
* every non-constant input/output tensor is float32/float16, or int8/uint8 (the delegate
  handles quantized models; its quantized-model option is on by default), with the
  op-specific exceptions the source allows (CAST, comparisons -> bool, SELECT(_V2)
  conditions, LOGICAL_AND, GATHER indices);
* the per-op constraints below that we do check.

Per-op constraints checked (from gpu_compatibility.cc): input/output counts (runtime vs.
constant inputs) for ADD/ADD_N/MUL, pools, convolutions, RESHAPE, TRANSPOSE, TILE, PAD*,
RESIZE_*, unary and binary elementwise ops, MEAN and the REDUCE_* ops, QUANTIZE, DEQUANTIZE,
DENSIFY, BATCH_MATMUL, SELECT(_V2), CAST, CUMSUM, GATHER; fused SIGN_BIT activation; SOFTMAX
beta == 1; STRIDED_SLICE without ellipsis/new-axis/shrink-axis masks and on rank 3/4 inputs;
SLICE on rank 3/4 inputs; constant int32 axes for MEAN/SUM/REDUCE_*; paddings of shape 3x2 or
4x2 and REFLECT mode for MIRROR_PAD; FULLY_CONNECTED default weights format, non-constant
input and keep_num_dims only without a rank change; GATHER 1-D int32 indices and non-int32
params; DEPTHWISE_CONV_2D rank-4 tensors and depth multiplier 1 unless the input has one
channel; MUL broadcasting (one operand not smaller in every dimension); CAST type pairs;
CUMSUM float data and a constant int32 axis; DEPTH_TO_SPACE/SPACE_TO_DEPTH block size > 1;
RESIZE_BILINEAR not both align_corners and half_pixel_centers; DEQUANTIZE not from int16.

As the delegate's FP16 partition helper does, the output of a DEQUANTIZE of a constant
float16 tensor (fp16 weight quantization) counts as a constant.

Known but NOT checked (all conservative towards "incompatible" or harmless for our exports):

* LSTM and ONE_HOT are supported by the delegate under detailed constraints we do not
  encode, so they are left out of `GPU_OPS` (reported as incompatible);
* the delegate accepts a few MediaPipe custom ops (Convolution2DTransposeBias,
  MaxPoolingWithArgmax2D, MaxUnpooling2D, Resampler); every CUSTOM op is reported here;
* the delegate's newer 5-D (BHWDC) support for some ops is ignored: rank > 4 is reported;
* SELECT_V2 broadcasting of its value operands; strides/dilations/kernels being positive
  (always true in a converter-produced model); op version limits; backend-specific limits
  (OpenCL vs. OpenGL vs. Metal, texture sizes, precision), and whether the delegate
  partitions the graph so that *all* of it runs on the GPU (we report per op, not per
  partition).

Corrupt input raises `ModelFormatError` (a `ValueError`) with a one-line message: the header
(size, file identifier ``TFL3``, root offset, vtable) and every table and vector we touch are
bounds-checked before use, and any exception from the generated accessors is wrapped.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator, Sequence
from typing import Any

from ai_edge_litert import schema_py_generated as _fb

__all__ = [
    "GPU_OPS",
    "ModelFormatError",
    "SignatureInfo",
    "TensorInfo",
    "gpu_report",
    "read_model",
]

_IDENTIFIER = b"TFL3"
_SCHEMA_VERSION = 3
_MAX_RANK = 4  # the GPU delegate's tensors are at most BHWC
_NAME_LIMIT = 60  # tensor names in reasons are truncated to this many characters
# Work budget: vector elements + tables + string words a read may visit. A file visits each of
# its own elements once at most, so anything beyond this is a DAG (shared references).
_WORK_PER_BYTE = 1
_WORK_BASE = 1 << 16
# Tensor allocation caps: what LiteRT may be asked to allocate for the model's tensors.
MAX_TENSOR_BYTES = 1 << 30  # any one tensor
MAX_TOTAL_TENSOR_BYTES = 4 << 30  # all tensors of all subgraphs together
# Bytes per element by TensorType name (sub-byte types rounded up; unknown types count 16).
_ITEM_BYTES = {
    "FLOAT32": 4, "FLOAT16": 2, "INT32": 4, "UINT8": 1, "INT64": 8, "STRING": 16, "BOOL": 1,
    "INT16": 2, "COMPLEX64": 8, "INT8": 1, "FLOAT64": 8, "COMPLEX128": 16, "UINT64": 8,
    "RESOURCE": 16, "VARIANT": 16, "UINT32": 4, "UINT16": 2, "INT4": 1, "BFLOAT16": 2,
    "INT2": 1, "UINT4": 1, "FLOAT8_E4M3FN": 1, "FLOAT8_E5M2": 1,
}  # fmt: skip


class ModelFormatError(ValueError):
    """The bytes are not a well-formed TFLite flatbuffer (message is one line)."""


# BuiltinOperator int -> enum name, reflected from the schema bindings (so new ops are named).
_OP_NAMES: dict[int, str] = {
    value: key
    for key, value in vars(_fb.BuiltinOperator).items()
    if key.isupper() and isinstance(value, int)
}
_TYPE_NAMES: dict[int, str] = {
    value: key
    for key, value in vars(_fb.TensorType).items()
    if key.isupper() and isinstance(value, int)
}
# TensorType name -> numpy dtype name (types numpy lacks keep a lower-case schema name).
_NUMPY_NAMES = {"STRING": "object", "BOOL": "bool"}


def _dtype_name(type_code: int) -> str:
    name = _TYPE_NAMES.get(type_code, f"unknown_{type_code}")
    return _NUMPY_NAMES.get(name, name.lower())


# Builtin ops the LiteRT GPU delegate can take, from the `CheckGpuDelegateCompatibility`
# switch in tensorflow/lite/tools/versioning/gpu_compatibility.cc (tensorflow/tensorflow @
# 057f8c812fb07bc803592c058b8b6e8569b4734f; the delegate's model_builder.cc calls it from
# IsSupported), cross-read with the `NewOperationParser` switch of
# tensorflow/lite/delegates/gpu/common/model_builder.cc and the "GPU delegates for LiteRT"
# supported-ops page. Deliberately left out (conservative): LSTM and ONE_HOT (constraints not
# encoded here) and CUSTOM (only four MediaPipe custom ops are supported).
GPU_OPS: frozenset[str] = frozenset(
    {
        # Convolution, pooling, dense.
        "CONV_2D",
        "DEPTHWISE_CONV_2D",
        "TRANSPOSE_CONV",
        "FULLY_CONNECTED",
        "BATCH_MATMUL",
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        # Activations.
        "RELU",
        "RELU6",
        "RELU_N1_TO_1",
        "LEAKY_RELU",
        "PRELU",
        "HARD_SWISH",
        "LOGISTIC",
        "TANH",
        "ELU",
        "GELU",
        "SOFTMAX",
        # Unary elementwise.
        "ABS",
        "COS",
        "EXP",
        "FLOOR",
        "LOG",
        "NEG",
        "RSQRT",
        "SIGN",
        "SIN",
        "SQRT",
        "SQUARE",
        # Binary elementwise and comparisons.
        "ADD",
        "ADD_N",
        "SUB",
        "MUL",
        "DIV",
        "POW",
        "MAXIMUM",
        "MINIMUM",
        "SQUARED_DIFFERENCE",
        "FLOOR_DIV",
        "FLOOR_MOD",
        "EQUAL",
        "NOT_EQUAL",
        "GREATER",
        "GREATER_EQUAL",
        "LESS",
        "LESS_EQUAL",
        "LOGICAL_AND",
        "SELECT",
        "SELECT_V2",
        # Reductions.
        "MEAN",
        "SUM",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "REDUCE_PROD",
        "CUMSUM",
        # Shape and data movement.
        "RESHAPE",
        "TRANSPOSE",
        "CONCATENATION",
        "PACK",
        "SPLIT",
        "SPLIT_V",
        "SLICE",
        "STRIDED_SLICE",
        "TILE",
        "PAD",
        "PADV2",
        "MIRROR_PAD",
        "GATHER",
        "DEPTH_TO_SPACE",
        "SPACE_TO_DEPTH",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "CAST",
        # Quantized / compressed models.
        "QUANTIZE",
        "DEQUANTIZE",
        "DENSIFY",
    }
)

_UNARY_ELEMENTWISE = frozenset(
    {
        "ABS",
        "COS",
        "ELU",
        "EXP",
        "FLOOR",
        "GELU",
        "LOG",
        "LOGISTIC",
        "NEG",
        "RSQRT",
        "SIGN",
        "SIN",
        "SQRT",
        "SQUARE",
        "TANH",
    }
)
_BINARY_ELEMENTWISE = frozenset(
    {
        "DIV",
        "EQUAL",
        "FLOOR_DIV",
        "FLOOR_MOD",
        "GREATER",
        "GREATER_EQUAL",
        "LOGICAL_AND",
        "LESS",
        "LESS_EQUAL",
        "MAXIMUM",
        "MINIMUM",
        "NOT_EQUAL",
        "POW",
        "SQUARED_DIFFERENCE",
        "SUB",
    }
)
_BOOL_OUTPUT = frozenset(
    {"EQUAL", "NOT_EQUAL", "GREATER", "GREATER_EQUAL", "LESS", "LESS_EQUAL", "LOGICAL_AND"}
)
_ONE_IN_ONE_OUT = frozenset(
    {
        "RESHAPE",
        "TRANSPOSE",
        "TILE",
        "RESIZE_BILINEAR",
        "RESIZE_NEAREST_NEIGHBOR",
        "HARD_SWISH",
        "DEPTH_TO_SPACE",
        "SPACE_TO_DEPTH",
        "QUANTIZE",
        "CAST",
        "AVERAGE_POOL_2D",
        "MAX_POOL_2D",
        "PAD",
        "PADV2",
        "MIRROR_PAD",
        "SUM",
        "REDUCE_MAX",
        "REDUCE_MIN",
        "REDUCE_PROD",
    }
)
_FUSED_ACTIVATION_OPTIONS = {
    "CONV_2D": _fb.Conv2DOptions,
    "DEPTHWISE_CONV_2D": _fb.DepthwiseConv2DOptions,
    "AVERAGE_POOL_2D": _fb.Pool2DOptions,
    "MAX_POOL_2D": _fb.Pool2DOptions,
    "MUL": _fb.MulOptions,
    "SUB": _fb.SubOptions,
    "DIV": _fb.DivOptions,
}
# Inputs an op may leave out (index -1), from the kernels in tensorflow/lite/kernels (bias of
# convolutions and dense layers); the recurrent ops have many optional inputs. Anything else
# absent is refused: kernels read required inputs without a null check (a crafted -1 there
# crashes LiteRT).
_OPTIONAL_INPUTS: dict[str, tuple[int, ...] | str] = {
    "CONV_2D": (2,),
    "DEPTHWISE_CONV_2D": (2,),
    "FULLY_CONNECTED": (2,),
    "TRANSPOSE_CONV": (3,),
    "CONV_3D": (2,),
    "CONV_3D_TRANSPOSE": (3,),
    "LSTM": "any",
    "UNIDIRECTIONAL_SEQUENCE_LSTM": "any",
    "BIDIRECTIONAL_SEQUENCE_LSTM": "any",
    "SVDF": "any",
    "UNIDIRECTIONAL_SEQUENCE_RNN": "any",
    "BIDIRECTIONAL_SEQUENCE_RNN": "any",
    "RNN": "any",
}
# Types whose constant data has a fixed size per element (LiteRT checks it for these).
_FIXED_SIZE = frozenset(
    {"FLOAT32", "FLOAT16", "INT32", "UINT8", "INT64", "BOOL", "INT16", "COMPLEX64", "INT8",
     "FLOAT64", "COMPLEX128", "UINT64", "UINT32", "UINT16", "BFLOAT16"}
)  # fmt: skip
_RUNTIME_TYPES = frozenset({"FLOAT32", "FLOAT16", "INT8", "UINT8"})
_FLOAT_TYPES = frozenset({"FLOAT32", "FLOAT16"})


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """One signature input or output.

    Attributes:
      name: the signature's key for the tensor (what ``get_signature_runner`` takes).
      shape: the shape signature (-1 marks a dynamic dimension), else the static shape.
      dtype: numpy dtype name, e.g. ``"float32"``, ``"int8"``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclasses.dataclass(frozen=True)
class SignatureInfo:
    """What one signature's subgraph contains and whether the GPU delegate takes all of it.

    Attributes:
      name: signature key.
      subgraph: index of the subgraph the signature runs.
      inputs, outputs: the signature's tensors, in flatbuffer order.
      ops: builtin op name (custom ops as ``CUSTOM:<code>``) -> count in the subgraph.
      max_rank: the largest rank of any tensor the subgraph's ops or I/O use.
      gpu_compatible: every op of the subgraph passes the GPU check (module docstring).
      gpu_offending: why not: unsupported op names, or ``"OP (reason)"``, de-duplicated in
        op order.
    """

    name: str
    subgraph: int
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    ops: dict[str, int]
    max_rank: int
    gpu_compatible: bool
    gpu_offending: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "name": self.name,
            "subgraph": self.subgraph,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "ops": dict(self.ops),
            "max_rank": self.max_rank,
            "gpu_compatible": self.gpu_compatible,
            "gpu_offending": list(self.gpu_offending),
        }


# ----------------------------------------------------------------------------- parsing


class _Reader:
    """Bounds-checked access to the generated flatbuffer accessors."""

    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.size = len(buf)
        self.budget = _WORK_PER_BYTE * len(buf) + _WORK_BASE
        self.tensor_bytes = 0  # summed over every tensor read (`MAX_TOTAL_TENSOR_BYTES`)

    def spend(self, work: int) -> None:
        """Charges `work` units to the budget; a DAG that amplifies the file runs out of it."""
        self.budget -= work
        if self.budget < 0:
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: it references more data than the file holds "
                f"({self.size} bytes; crafted?)"
            )

    def table(self, obj: Any, what: str) -> Any:
        """Checks that `obj`'s table and its vtable lie inside the buffer; returns `obj`."""
        self.spend(1)
        if obj is None:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: missing {what}")
        tab = obj._tab if hasattr(obj, "_tab") else obj
        pos = tab.Pos
        if pos < 0 or pos + 4 > self.size:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} at {pos} is out of range")
        vtable = pos - struct.unpack_from("<i", self.buf, pos)[0]
        if vtable < 0 or vtable + 4 > self.size or vtable % 2:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} has a bad vtable")
        vt_size, obj_size = struct.unpack_from("<HH", self.buf, vtable)
        if vt_size < 4 or vt_size % 2 or vtable + vt_size > self.size or pos + obj_size > self.size:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} has a bad vtable")
        return obj

    def length(self, n: int, elem_size: int, what: str) -> int:
        """Checks a vector length against the buffer size (so loops stay bounded)."""
        if n < 0 or n * elem_size > self.size:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} has length {n}")
        return n

    def items(self, obj: Any, name: str, elem_size: int, what: str) -> Iterator[Any]:
        """Yields ``obj.<name>(j)`` for every element of a vector field.

        The last element is read first, so a vector running past the end of the buffer fails
        (struct.error, wrapped by `read_model`) before any element is used.
        """
        n = self.length(getattr(obj, name + "Length")(), elem_size, what)
        self.spend(n)
        get = getattr(obj, name)
        if n:
            get(n - 1)
        for j in range(n):
            yield get(j)

    def text(self, obj: Any, slot: int, what: str) -> str:
        """The string field at vtable `slot` of `obj` ("" when absent), bounds-checked.

        The generated accessors slice strings without checking their length, so this reads
        the field itself; slots are the schema's field ids (2 * id + 4), fixed by flatbuffers'
        compatibility rules.
        """
        tab = obj._tab
        o = tab.Offset(slot)
        if not o:
            return ""
        off = tab.Pos + o
        if off + 4 > self.size:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} is out of range")
        off += struct.unpack_from("<I", self.buf, off)[0]
        if off + 4 > self.size:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} is out of range")
        (n,) = struct.unpack_from("<I", self.buf, off)
        if off + 4 + n > self.size:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: {what} runs past the end")
        self.spend(1 + n // 4)
        return self.buf[off + 4 : off + 4 + n].decode("utf-8")


@dataclasses.dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    type_name: str  # TensorType enum name, e.g. "FLOAT32"
    dtype: str  # numpy dtype name, e.g. "float32"
    const: bool
    variable: bool = False

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def dynamic(self) -> bool:
        return any(d < 0 for d in self.shape)

    def label(self) -> str:
        name = self.name
        if len(name) > _NAME_LIMIT:
            name = name[: _NAME_LIMIT - 3] + "..."
        return f"'{name}'"


@dataclasses.dataclass
class _Op:
    name: str
    inputs: list[_Tensor | None]  # None: optional input left out (index -1)
    outputs: list[_Tensor]
    options: Any  # flatbuffers Table of the builtin options, or None
    options_type: int  # its BuiltinOptions union tag


def _check_header(data: bytes) -> None:
    if len(data) < 8:
        raise ModelFormatError(f"not a TFLite flatbuffer: truncated ({len(data)} bytes)")
    ident = data[4:8]
    if ident != _IDENTIFIER:
        raise ModelFormatError(
            f"not a TFLite flatbuffer: file identifier {ident!r} at bytes 4..8, "
            f"expected {_IDENTIFIER!r}"
        )
    (root,) = struct.unpack_from("<I", data, 0)
    if root < 8 or root % 4 or root + 4 > len(data):
        raise ModelFormatError(
            f"corrupt TFLite flatbuffer: root offset {root} out of range for {len(data)} bytes"
        )


def _read_buffers(r: _Reader, model: Any) -> list[int]:
    """Per buffer: how many bytes of data it holds (> 0: a tensor using it is a constant)."""
    has_data = []
    for b in r.items(model, "Buffers", 4, "buffers"):
        r.table(b, "buffer")
        n = r.length(b.DataLength(), 1, "buffer data")
        if n:
            b.Data(n - 1)  # the data must lie inside the buffer
        offset, size = b.Offset(), b.Size()
        if offset > 1 and offset + size > r.size:
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: buffer data at {offset}+{size} past {r.size} bytes"
            )
        has_data.append(n if n else size if offset > 1 else 0)
    return has_data


def _read_tensors(r: _Reader, sub: Any, sg: int, has_data: list[int]) -> list[_Tensor]:
    tensors = []
    for t in r.items(sub, "Tensors", 4, f"subgraph {sg} tensors"):
        r.table(t, f"subgraph {sg} tensor")
        shape = tuple(r.items(t, "Shape", 4, "tensor shape"))
        signature = tuple(r.items(t, "ShapeSignature", 4, "tensor shape signature"))
        code = t.Type()
        type_name = _TYPE_NAMES.get(code, f"UNKNOWN_{code}")
        _charge_tensor(r, shape, signature, type_name, sg)
        static = shape
        if signature:
            if len(signature) != len(shape) or any(
                s not in (-1, d) for s, d in zip(signature, shape)
            ):
                raise ModelFormatError(
                    f"corrupt TFLite flatbuffer: subgraph {sg} tensor shape {list(shape)[:8]} "
                    f"disagrees with its shape signature {list(signature)[:8]}"
                )
            shape = signature
        buffer = t.Buffer()
        if buffer >= len(has_data):
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: tensor refers to buffer {buffer} of {len(has_data)}"
            )
        const = buffer > 0 and has_data[buffer] > 0 and not t.IsVariable()
        name = r.text(t, 10, "tensor name")
        if const and type_name in _FIXED_SIZE and t.Sparsity() is None:
            # LiteRT's SetTensorParametersReadOnly: the data is exactly the tensor's bytes.
            want = _ITEM_BYTES[type_name] * _product(static)
            if has_data[buffer] != want:
                raise ModelFormatError(
                    f"corrupt TFLite flatbuffer: constant tensor {name[:_NAME_LIMIT]!r} of "
                    f"shape {list(static)[:8]} has {has_data[buffer]} bytes of data, needs {want}"
                )
        tensors.append(
            _Tensor(name, shape, type_name, _dtype_name(code), const, bool(t.IsVariable()))
        )
    return tensors


def _charge_tensor(
    r: _Reader, shape: tuple[int, ...], signature: tuple[int, ...], type_name: str, sg: int
) -> None:
    """Static dims are >= 0, signature dims >= -1, and the tensor's bytes fit the caps."""
    if any(d < 0 for d in shape) or any(d < -1 for d in signature):
        raise ModelFormatError(
            f"corrupt TFLite flatbuffer: subgraph {sg} tensor has a negative dimension"
        )
    n = _ITEM_BYTES.get(type_name, 16)
    for d in shape:
        n *= d
        if n > MAX_TENSOR_BYTES:
            raise ModelFormatError(
                f"TFLite model asks for a tensor of shape {list(shape)[:8]} ({type_name.lower()})"
                f" in subgraph {sg}: more than {MAX_TENSOR_BYTES >> 20} MiB (crafted?)"
            )
    r.tensor_bytes += n
    if r.tensor_bytes > MAX_TOTAL_TENSOR_BYTES:
        raise ModelFormatError(
            f"TFLite model's tensors need more than {MAX_TOTAL_TENSOR_BYTES >> 30} GiB (crafted?)"
        )


def _product(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _check_data_flow(sg: int, ops: list[_Op], ins: list[_Tensor], outs: list[_Tensor]) -> None:
    """Every tensor an op reads holds data by then (LiteRT: "Input tensor N lacks data").

    Data comes from a subgraph input, a constant, a variable or an earlier op's output; the
    subgraph's outputs must hold data after the last op.
    """
    for t in ins:
        if t.const:
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: subgraph {sg} input {t.label()} is a constant"
            )
    ready = {id(t) for t in ins}
    for i, op in enumerate(ops):
        optional = _OPTIONAL_INPUTS.get(op.name, ())
        for j, t in enumerate(op.inputs):
            if t is None and optional != "any" and j not in optional:
                raise ModelFormatError(
                    f"corrupt TFLite flatbuffer: subgraph {sg} op {i} ({op.name}) lacks input "
                    f"{j}, which is not optional"
                )
        for t in op.outputs:
            if t.const:
                raise ModelFormatError(
                    f"corrupt TFLite flatbuffer: subgraph {sg} op {i} ({op.name}) writes the "
                    f"constant {t.label()}"
                )
        for t in op.inputs:
            if t is not None and not (t.const or t.variable or id(t) in ready):
                raise ModelFormatError(
                    f"corrupt TFLite flatbuffer: subgraph {sg} op {i} ({op.name}) reads "
                    f"tensor {t.label()} before anything writes it"
                )
        ready.update(id(t) for t in op.outputs)
    for t in outs:
        if not (t.const or t.variable or id(t) in ready):
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: subgraph {sg} output {t.label()} is never written"
            )


def _tensor_refs(r: _Reader, obj: Any, name: str, tensors: list[_Tensor], what: str) -> list:
    out: list[_Tensor | None] = []
    for idx in r.items(obj, name, 4, what):
        if idx == -1:
            out.append(None)
        elif 0 <= idx < len(tensors):
            out.append(tensors[idx])
        else:
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: {what} refers to tensor {idx} of {len(tensors)}"
            )
    return out


def _op_names(r: _Reader, model: Any) -> list[str]:
    names = []
    for code in r.items(model, "OperatorCodes", 4, "operator codes"):
        r.table(code, "operator code")
        builtin = max(code.DeprecatedBuiltinCode(), code.BuiltinCode())
        if builtin == _fb.BuiltinOperator.CUSTOM:
            names.append("CUSTOM:" + r.text(code, 6, "custom op code"))
        else:
            names.append(_OP_NAMES.get(builtin, f"UNKNOWN_{builtin}"))
    return names


def _read_ops(
    r: _Reader, sub: Any, sg: int, tensors: list[_Tensor], op_names: list[str]
) -> list[_Op]:
    ops = []
    for op in r.items(sub, "Operators", 4, f"subgraph {sg} operators"):
        r.table(op, f"subgraph {sg} operator")
        idx = op.OpcodeIndex()
        if idx >= len(op_names):
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: operator code {idx} of {len(op_names)}"
            )
        options = op.BuiltinOptions()
        if options is not None:
            r.table(options, "builtin options")
        ins = _tensor_refs(r, op, "Inputs", tensors, "operator inputs")
        outs = [t for t in _tensor_refs(r, op, "Outputs", tensors, "operator outputs") if t]
        ops.append(_Op(op_names[idx], ins, outs, options, op.BuiltinOptionsType()))
    return ops


def _parse(data: bytes) -> dict[str, SignatureInfo]:
    return _parse_with(_Reader(data))


def _parse_with(r: _Reader) -> dict[str, SignatureInfo]:
    data = r.buf
    model = r.table(_fb.Model.GetRootAs(data, 0), "model")
    version = model.Version()
    if version != _SCHEMA_VERSION:
        raise ModelFormatError(f"corrupt TFLite flatbuffer: schema version {version}, expected 3")
    op_names = _op_names(r, model)
    has_data = _read_buffers(r, model)
    n_sub = r.length(model.SubgraphsLength(), 4, "subgraphs")
    if n_sub == 0:
        raise ModelFormatError("corrupt TFLite flatbuffer: no subgraphs")

    cache: dict[int, tuple[list[_Tensor], list[_Op], Any, list, list]] = {}

    def subgraph(sg: int) -> tuple[list[_Tensor], list[_Op], Any, list, list]:
        if sg not in cache:
            sub = r.table(model.Subgraphs(sg), f"subgraph {sg}")
            tensors = _read_tensors(r, sub, sg, has_data)
            ops = _read_ops(r, sub, sg, tensors, op_names)
            ins, outs = (
                [t for t in _tensor_refs(r, sub, f, tensors, f"subgraph {sg} {f.lower()}") if t]
                for f in ("Inputs", "Outputs")
            )
            _check_data_flow(sg, ops, ins, outs)
            cache[sg] = (tensors, ops, sub, ins, outs)
        return cache[sg]

    # (signature key, subgraph, [(input key, tensor)], [(output key, tensor)])
    entries: list[tuple[str, int, list, list]] = []
    seen: set[str] = set()
    for sig in r.items(model, "SignatureDefs", 4, "signature defs"):
        r.table(sig, "signature def")
        key = r.text(sig, 8, "signature key")
        if key in seen:
            raise ModelFormatError(f"corrupt TFLite flatbuffer: duplicate signature {key!r}")
        seen.add(key)
        sg = sig.SubgraphIndex()
        if sg >= n_sub:
            raise ModelFormatError(
                f"corrupt TFLite flatbuffer: signature {key!r} runs subgraph {sg} of {n_sub}"
            )
        tensors, _, _, sub_ins, sub_outs = subgraph(sg)
        io = []
        for field in ("Inputs", "Outputs"):
            pairs = []
            for tmap in r.items(sig, field, 4, f"signature {key!r} {field.lower()}"):
                r.table(tmap, "signature tensor map")
                idx = tmap.TensorIndex()
                if idx >= len(tensors):
                    raise ModelFormatError(
                        f"corrupt TFLite flatbuffer: signature {key!r} refers to tensor {idx}"
                    )
                t = tensors[idx]
                if not any(t is u for u in (sub_ins if field == "Inputs" else sub_outs)):
                    raise ModelFormatError(
                        f"corrupt TFLite flatbuffer: signature {key!r} {field.lower()[:-1]} "
                        f"tensor {idx} is not a subgraph {field.lower()[:-1]}"
                    )
                pairs.append((r.text(tmap, 4, "signature tensor name"), t))
            io.append(pairs)
        entries.append((key, sg, io[0], io[1]))
    if not entries:  # no SignatureDefs: describe the primary subgraph under its own name
        _, _, sub, sub_ins, sub_outs = subgraph(0)
        io = [[(t.name, t) for t in sub_ins], [(t.name, t) for t in sub_outs]]
        entries.append((r.text(sub, 12, "subgraph name") or "main", 0, io[0], io[1]))

    summaries: dict[int, _SubgraphSummary] = {}  # per subgraph, not per signature: linear time
    infos = {}
    for key, sg, ins, outs in entries:
        if sg not in summaries:
            summaries[sg] = _summarize(subgraph(sg)[1])
        infos[key] = _describe(key, sg, ins, outs, summaries[sg])
    return infos


# ----------------------------------------------------------------------------- GPU checks


def _opts(op: _Op, cls: Any) -> Any:
    """The op's builtin options as `cls`, or None when absent or of another type."""
    if op.options is None or op.options_type != getattr(_fb.BuiltinOptions, cls.__name__):
        return None
    obj = cls()
    obj.Init(op.options.Bytes, op.options.Pos)
    return obj


def _elements(t: _Tensor) -> int:
    n = 1
    for d in t.shape:
        n *= d
    return n


def _effective_consts(ops: Sequence[_Op]) -> set[int]:
    """ids of DEQUANTIZE outputs fed by a constant float16 tensor (counted as constants)."""
    out = set()
    for op in ops:
        if op.name == "DEQUANTIZE" and len(op.inputs) == 1 and len(op.outputs) == 1:
            src = op.inputs[0]
            if src is not None and src.const and src.type_name == "FLOAT16":
                out.add(id(op.outputs[0]))
    return out


def _op_problem(op: _Op, fp16_consts: set[int]) -> str | None:
    """Why the GPU delegate would not take `op` (None: it would)."""
    name = op.name
    if name.startswith("CUSTOM:"):
        return name
    if name not in GPU_OPS:
        return name
    ins = [t for t in op.inputs if t is not None]
    outs = op.outputs
    if not outs or (not ins and name != "DENSIFY"):
        return f"{name} ({len(ins)} inputs, {len(outs)} outputs)"

    def is_const(t: _Tensor) -> bool:
        return t.const or id(t) in fp16_consts

    for t in ins + outs:
        if t.rank > _MAX_RANK:
            return f"{name} (rank {t.rank} tensor {t.label()})"
        if t.dynamic:
            return f"{name} (dynamic shape tensor {t.label()})"

    runtime = [t for t in ins if not is_const(t)]
    consts = [t for t in ins if is_const(t)]

    # Tensor types of non-constant tensors (model_builder.cc GetOpsToReplace).
    in_ok = set(_RUNTIME_TYPES)
    out_ok = set(_RUNTIME_TYPES)
    if name == "CAST":
        in_ok |= {"BOOL", "INT32"}
        out_ok |= {"BOOL", "INT32"}
    if name in _BOOL_OUTPUT:
        out_ok.add("BOOL")
    if name == "LOGICAL_AND" or name in ("SELECT", "SELECT_V2"):
        in_ok.add("BOOL")
    if name == "GATHER":
        in_ok.add("INT32")  # indices; int32 params are rejected below
    for t in runtime:
        if t.type_name not in in_ok:
            return f"{name} ({t.type_name.lower()} input {t.label()})"
    for t in outs:
        if not is_const(t) and t.type_name not in out_ok:
            return f"{name} ({t.type_name.lower()} output {t.label()})"

    def counts(n_runtime: int, n_outputs: int = 1, n_const: int | None = None) -> bool:
        return (
            len(runtime) == n_runtime
            and len(outs) == n_outputs
            and (n_const is None or len(consts) == n_const)
        )

    if name in _ONE_IN_ONE_OUT and not counts(1):
        return f"{name} ({len(runtime)} runtime inputs, {len(outs)} outputs; needs 1 and 1)"
    if name in _UNARY_ELEMENTWISE and not counts(1, 1, 0):
        return f"{name} (needs exactly 1 runtime input and no constant input)"
    if name in _BINARY_ELEMENTWISE or name == "GATHER":
        if not (counts(2, 1, 0) or counts(1, 1, 1)):
            return f"{name} (can only handle 1 or 2 operands)"

    options_cls = _FUSED_ACTIVATION_OPTIONS.get(name)
    if options_cls is not None:
        opts = _opts(op, options_cls)
        if opts is not None and opts.FusedActivationFunction() == (
            _fb.ActivationFunctionType.SIGN_BIT
        ):
            return f"{name} (fused SIGN_BIT activation)"

    if name in ("CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV"):
        if len(runtime) > 2 or len(outs) != 1 or (len(runtime) == 1 and len(ins) < 2):
            return f"{name} ({len(runtime)} runtime inputs; needs 1 or 2 and 1 output)"
    if name == "DEPTHWISE_CONV_2D":
        if len(ins) < 2 or any(t.rank != 4 for t in (ins[0], ins[1], outs[0])):
            return f"{name} (input, filter and output must be rank 4)"
        in_c, out_c = ins[0].shape[3], outs[0].shape[3]
        if in_c != 1 and out_c != in_c:
            return f"{name} (depth multiplier != 1 with {in_c} input channels)"
    elif name == "TRANSPOSE_CONV":
        opts = _opts(op, _fb.TransposeConvOptions)
        if opts is not None and (opts.StrideH() <= 0 or opts.StrideW() <= 0):
            return f"{name} (non-positive stride)"
    elif name in ("ADD", "MUL"):
        if len(ins) != 2:
            return f"{name} (needs two input tensors)"
        if name == "MUL" and ins[0].rank == ins[1].rank:
            a, b = ins[0].shape, ins[1].shape
            if any(x < y for x, y in zip(a, b)) and any(y < x for x, y in zip(a, b)):
                return f"{name} (neither operand is at least as large in every dimension)"
    elif name == "ADD_N":
        if len(op.inputs) != 2:
            return f"{name} (only 2 inputs supported)"
    elif name == "BATCH_MATMUL":
        if len(op.inputs) != 2 or len(outs) != 1:
            return f"{name} (needs 2 inputs and 1 output)"
    elif name == "CAST":
        pair = (ins[0].type_name, outs[0].type_name)
        if not (
            (pair[0] == "BOOL" and pair[1] in _FLOAT_TYPES)
            or (pair[0] in _FLOAT_TYPES and pair[1] == "BOOL")
            or (pair[0] in ("FLOAT32", "INT32") and pair[1] in ("FLOAT32", "INT32"))
        ):
            return f"{name} ({pair[0].lower()} -> {pair[1].lower()})"
    elif name == "CUMSUM":
        if len(ins) != 2 or ins[0].type_name not in _FLOAT_TYPES:
            return f"{name} (needs float data and an axis)"
        if outs[0].type_name != ins[0].type_name:
            return f"{name} (output type differs from input)"
        if not (is_const(ins[1]) and ins[1].type_name == "INT32"):
            return f"{name} (axis must be a constant int32)"
    elif name == "DENSIFY":
        if not counts(0):
            return f"{name} (needs a constant input and 1 output)"
    elif name == "DEQUANTIZE":
        if len(ins) != 1 or len(outs) != 1:
            return f"{name} (needs 1 input and 1 output)"
        if ins[0].type_name == "INT16":
            return f"{name} (int16 input)"
    elif name == "QUANTIZE":
        pass  # 1 runtime input / 1 output checked above
    elif name == "FULLY_CONNECTED":
        opts = _opts(op, _fb.FullyConnectedOptions)
        if opts is None:
            return f"{name} (no options)"
        if opts.WeightsFormat() != _fb.FullyConnectedOptionsWeightsFormat.DEFAULT:
            return f"{name} (shuffled weights format)"
        if len(runtime) > 2:
            return f"{name} (more than 2 runtime inputs)"
        if is_const(ins[0]):
            return f"{name} (constant input)"
        if opts.KeepNumDims() and ins[0].rank != outs[0].rank:
            return f"{name} (keep_num_dims with a rank change)"
    elif name == "GATHER":
        if len(ins) < 2:
            return f"{name} (needs params and indices)"
        if ins[0].type_name == "INT32":
            return f"{name} (int32 params)"
        if ins[1].rank != 1 or ins[1].type_name != "INT32":
            return f"{name} (indices must be 1-D int32)"
    elif name == "MEAN":
        if not counts(1, 1, 1):
            return f"{name} (needs 1 runtime input and constant axes)"
    elif name == "SOFTMAX":
        opts = _opts(op, _fb.SoftmaxOptions)
        if opts is None:
            return f"{name} (no options)"
        if opts.Beta() != 1.0:
            return f"{name} (beta {opts.Beta():g} != 1)"
    elif name == "STRIDED_SLICE":
        opts = _opts(op, _fb.StridedSliceOptions)
        if opts is None:
            return f"{name} (no options)"
        if opts.EllipsisMask() or opts.NewAxisMask() or opts.ShrinkAxisMask():
            return f"{name} (ellipsis, new-axis or shrink-axis mask)"
        if len(ins) < 4:
            return f"{name} (needs 4 inputs)"
        if ins[0].rank not in (3, 4):
            return f"{name} (rank {ins[0].rank} input; only rank 3 or 4)"
    elif name == "SLICE":
        if len(ins) < 3:
            return f"{name} (needs 3 inputs)"
        if ins[0].rank not in (3, 4):
            return f"{name} (rank {ins[0].rank} input; only rank 3 or 4)"
    elif name in ("SELECT", "SELECT_V2"):
        if len(ins) != 3 or len(outs) != 1:
            return f"{name} (needs 3 inputs and 1 output)"
        cond, a, b = ins
        if (
            cond.type_name not in _FLOAT_TYPES | {"BOOL"}
            or not {
                a.type_name,
                b.type_name,
            }
            <= _FLOAT_TYPES
        ):
            return f"{name} (bool/float condition and float values only)"
    elif name in ("DEPTH_TO_SPACE", "SPACE_TO_DEPTH"):
        cls = _fb.DepthToSpaceOptions if name == "DEPTH_TO_SPACE" else _fb.SpaceToDepthOptions
        opts = _opts(op, cls)
        if opts is None or opts.BlockSize() <= 1:
            return f"{name} (block size must be > 1)"
    elif name == "RESIZE_BILINEAR":
        opts = _opts(op, _fb.ResizeBilinearOptions)
        if opts is not None and opts.AlignCorners() and opts.HalfPixelCenters():
            return f"{name} (align_corners with half_pixel_centers)"

    if name in ("MEAN", "SUM", "REDUCE_MAX", "REDUCE_MIN", "REDUCE_PROD"):
        axes = op.inputs[1] if len(op.inputs) > 1 else None
        if axes is None or not is_const(axes) or axes.type_name != "INT32":
            return f"{name} (axes must be a constant int32 tensor)"
    if name in ("PAD", "PADV2", "MIRROR_PAD"):
        if name == "MIRROR_PAD":
            opts = _opts(op, _fb.MirrorPadOptions)
            if opts is None or opts.Mode() != _fb.MirrorPadMode.REFLECT:
                return f"{name} (only REFLECT mode)"
        pads = op.inputs[1] if len(op.inputs) > 1 else None
        if pads is None or pads.rank != 2 or pads.shape[0] not in (3, 4) or pads.shape[1] != 2:
            return f"{name} (paddings must be 3x2 or 4x2)"
    return None


@dataclasses.dataclass(frozen=True)
class _SubgraphSummary:
    ops: dict[str, int]
    max_rank: int  # over the tensors the ops use
    offending: tuple[str, ...]


def _summarize(ops: list[_Op]) -> _SubgraphSummary:
    """The per-subgraph part of a `SignatureInfo` (computed once however many keys run it)."""
    counts: dict[str, int] = {}
    max_rank = 0
    for op in ops:
        counts[op.name] = counts.get(op.name, 0) + 1
        for t in op.inputs + op.outputs:
            if t is not None and t.rank > max_rank:
                max_rank = t.rank
    fp16_consts = _effective_consts(ops)
    offending: dict[str, None] = {}
    for op in ops:
        problem = _op_problem(op, fp16_consts)
        if problem is not None:
            offending[problem] = None
    return _SubgraphSummary(dict(sorted(counts.items())), max_rank, tuple(offending))


def _describe(
    key: str,
    sg: int,
    ins: list[tuple[str, _Tensor]],
    outs: list[tuple[str, _Tensor]],
    summary: _SubgraphSummary,
) -> SignatureInfo:
    def info(pairs: list[tuple[str, _Tensor]]) -> tuple[TensorInfo, ...]:
        return tuple(TensorInfo(n, t.shape, t.dtype) for n, t in pairs)

    return SignatureInfo(
        name=key,
        subgraph=sg,
        inputs=info(ins),
        outputs=info(outs),
        ops=dict(summary.ops),
        max_rank=max([summary.max_rank, *(t.rank for _, t in ins + outs)]),
        gpu_compatible=not summary.offending,
        gpu_offending=summary.offending,
    )


# ----------------------------------------------------------------------------- public API


def read_model(data: bytes) -> dict[str, SignatureInfo]:
    """Describes every signature of a ``.tflite`` flatbuffer.

    Args:
      data: the model bytes (``bytes``, ``bytearray`` or ``memoryview``).

    Returns:
      ``{signature key: SignatureInfo}`` in flatbuffer order. A model without SignatureDefs
      yields one entry for its primary subgraph, keyed by the subgraph's name (or ``"main"``).

    Raises:
      ModelFormatError: the bytes are empty, truncated, lack the ``TFL3`` identifier or are
        otherwise not a well-formed TFLite flatbuffer.
      TypeError: `data` is not bytes-like.
    """
    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TypeError(f"read_model expects bytes, got {type(data).__name__}")
    _check_header(data)
    try:
        return _parse(data)
    except ModelFormatError:
        raise
    except RecursionError as exc:  # pragma: no cover - defensive
        raise ModelFormatError(f"corrupt TFLite flatbuffer: {type(exc).__name__}") from exc
    except Exception as exc:  # any accessor failure means corrupt bytes
        detail = " ".join(str(exc).split())[:200]
        raise ModelFormatError(
            f"corrupt TFLite flatbuffer: {type(exc).__name__}: {detail}"
        ) from exc


def gpu_report(data: bytes) -> dict[str, SignatureInfo]:
    """Same as `read_model` (whose `SignatureInfo` carries the GPU verdict per signature)."""
    return read_model(data)
