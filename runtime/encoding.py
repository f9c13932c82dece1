"""How a cut tensor travels between device and edge: float32, float16 or int8.

Numpy only (the runtime never imports JAX or TensorFlow), shared by the
exporter (which calibrates int8 on calibration frames and records every
encoding's bytes and accuracy effect in the manifest), the planner (which
chooses exit, partition *and* encoding) and both ends of the wire.

* ``float32``: the activation as computed; 4 bytes per element.
* ``float16``: rounded to IEEE half (values beyond ±65504 saturate, never inf);
  2 bytes per element.
* ``int8``: per-tensor affine, ``q = clip(round(x / scale) + zero_point, -128,
  127)``, ``x ≈ (q - zero_point) * scale``; scale and zero point come from the
  min/max of the calibration frames' activations at that cut (0 always
  representable); 1 byte per element.

`Encoding` is a frozen value; `Encoding.from_json` validates what a manifest
or a peer says (unknown name, non-finite or non-positive scale, zero point
out of range: `EncodingError`, one line).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

ENCODINGS = ("float32", "float16", "int8")
DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1")}
# Open Inference Protocol (KServe v2) tensor datatypes.
OIP_DATATYPES = {"float32": "FP32", "float16": "FP16", "int8": "INT8"}
_F16_MAX = float(np.finfo(np.float16).max)


class EncodingError(ValueError):
    """An unknown encoding or invalid quantization parameters."""


@dataclasses.dataclass(frozen=True)
class Encoding:
    """One cut-tensor encoding; `scale`/`zero_point` matter for int8 only."""

    name: str = "float32"
    scale: float = 1.0
    zero_point: int = 0

    def __post_init__(self):
        if self.name not in ENCODINGS:
            raise EncodingError(f"unknown encoding {self.name!r}; valid: {', '.join(ENCODINGS)}")
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)):
            raise EncodingError(f"{self.name}: scale must be a number, got {self.scale!r}")
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise EncodingError(f"{self.name}: scale must be finite and > 0, got {self.scale!r}")
        if isinstance(self.zero_point, bool) or not isinstance(self.zero_point, int):
            raise EncodingError(f"{self.name}: zero_point must be an integer")
        if not -128 <= self.zero_point <= 127:
            raise EncodingError(f"{self.name}: zero_point {self.zero_point} outside [-128, 127]")

    @property
    def dtype(self) -> np.dtype:
        return DTYPES[self.name]

    @property
    def oip_datatype(self) -> str:
        return OIP_DATATYPES[self.name]

    def nbytes(self, shape: Iterable[int]) -> int:
        """Bytes of one tensor of `shape` in this encoding."""
        return int(np.prod(tuple(shape), dtype=np.int64)) * self.dtype.itemsize

    def encode(self, x: np.ndarray) -> np.ndarray:
        """float32 activation -> array of `self.dtype` (contiguous, little-endian)."""
        x = np.asarray(x, np.float32)
        if self.name == "float32":
            out = x
        elif self.name == "float16":
            out = np.clip(x, -_F16_MAX, _F16_MAX).astype(np.float16)
        else:
            q = np.rint(x / np.float32(self.scale)) + self.zero_point
            out = np.clip(q, -128, 127).astype(np.int8)
        return np.ascontiguousarray(out, dtype=self.dtype)

    def decode(self, q: np.ndarray) -> np.ndarray:
        """Array of `self.dtype` -> float32 activation."""
        q = np.asarray(q)
        if q.dtype != self.dtype:
            raise EncodingError(f"{self.name}: expected dtype {self.dtype}, got {q.dtype}")
        if self.name == "int8":
            return (q.astype(np.float32) - np.float32(self.zero_point)) * np.float32(self.scale)
        return q.astype(np.float32)

    def roundtrip(self, x: np.ndarray) -> np.ndarray:
        """decode(encode(x)): what the far side computes on."""
        return self.decode(self.encode(x))

    def to_json(self) -> dict[str, Any]:
        if self.name == "int8":
            return {"name": "int8", "scale": float(self.scale), "zero_point": int(self.zero_point)}
        return {"name": self.name}

    @staticmethod
    def from_json(obj: Any) -> Encoding:
        if isinstance(obj, str):
            obj = {"name": obj}
        if not isinstance(obj, Mapping):
            raise EncodingError(f"an encoding is an object or a name, got {type(obj).__name__}")
        unknown = set(obj) - {"name", "scale", "zero_point"}
        if unknown:
            raise EncodingError(f"unknown encoding keys {sorted(unknown)}")
        name = obj.get("name")
        if not isinstance(name, str):
            raise EncodingError("encoding name must be a string")
        if name == "int8" and ("scale" not in obj or "zero_point" not in obj):
            raise EncodingError("int8 encoding needs scale and zero_point")
        return Encoding(name, obj.get("scale", 1.0), obj.get("zero_point", 0))


def calibrate(name: str, samples: Iterable[np.ndarray]) -> Encoding:
    """The encoding `name` fitted to calibration activations (int8: min/max affine)."""
    if name not in ENCODINGS:
        raise EncodingError(f"unknown encoding {name!r}; valid: {', '.join(ENCODINGS)}")
    if name != "int8":
        return Encoding(name)
    lo, hi, seen = 0.0, 0.0, False
    for x in samples:
        x = np.asarray(x, np.float32)
        if x.size == 0:
            continue
        if not np.all(np.isfinite(x)):
            raise EncodingError("calibration activations contain NaN or inf")
        lo, hi, seen = min(lo, float(x.min())), max(hi, float(x.max())), True
    if not seen:
        raise EncodingError("int8 calibration needs at least one non-empty activation")
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero_point = int(np.clip(round(-128 - lo / scale), -128, 127))
    return Encoding("int8", float(scale), zero_point)
