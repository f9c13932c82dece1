"""Reads legacy (non-zip) PyTorch state-dict files with numpy, without torch and without
running pickle code.

A ``torch.save`` file written in the legacy format (torch < 1.6, or
``_use_new_zipfile_serialization=False``) is five pickles followed by raw data:

1. the magic number ``0x1950a86a20f9469cfc6c``; 2. the protocol version 1001;
3. ``sys_info`` (byte order, type sizes); 4. the object itself, whose tensors
are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
calls and whose storages are *persistent ids*
``("storage", torch.FloatStorage, key, location, numel, view)``; 5. the sorted
list of storage keys. Then, per key in that order, an int64 little-endian
element count and the storage's little-endian bytes.

A pickle can name any importable callable and have the loader call it, so
``pickle.load`` on a downloaded file runs whatever the file asks for. This
reader accepts only what a state dict needs (`ALLOWED_GLOBALS`), mapped to
functions of its own that build numpy arrays: every other global is refused
with one error naming it, found by scanning the pickle's opcodes *before*
unpickling starts (and again by ``find_class`` while unpickling, for globals
that are only known at run time). A truncated or corrupt file is one
`TorchWeightsError` too.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import os
import pickle
import pickletools
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
PROTOCOL_VERSION = 1001

# torch storage class name -> element type of its raw (little-endian) bytes.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class TorchWeightsError(ValueError):
    """A weights file that is not a readable legacy PyTorch state dict (corrupt, truncated)."""


class UnsafePickleError(TorchWeightsError):
    """A pickle that names a global outside `ALLOWED_GLOBALS`; nothing of it was run."""


@dataclasses.dataclass(frozen=True)
class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc.: only its element type matters."""

    name: str
    dtype: np.dtype


class _Storage:
    """One storage: filled from the raw section after the object pickle is read."""

    __slots__ = ("key", "dtype", "numel", "data")

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: np.ndarray | None = None


@dataclasses.dataclass(frozen=True)
class _StorageView:
    root: _Storage
    offset: int
    numel: int


class _TensorRef:
    """A tensor whose storage bytes are not read yet (they follow the pickle)."""

    __slots__ = ("storage", "offset", "shape", "stride")

    def __init__(self, storage: _Storage, offset: int, shape: tuple, stride: tuple):
        self.storage, self.offset, self.shape, self.stride = storage, offset, shape, stride


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple) or not all(type(i) is int and i >= 0 for i in v):
        raise TorchWeightsError(f"tensor {what} must be a tuple of non-negative ints, got {v!r}")
    return v


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> _TensorRef:
    base, offset = storage, storage_offset
    if isinstance(storage, _StorageView):
        base, offset = storage.root, storage.offset + storage_offset
    if not isinstance(base, _Storage) or type(storage_offset) is not int or storage_offset < 0:
        raise TorchWeightsError(
            f"a tensor must be rebuilt from a storage and an offset, got {storage!r}, "
            f"{storage_offset!r}"
        )
    shape, strides = _ints(size, "size"), _ints(stride, "stride")
    if len(shape) != len(strides):
        raise TorchWeightsError(f"tensor size {shape} and stride {strides} differ in rank")
    return _TensorRef(base, offset, shape, strides)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _TensorRef:
    del requires_grad, backward_hooks, metadata  # training-time state, not weights
    return _rebuild_tensor(storage, storage_offset, size, stride)


# (module, name) -> what the unpickler gets instead. Nothing else is ever imported.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    **{("torch", n): _StorageType(n, d) for n, d in _STORAGE_DTYPES.items()},
}
_ALLOWED_TEXT = ", ".join(sorted(f"{m}.{n}" for m, n in ALLOWED_GLOBALS))
_GLOBAL_OPS = ("GLOBAL", "INST")
# Opcodes that fetch a global the scan cannot name statically (checked by find_class).
_DYNAMIC_GLOBAL_OPS = ("STACK_GLOBAL", "EXT1", "EXT2", "EXT4")


def _refuse(path: str, module: str, name: str) -> UnsafePickleError:
    return UnsafePickleError(
        f"{path}: refusing to load: the pickle names the global '{module}.{name}', which a "
        f"PyTorch state dict never needs (allowed: {_ALLOWED_TEXT}); nothing was run"
    )


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, path: str, storages: dict[str, _Storage] | None):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._storages = storages

    def find_class(self, module: str, name: str) -> Any:
        if self._storages is not None and (module, name) in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[(module, name)]
        raise _refuse(self._path, module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._storages is None:
            raise TorchWeightsError(f"{self._path}: a header pickle refers to a storage")
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise TorchWeightsError(f"{self._path}: unknown persistent id {pid!r}")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str):
            raise TorchWeightsError(f"{self._path}: bad storage reference {pid!r}")
        if type(numel) is not int or numel < 0:
            raise TorchWeightsError(f"{self._path}: storage {key} has a bad size {numel!r}")
        storage = self._storages.get(key)
        if storage is None:
            storage = self._storages[key] = _Storage(key, stype.dtype, numel)
        elif storage.dtype != stype.dtype or storage.numel != numel:
            raise TorchWeightsError(f"{self._path}: storage {key} is declared twice differently")
        if view is None:
            return storage
        if not (
            isinstance(view, tuple)
            and len(view) == 3
            and all(type(v) is int and v >= 0 for v in view[1:])
        ):
            raise TorchWeightsError(f"{self._path}: bad storage view {view!r}")
        if view[1] + view[2] > numel:
            raise TorchWeightsError(f"{self._path}: storage view {view!r} exceeds storage {key}")
        return _StorageView(storage, view[1], view[2])


def _scan(buf: bytes, pos: int, path: str, what: str) -> int:
    """Checks one pickle's globals without running it; returns the offset just past it."""
    f = io.BytesIO(buf)  # shares `buf` (no copy) until written to
    f.seek(pos)
    try:
        for op, arg, at in pickletools.genops(f):
            if op.name in _GLOBAL_OPS:
                module, _, name = str(arg).partition(" ")
                if (module, name) not in ALLOWED_GLOBALS:
                    raise _refuse(path, module, name)
            if op.name == "STOP":
                return int(at) + 1
    except TorchWeightsError:
        raise
    except Exception as e:  # pickletools reports truncation and bad opcodes as ValueError
        raise TorchWeightsError(f"{path}: the {what} is corrupt or truncated ({e})") from None
    raise TorchWeightsError(f"{path}: the {what} is truncated (no STOP opcode)")


def _unpickle(
    buf: bytes, pos: int, path: str, what: str, storages: dict[str, _Storage] | None
) -> tuple[Any, int]:
    end = _scan(buf, pos, path, what)
    try:
        return _RestrictedUnpickler(buf[pos:end], path, storages).load(), end
    except TorchWeightsError:
        raise
    except Exception as e:
        raise TorchWeightsError(
            f"{path}: the {what} is corrupt ({type(e).__name__}: {e})"
        ) from None


def _read_storages(buf: bytes, pos: int, path: str, keys: Any, storages: dict) -> int:
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise TorchWeightsError(f"{path}: the storage key list is corrupt")
    for key in keys:
        storage = storages.get(key)
        if storage is None:
            raise TorchWeightsError(f"{path}: storage {key} is listed but no tensor uses it")
        if pos + 8 > len(buf):
            raise TorchWeightsError(
                f"{path}: truncated: the file ends before storage {key} ({len(buf)} bytes)"
            )
        (numel,) = struct.unpack_from("<q", buf, pos)
        if numel != storage.numel:
            raise TorchWeightsError(
                f"{path}: corrupt: storage {key} holds {numel} elements, "
                f"its tensors declare {storage.numel}"
            )
        pos += 8
        nbytes = numel * storage.dtype.itemsize
        if pos + nbytes > len(buf):
            raise TorchWeightsError(
                f"{path}: truncated: storage {key} needs {nbytes} bytes at offset {pos}, "
                f"the file has {len(buf) - pos} left"
            )
        storage.data = np.frombuffer(buf, storage.dtype, numel, pos)
        pos += nbytes
    missing = sorted(k for k, s in storages.items() if s.data is None)
    if missing:
        raise TorchWeightsError(f"{path}: corrupt: storages {missing[:5]} have no data")
    return pos


def _materialize(ref: _TensorRef, path: str) -> np.ndarray:
    data = ref.storage.data
    assert data is not None
    if 0 in ref.shape:
        return np.zeros(ref.shape, data.dtype.newbyteorder("="))
    last = ref.offset + sum((n - 1) * s for n, s in zip(ref.shape, ref.stride))
    if last >= data.size:
        raise TorchWeightsError(
            f"{path}: corrupt: a tensor of shape {ref.shape} reads past storage {ref.storage.key}"
        )
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[ref.offset :], ref.shape, tuple(s * item for s in ref.stride), writeable=False
    )
    return np.array(view, dtype=data.dtype.newbyteorder("="))


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a legacy ``torch.save`` state dict into ``{name: numpy array}``.

    Nothing from the file is executed: only `ALLOWED_GLOBALS` are resolved (to
    numpy-building stand-ins); arrays are native-endian copies in the stored
    layout (PyTorch's ``OIHW`` for convolutions).

    Raises:
      UnsafePickleError: the file names any other global (checked before unpickling).
      TorchWeightsError: the file is missing, zip-format, truncated or corrupt,
        or holds something other than a flat ``{name: tensor}`` mapping.
    """
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            buf = f.read()
    except OSError as e:
        raise TorchWeightsError(f"cannot read weights file {path}: {e.strerror}") from None
    if buf[:4] == b"PK\x03\x04":
        raise TorchWeightsError(
            f"{path} is a zip-format PyTorch file; this reader takes the legacy format "
            "(torch.save(..., _use_new_zipfile_serialization=False))"
        )
    magic, pos = _unpickle(buf, 0, path, "magic number", None)
    if magic != MAGIC_NUMBER:
        raise TorchWeightsError(f"{path} is not a legacy PyTorch file (bad magic number)")
    protocol, pos = _unpickle(buf, pos, path, "protocol version", None)
    if protocol != PROTOCOL_VERSION:
        raise TorchWeightsError(
            f"{path}: unsupported PyTorch file protocol {protocol!r} (expected {PROTOCOL_VERSION})"
        )
    sys_info, pos = _unpickle(buf, pos, path, "sys_info header", None)
    if not isinstance(sys_info, dict):
        raise TorchWeightsError(f"{path}: the sys_info header is corrupt")
    storages: dict[str, _Storage] = {}
    obj, pos = _unpickle(buf, pos, path, "state dict pickle", storages)
    keys, pos = _unpickle(buf, pos, path, "storage key list", None)
    pos = _read_storages(buf, pos, path, keys, storages)
    if pos != len(buf):
        raise TorchWeightsError(f"{path}: corrupt: {len(buf) - pos} unexpected bytes at the end")
    if not isinstance(obj, Mapping) or not all(
        isinstance(k, str) and isinstance(v, _TensorRef) for k, v in obj.items()
    ):
        raise TorchWeightsError(
            f"{path} does not hold a state dict (a flat mapping of names to tensors)"
        )
    return {k: _materialize(v, path) for k, v in obj.items()}
