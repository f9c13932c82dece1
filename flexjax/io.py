"""Small, safe file helpers: atomic writes and strict JSON."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
from typing import Any

import numpy as np


def jsonable(obj: Any) -> Any:
    """Converts numpy scalars/arrays and tuples to JSON types; NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def sha256_file(path: str) -> str:
    """The hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_text_atomic(path: str, text: str) -> None:
    """Writes `text` to `path` via a temp file + rename, so readers never see half a file."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_figure_atomic(fig: Any, path: str, dpi: int = 120) -> None:
    """Saves a matplotlib figure via a temp file + rename, then closes it."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        plt.close(fig)


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n")


def read_jsonl(path: str) -> list[dict]:
    """Reads a JSON-lines file, ignoring a torn last line (e.g. after kill -9)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return out


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h


def _renameat2():
    """glibc's ``renameat2`` (>= 2.28) as a ctypes function, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2()


def exchange_paths(a: str, b: str) -> bool:
    """Atomically swaps two existing paths (``renameat2(RENAME_EXCHANGE)``).

    Returns:
      True if swapped; False where the platform, kernel or filesystem cannot
      exchange (not Linux, glibc < 2.28, ENOSYS / EINVAL), nothing changed then.

    Raises:
      OSError: any other failure (a path missing, a permission, another device).
    """
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_dir(new: str, dst: str) -> None:
    """Moves directory `new` to `dst`, replacing any directory there; `new` is gone after.

    On Linux the replacement is one atomic ``renameat2(RENAME_EXCHANGE)``: a
    reader of `dst` always finds the old tree or the new one, never nothing;
    the old tree (swapped to `new`'s path) is deleted afterwards. Where
    exchange is unavailable (other systems, glibc < 2.28, a filesystem
    without it) the fallback renames the old tree away first, so for a moment
    `dst` does not exist. A process killed in between leaves the old tree at
    `new`'s path (a staging name its owner cleans) and `dst` whole.
    Both must be on one filesystem, and `dst`, when it exists, a real
    directory (not a symlink).
    """
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if os.path.islink(dst) or not os.path.isdir(dst):
        raise NotADirectoryError(f"{dst} is a file or a symlink, not a directory; not replacing it")
    if not exchange_paths(new, dst):  # non-atomic fallback: dst is briefly missing
        old = new + ".old"
        os.rename(dst, old)
        os.rename(new, dst)
        os.rename(old, new)
    shutil.rmtree(new, ignore_errors=True)  # the replacement is done; leftovers are stale
