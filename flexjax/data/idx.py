"""A strict reader for IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic ``00 00 <type> <ndim>``, ``ndim`` big-endian
uint32 dimensions, then the row-major data, big-endian, and nothing after it.
`read_idx` checks all of it (magic, dimension count, and that the payload is
exactly as long as the dimensions say) and reads plain or gzip-compressed
files alike (recognised by their content, not their name).
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import BinaryIO

import numpy as np

# IDX type codes -> big-endian numpy dtypes.
_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """The file is not a well-formed IDX file."""


def _open(path: str) -> BinaryIO:
    f = open(path, "rb")
    if f.read(2) == _GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def _read_exact(f: BinaryIO, n: int, path: str, what: str) -> bytes | bytearray:
    # In chunks: a corrupt header can claim terabytes, and read(n) would try to
    # allocate them before finding the file short.
    data = bytearray()
    while len(data) < n:
        chunk = f.read(min(n - len(data), 1 << 26))
        if not chunk:
            raise IdxError(
                f"{path}: truncated IDX file ({what}: expected {n} bytes, got {len(data)})"
            )
        if len(chunk) == n:  # the common case: one read, no copy
            return chunk
        data += chunk
    return data


def read_idx(path: str, *, limit: int | None = None) -> np.ndarray:
    """Reads an IDX file (raw or gzip) into a native-endian numpy array.

    Args:
      path: the file.
      limit: if set, read only the first ``limit`` records (entries along the
        first dimension); the rest of the file is not decompressed, so a
        slice of a large file is cheap. The file's declared size is still
        checked against its length when the whole file is read.

    Returns:
      An array with the file's dimensions (first one cut to ``limit``) and
      dtype (uint8 for MNIST).

    Raises:
      IdxError (a ValueError): bad magic, unknown type code, zero dimensions,
        truncated data or trailing bytes, or a file that is not gzip-readable.
      FileNotFoundError: the file does not exist.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int or None; got {limit!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"IDX file {path} does not exist")
    try:
        with _open(path) as f:
            magic = _read_exact(f, 4, path, "magic")
            if magic[:2] != b"\x00\x00" or magic[2] not in _TYPES or magic[3] == 0:
                raise IdxError(
                    f"{path}: not an IDX file (magic {magic.hex()}; expected 0000 + a type "
                    f"code in {{{', '.join(f'{t:02x}' for t in _TYPES)}}} + ndim >= 1)"
                )
            dtype, ndim = _TYPES[magic[2]], magic[3]
            dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "dimensions"))
            count = dims[0] if limit is None else min(limit, dims[0])
            record = int(np.prod(dims[1:], dtype=np.int64)) * dtype.itemsize
            payload = _read_exact(f, count * record, path, f"{count} records of {dims[1:]}")
            if count == dims[0] and f.read(1):
                raise IdxError(f"{path}: trailing bytes after the {dims} {dtype.name} payload")
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise IdxError(f"{path}: unreadable IDX file ({e})") from None
    array = np.frombuffer(payload, dtype=dtype).reshape(count, *dims[1:])
    return array.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str, array: np.ndarray) -> None:
    """Writes `array` as a raw IDX file (for tests and for users' own data).

    Raises:
      ValueError: the dtype has no IDX type code or the array is 0-d.
    """
    array = np.asarray(array)
    codes = {v.newbyteorder("="): k for k, v in _TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or array.ndim == 0 or array.ndim > 255:
        raise ValueError(f"cannot write a {array.dtype} array of shape {array.shape} as IDX")
    big = array.astype(_TYPES[code], copy=False)
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += big.tobytes()
    with open(path, "wb") as f:
        f.write(data)
