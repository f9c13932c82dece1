"""Crafted ``.tflite`` flatbuffers that attack a verifier's running time (tests and timing).

Two shapes of attack on a reader that walks a flatbuffer:

* `many_signatures`: a few hundred kB holding one long subgraph (a RELU chain) and thousands
  of SignatureDefs that all run it. A reader doing per-signature work over every op is
  quadratic (signatures x ops).
* `shared_vector`: flatbuffers are DAGs, so thousands of operator tables may point at ONE
  long input vector. A reader that follows every reference visits ops x length elements
  from a file of size ops + length.

`python -m runtime.crafted_tflite` times `runtime.tflite_model.read_model` on both. Builds
with the flatbuffer bindings that ship with ``ai_edge_litert`` (no JAX, no TensorFlow).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import flatbuffers
from ai_edge_litert import schema_py_generated as _fb

from runtime import args as args_lib
from runtime import tflite_model


def _pack(model: _fb.ModelT) -> bytes:
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _tensor(name: str, shape: Sequence[int]) -> _fb.TensorT:
    t = _fb.TensorT()
    t.name, t.shape, t.type, t.buffer = name, list(shape), _fb.TensorType.FLOAT32, 0
    return t


def _tensor_map(name: str, index: int) -> _fb.TensorMapT:
    tm = _fb.TensorMapT()
    tm.name, tm.tensorIndex = name, index
    return tm


def many_signatures(ops: int = 1500, signatures: int = 1500, width: int = 4) -> bytes:
    """One RELU chain of `ops` ops over [1, width] float32 tensors, run by `signatures` keys.

    A valid model: LiteRT runs every signature (x -> y).
    """
    model = _fb.ModelT()
    model.version = 3
    model.buffers = [_fb.BufferT()]
    code = _fb.OperatorCodeT()
    code.deprecatedBuiltinCode = code.builtinCode = _fb.BuiltinOperator.RELU
    model.operatorCodes = [code]
    sub = _fb.SubGraphT()
    sub.name = "main"
    sub.tensors = [_tensor(f"t{i}", (1, width)) for i in range(ops + 1)]
    sub.operators = []
    for i in range(ops):
        op = _fb.OperatorT()
        op.opcodeIndex, op.inputs, op.outputs = 0, [i], [i + 1]
        sub.operators.append(op)
    sub.inputs, sub.outputs = [0], [ops]
    model.subgraphs = [sub]
    model.signatureDefs = []
    for k in range(signatures):
        sig = _fb.SignatureDefT()
        sig.signatureKey, sig.subgraphIndex = f"s{k}", 0
        sig.inputs, sig.outputs = [_tensor_map("x", 0)], [_tensor_map("y", ops)]
        model.signatureDefs.append(sig)
    return _pack(model)


def shared_vector(ops: int = 4000, length: int = 25000) -> bytes:
    """`ops` RELU operators whose inputs all point at one vector of `length` zeros (a DAG)."""
    b = flatbuffers.Builder(1024)
    _fb.OperatorStartInputsVector(b, length)
    for _ in range(length):
        b.PrependInt32(0)
    shared = b.EndVector()
    _fb.OperatorStartOutputsVector(b, 1)
    b.PrependInt32(1)
    out = b.EndVector()
    op_offsets = []
    for _ in range(ops):
        _fb.OperatorStart(b)
        _fb.OperatorAddOpcodeIndex(b, 0)
        _fb.OperatorAddInputs(b, shared)
        _fb.OperatorAddOutputs(b, out)
        op_offsets.append(_fb.OperatorEnd(b))
    _fb.SubGraphStartOperatorsVector(b, ops)
    for off in reversed(op_offsets):
        b.PrependUOffsetTRelative(off)
    operators = b.EndVector()
    # The rest (tensors, codes, buffers, signature) through the object API, then spliced in:
    # pack a one-op model and rebuild it around the shared operators with the same builder.
    tensors = []
    for name in ("x", "y"):
        name_off = b.CreateString(name)
        _fb.TensorStartShapeVector(b, 2)
        b.PrependInt32(4)
        b.PrependInt32(1)
        shape = b.EndVector()
        _fb.TensorStart(b)
        _fb.TensorAddShape(b, shape)
        _fb.TensorAddType(b, _fb.TensorType.FLOAT32)
        _fb.TensorAddBuffer(b, 0)
        _fb.TensorAddName(b, name_off)
        tensors.append(_fb.TensorEnd(b))
    _fb.SubGraphStartTensorsVector(b, 2)
    for off in reversed(tensors):
        b.PrependUOffsetTRelative(off)
    tensor_vec = b.EndVector()
    io = []
    for idx in (0, 1):
        _fb.SubGraphStartInputsVector(b, 1)
        b.PrependInt32(idx)
        io.append(b.EndVector())
    _fb.SubGraphStart(b)
    _fb.SubGraphAddTensors(b, tensor_vec)
    _fb.SubGraphAddOperators(b, operators)
    _fb.SubGraphAddInputs(b, io[0])
    _fb.SubGraphAddOutputs(b, io[1])
    subgraph = _fb.SubGraphEnd(b)
    _fb.OperatorCodeStart(b)
    _fb.OperatorCodeAddDeprecatedBuiltinCode(b, _fb.BuiltinOperator.RELU)
    _fb.OperatorCodeAddBuiltinCode(b, _fb.BuiltinOperator.RELU)
    code = _fb.OperatorCodeEnd(b)
    _fb.BufferStart(b)
    buffer = _fb.BufferEnd(b)

    def vector(offsets: list[int]) -> int:
        b.StartVector(4, len(offsets), 4)
        for off in reversed(offsets):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    codes, buffers, subgraphs = vector([code]), vector([buffer]), vector([subgraph])
    _fb.ModelStart(b)
    _fb.ModelAddVersion(b, 3)
    _fb.ModelAddOperatorCodes(b, codes)
    _fb.ModelAddSubgraphs(b, subgraphs)
    _fb.ModelAddBuffers(b, buffers)
    b.Finish(_fb.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def time_read(data: bytes) -> tuple[float, str]:
    """Seconds `read_model` takes on `data`, and its outcome (``ok`` or the error line)."""

    t0 = time.perf_counter()
    try:
        tflite_model.read_model(data)
        outcome = "ok"
    except tflite_model.ModelFormatError as e:
        outcome = str(e)
    return time.perf_counter() - t0, outcome


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.crafted_tflite``."""
    p = args_lib.ArgumentParser(prog="python -m runtime.crafted_tflite", description=__doc__)
    p.add_argument("--ops", type=args_lib.count(1, 100_000), default=1500)
    p.add_argument("--signatures", type=args_lib.count(1, 100_000), default=1500)
    p.add_argument("--shared-ops", type=args_lib.count(1, 100_000), default=4000)
    p.add_argument("--shared-length", type=args_lib.count(1, 1_000_000), default=25000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    for name, data in (
        ("many_signatures", many_signatures(args.ops, args.signatures)),
        ("shared_vector", shared_vector(args.shared_ops, args.shared_length)),
    ):
        seconds, outcome = time_read(data)
        print(f"{name}: {len(data):,} bytes, read_model {seconds:.3f} s: {outcome}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
