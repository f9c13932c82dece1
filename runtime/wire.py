"""The co-inference wire format: one tensor per message, no pickle, strict limits.

A message (request or response) is::

    b"FXJ1" | u32 little-endian header length | header (UTF-8 JSON object) | raw tensor bytes

Request header: ``{"id": int, "sig": str, "dtype": str, "shape": [int, ...]}``;
response header: ``{"id": int, "dtype": ..., "shape": [...], "server_ms": float}``.
The payload is the C-order tensor, exactly ``prod(shape) * itemsize`` bytes.
Errors travel as gRPC status codes with a one-line detail, never as a payload.

`decode` validates everything before a byte is interpreted: magic, header
length (<= `MAX_HEADER`), JSON object with the required typed fields, dtype
from an allow-list, 1-6 positive dimensions, payload length equal to what the
shape and dtype imply, and (optionally) finite values. Anything else is a
`WireError` naming the problem.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC = b"FXJ1"
MAX_HEADER = 4096
DTYPES = ("float32", "float16", "uint8", "int8", "int32")
SERVICE = "flexjax.Edge"
INFER = f"/{SERVICE}/Infer"
PING = f"/{SERVICE}/Ping"
TOKEN_KEY = "x-flexjax-token"


class WireError(ValueError):
    """A message that does not follow the wire format (one line)."""


def encode(header: Mapping[str, Any], tensor: np.ndarray | None = None) -> bytes:
    """Serialises `header` (plus ``dtype``/``shape`` of `tensor`) and the tensor's bytes."""
    h = dict(header)
    payload = b""
    if tensor is not None:
        arr = np.ascontiguousarray(tensor)
        if arr.dtype.name not in DTYPES:
            raise WireError(f"dtype {arr.dtype.name} cannot be sent; valid: {', '.join(DTYPES)}")
        h["dtype"], h["shape"] = arr.dtype.name, [int(d) for d in arr.shape]
        payload = arr.tobytes()
    raw = json.dumps(h, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER:
        raise WireError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    return MAGIC + struct.pack("<I", len(raw)) + raw + payload


def decode(
    data: bytes, *, required: Mapping[str, type] = {}, finite: bool = False
) -> tuple[dict, np.ndarray | None]:
    """Parses one message; returns ``(header, tensor or None)``.

    Args:
      required: header fields that must be present with these types.
      finite: reject NaN / inf values in a floating-point tensor.

    Raises:
      WireError: anything malformed (see the module docstring).
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if len(data) < 8 or data[:4] != MAGIC:
        raise WireError("not a flexjax message (bad magic or shorter than 8 bytes)")
    (n,) = struct.unpack("<I", data[4:8])
    if n > MAX_HEADER:
        raise WireError(f"header length {n} exceeds {MAX_HEADER}")
    if len(data) < 8 + n:
        raise WireError(f"truncated header: {len(data) - 8} of {n} bytes")
    try:
        header = json.loads(data[8 : 8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError(f"header is not UTF-8 JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("header must be a JSON object")
    for key, typ in required.items():
        if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
            raise WireError(f"header field {key!r} must be a {typ.__name__}")
    payload = data[8 + n :]
    if "dtype" not in header and "shape" not in header:
        if payload:
            raise WireError(f"{len(payload)} payload bytes without dtype/shape")
        return header, None
    dtype, shape = header.get("dtype"), header.get("shape")
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} is not allowed; valid: {', '.join(DTYPES)}")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 6
        or not all(isinstance(d, int) and not isinstance(d, bool) and 1 <= d <= 1 << 24
                   for d in shape)
    ):  # fmt: skip
        raise WireError(f"shape must be 1-6 positive ints, got {shape!r}")
    want = math.prod(shape) * np.dtype(dtype).itemsize
    if len(payload) != want:
        raise WireError(
            f"payload has {len(payload)} bytes, shape {shape} of {dtype} needs {want} (truncated?)"
        )
    tensor = np.frombuffer(payload, dtype=dtype).reshape(shape)
    if finite and tensor.dtype.kind == "f" and not np.isfinite(tensor).all():
        raise WireError("tensor holds NaN or inf")
    return header, tensor
