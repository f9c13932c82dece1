"""Edgent's co-inference wire: the Open Inference Protocol (KServe v2 / Triton gRPC).

Both ends speak ``inference.GRPCInferenceService`` through the maintained
generated stubs of ``open-inference-grpc`` (`open_inference.grpc`): no
hand framing, and any stock Triton / KServe gRPC client can call the edge
server. This module holds what the two ends share: names, limits, and the
functions that build and validate messages (numpy + protobuf only).

Models and names (the contract; README "Calling the edge server"):

* every edge partition signature is a model named after it (``edge_3_p05``),
  version ``"1"``, one input `INPUT` and one output `OUTPUT` (``FP32``, the
  signature's shapes); its metadata ``properties`` carry `DIGEST` (sha256 of
  the bundle's manifest) and `ENCODINGS`;
* `PROBE` (``link_probe``): input ``payload`` (``UINT8``, any length up to
  the message limit), output ``received`` (``INT64 [1]``): the client's
  bandwidth and round-trip probe;
* request parameters: `DIGEST` (string, optional; a mismatch is
  FAILED_PRECONDITION); input parameters `SCALE` (double) and `ZERO_POINT`
  (int64) for an ``INT8`` input (`runtime.encoding`: the input's datatype
  ``FP32`` / ``FP16`` / ``INT8`` names the cut tensor's encoding);
* reply parameters: `DIGEST` and `SERVER_MS` (double: the server's compute
  time, so the client can tell transfer time from compute time);
* the shared token travels as gRPC metadata ``authorization: Bearer TOKEN``.

Limits (`check_metadata`, `check_request`): at most `MAX_METADATA_ENTRIES`
headers and `MAX_METADATA_BYTES` bytes of them, `MAX_PARAMS` parameters per
map, keys up to `MAX_KEY` bytes, strings (ids, names, string parameters) up
to `MAX_STRING` bytes, exactly one raw input. Anything else is a
`ProtocolError` (one line), which the server answers INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError
from open_inference.grpc import protocol as pb
from open_inference.grpc import service as pb_grpc

from runtime.encoding import DTYPES, OIP_DATATYPES, Encoding, EncodingError

SERVICE = "inference.GRPCInferenceService"
METHODS = ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
           "ModelInfer")  # fmt: skip
# Liveness / readiness answer without a token (orchestrators' health probes carry none).
OPEN_METHODS = ("ServerLive", "ServerReady")
REQUESTS = {
    "ServerLive": pb.ServerLiveRequest,
    "ServerReady": pb.ServerReadyRequest,
    "ModelReady": pb.ModelReadyRequest,
    "ServerMetadata": pb.ServerMetadataRequest,
    "ModelMetadata": pb.ModelMetadataRequest,
    "ModelInfer": pb.ModelInferRequest,
}
Stub = pb_grpc.GRPCInferenceServiceStub

SERVER_NAME = "flexjax-edge"
VERSION = "1"
PLATFORM = "tflite"
INPUT, OUTPUT = "input", "logits"
PROBE, PROBE_INPUT, PROBE_OUTPUT = "link_probe", "payload", "received"
DIGEST, SERVER_MS = "bundle_digest", "server_ms"
SCALE, ZERO_POINT = "scale", "zero_point"
ENCODINGS = "encodings"
TOKEN_KEY = "authorization"
BEARER = "Bearer "

MAX_METADATA_ENTRIES = 32
MAX_METADATA_BYTES = 8192
MAX_PARAMS = 16
MAX_KEY = 64
MAX_STRING = 256
MAX_DIMS = 6

_BY_OIP = {v: k for k, v in OIP_DATATYPES.items()}


class ProtocolError(ValueError):
    """A message or header that breaks the protocol or its limits (one line)."""


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    """gRPC metadata carrying `token`."""
    return ((TOKEN_KEY, BEARER + token),)


def token_of(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The bearer token in `metadata`, or None."""
    for key, value in metadata or ():
        if key == TOKEN_KEY and isinstance(value, str) and value.startswith(BEARER):
            return value[len(BEARER) :]
    return None


def check_metadata(metadata: Iterable[tuple[str, Any]] | None) -> None:
    """Refuses too many or too large headers (ProtocolError)."""
    items = list(metadata or ())
    if len(items) > MAX_METADATA_ENTRIES:
        raise ProtocolError(f"{len(items)} metadata entries exceed {MAX_METADATA_ENTRIES}")
    size = sum(len(k) + len(v) for k, v in items)
    if size > MAX_METADATA_BYTES:
        raise ProtocolError(f"{size} bytes of metadata exceed {MAX_METADATA_BYTES}")


def parse(method: str, data: bytes):
    """The request message of `method` parsed from `data` (ProtocolError if it is not one)."""
    try:
        return REQUESTS[method].FromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:  # upb raises DecodeError; be broad
        raise ProtocolError(f"not a {method} request: {e}") from None


def _string(value: str, what: str) -> str:
    if len(value.encode()) > MAX_STRING:
        raise ProtocolError(f"{what} longer than {MAX_STRING} bytes")
    return value


def _params(params: Mapping, where: str) -> dict[str, Any]:
    """A parameter map as plain values, within the limits."""
    if len(params) > MAX_PARAMS:
        raise ProtocolError(f"{where}: {len(params)} parameters exceed {MAX_PARAMS}")
    out = {}
    for key, p in params.items():
        if len(key.encode()) > MAX_KEY:
            raise ProtocolError(f"{where}: a parameter key is longer than {MAX_KEY} bytes")
        kind = p.WhichOneof("parameter_choice")
        value = getattr(p, kind) if kind else None
        if isinstance(value, str):
            _string(value, f"{where} parameter {key!r}")
        out[key] = value
    return out


def check_request(req: pb.ModelInferRequest) -> dict[str, Any]:
    """Validates the envelope of an infer request; returns its parameters."""
    _string(req.model_name, "model name")
    _string(req.model_version, "model version")
    _string(req.id, "request id")
    params = _params(req.parameters, "request")
    if len(req.inputs) != 1 or len(req.raw_input_contents) != 1:
        raise ProtocolError(
            f"expected one input in raw_input_contents, got {len(req.inputs)} input(s) and "
            f"{len(req.raw_input_contents)} raw content(s)"
        )
    if len(req.outputs) > MAX_PARAMS:
        raise ProtocolError(f"{len(req.outputs)} requested outputs exceed {MAX_PARAMS}")
    for o in req.outputs:
        _string(o.name, "output name")
        _params(o.parameters, f"output {o.name!r}")
    if DIGEST in params and not isinstance(params[DIGEST], str):
        raise ProtocolError(f"parameter {DIGEST} must be a string")
    return params


def _shape(values: Iterable[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in values)
    if not 1 <= len(shape) <= MAX_DIMS or any(d < 1 or d > 1 << 24 for d in shape):
        raise ProtocolError(f"shape must be 1-{MAX_DIMS} positive dims, got {list(shape)}")
    return shape


# -- infer: client side builds, server side reads -------------------------------------------------


def infer_request(
    model: str, x: np.ndarray, encoding: Encoding | None = None, *, request_id: str = "",
    digest: str | None = None,
) -> pb.ModelInferRequest:  # fmt: skip
    """A ModelInfer request sending float32 activation `x` encoded as `encoding`."""
    encoding = encoding or Encoding()
    q = encoding.encode(x)
    req = pb.ModelInferRequest(model_name=model, model_version=VERSION, id=request_id)
    if digest:
        req.parameters[DIGEST].string_param = digest
    t = req.inputs.add(name=INPUT, datatype=encoding.oip_datatype, shape=list(q.shape))
    if encoding.name == "int8":
        t.parameters[SCALE].double_param = float(encoding.scale)
        t.parameters[ZERO_POINT].int64_param = int(encoding.zero_point)
    req.outputs.add(name=OUTPUT)
    req.raw_input_contents.append(q.tobytes())
    return req


def read_input(req: pb.ModelInferRequest, shape: tuple[int, ...]) -> tuple[np.ndarray, Encoding]:
    """The request's input decoded to float32 (it must have `shape`), and its encoding.

    Raises:
      ProtocolError: wrong name, datatype, shape, byte count, encoding parameters, or
        non-finite values.
    """
    t, raw = req.inputs[0], req.raw_input_contents[0]
    if t.name != INPUT:
        raise ProtocolError(f"input must be named {INPUT!r}, got {t.name[:64]!r}")
    if t.datatype not in _BY_OIP:
        raise ProtocolError(
            f"datatype {t.datatype[:16]!r} is not an encoding; valid: {', '.join(_BY_OIP)}"
        )
    params = _params(t.parameters, "input")
    spec: dict[str, Any] = {"name": _BY_OIP[t.datatype]}
    for key in (SCALE, ZERO_POINT):
        if key in params:
            spec[key] = params[key]
    try:
        enc = Encoding.from_json(spec)
    except EncodingError as e:
        raise ProtocolError(f"bad encoding: {e}") from None
    got = _shape(t.shape)
    if got != tuple(shape):
        raise ProtocolError(f"{req.model_name} takes shape {list(shape)}, got {list(got)}")
    want = enc.nbytes(shape)
    if len(raw) != want:
        raise ProtocolError(f"raw input has {len(raw)} bytes, {t.datatype} {list(got)} needs "
                            f"{want}")  # fmt: skip
    x = enc.decode(np.frombuffer(raw, DTYPES[enc.name]).reshape(shape))
    if not np.isfinite(x).all():
        raise ProtocolError("input holds NaN or inf")
    return np.ascontiguousarray(x, np.float32), enc


def infer_response(
    req: pb.ModelInferRequest, y: np.ndarray, *, digest: str, server_ms: float,
    output: str = OUTPUT, datatype: str = "FP32",
) -> pb.ModelInferResponse:  # fmt: skip
    """The reply to `req` carrying tensor `y`, the bundle digest and the compute time."""
    resp = pb.ModelInferResponse(model_name=req.model_name, model_version=VERSION, id=req.id)
    resp.parameters[DIGEST].string_param = digest
    resp.parameters[SERVER_MS].double_param = float(server_ms)
    y = np.ascontiguousarray(y)
    resp.outputs.add(name=output, datatype=datatype, shape=list(y.shape))
    resp.raw_output_contents.append(y.tobytes())
    return resp


def read_output(
    resp: pb.ModelInferResponse, *, model: str, request_id: str, digest: str | None,
    shape: tuple[int, ...] | None, output: str = OUTPUT,
) -> tuple[np.ndarray, float]:  # fmt: skip
    """Checks a reply against its request; returns ``(tensor, server_ms)``.

    `shape` None accepts the probe's ``INT64 [1]``; otherwise the output must be
    finite FP32 of exactly `shape`.

    Raises:
      ProtocolError: a reply for another model or request, another bundle (the message
        starts ``"serves another bundle"``), a bad server time, or a bad tensor.
    """
    params = _params(resp.parameters, "reply")
    if digest is not None and params.get(DIGEST) != digest:
        got = params.get(DIGEST)
        raise ProtocolError(f"serves another bundle ({str(got)[:16]!r}, expected {digest[:16]!r})")
    if resp.model_name != model or resp.id != request_id:
        raise ProtocolError(f"reply for {resp.model_name[:64]!r} id {resp.id[:32]!r}, expected "
                            f"{model!r} id {request_id!r}")  # fmt: skip
    server_ms = params.get(SERVER_MS)
    if (isinstance(server_ms, bool) or not isinstance(server_ms, (int, float))
            or not math.isfinite(server_ms) or not 0 <= server_ms < 1e6):  # fmt: skip
        raise ProtocolError(f"bad {SERVER_MS} {server_ms!r}")
    if len(resp.outputs) != 1 or len(resp.raw_output_contents) != 1:
        raise ProtocolError("expected one output in raw_output_contents")
    t, raw = resp.outputs[0], resp.raw_output_contents[0]
    dtype, want_shape = ("<i8", (1,)) if shape is None else ("<f4", tuple(shape))
    datatype = "INT64" if shape is None else "FP32"
    if t.name != output or t.datatype != datatype or tuple(t.shape) != want_shape:
        raise ProtocolError(f"unexpected output {t.name[:32]!r} {t.datatype[:8]} "
                            f"{list(t.shape)[:8]}")  # fmt: skip
    if len(raw) != int(np.prod(want_shape)) * np.dtype(dtype).itemsize:
        raise ProtocolError(f"output has {len(raw)} bytes for {datatype} {list(want_shape)}")
    y = np.frombuffer(raw, dtype).reshape(want_shape).copy()
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise ProtocolError("output holds NaN or inf")
    return y, float(server_ms)


def probe_request(nbytes: int, *, request_id: str = "", digest: str | None = None):
    """A `PROBE` request carrying `nbytes` zero bytes."""
    req = pb.ModelInferRequest(model_name=PROBE, model_version=VERSION, id=request_id)
    if digest:
        req.parameters[DIGEST].string_param = digest
    req.inputs.add(name=PROBE_INPUT, datatype="UINT8", shape=[nbytes])
    req.raw_input_contents.append(bytes(nbytes))
    return req


def read_probe(req: pb.ModelInferRequest) -> int:
    """Bytes a probe request carried (ProtocolError if it is not one)."""
    t, raw = req.inputs[0], req.raw_input_contents[0]
    if t.name != PROBE_INPUT or t.datatype != "UINT8" or list(t.shape) != [len(raw)]:
        raise ProtocolError(f"{PROBE} takes one UINT8 [n] input named {PROBE_INPUT!r}")
    return len(raw)


def tensor_metadata(name: str, datatype: str, shape: Iterable[int]):
    return pb.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype,
                                                   shape=list(shape))  # fmt: skip
