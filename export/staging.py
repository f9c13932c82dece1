"""Writing a bundle directory safely: staged next to its destination, then swapped in.

Every exporter (`export.bundle`, `export.partitions`, `export.sweep`,
`export.latency_fit`) builds its bundle through `Staged` and seals it with
`write_manifest`, so a failed export leaves nothing half-written:

* exclusive: `Staged` holds an advisory lock (``fcntl.flock`` on
  ``.NAME.lock`` next to ``NAME``) from staging to commit or abort, so of two
  exports to one destination the second fails at once with one line
  (`ExportBusyError`); the kernel drops the lock of a killed process, so a
  lock is never stale;
* atomic: the finished bundle replaces the old one in one
  ``renameat2(RENAME_EXCHANGE)`` (`flexjax.io.replace_dir`), so a reader of
  the destination always finds a whole bundle, old or new;
* self-cleaning: staging directories of killed exports (``.NAME.tmp-*``,
  ``.NAME.old-*``) are stale by construction once the lock is held, and the
  next export to the same destination removes them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile

from flexjax.io import jsonable, replace_dir, sha256_file
from runtime.bundle import Bundle
from runtime.names import MANIFEST, MANIFEST_DIGEST


class ExportError(RuntimeError):
    """The export cannot produce a bundle that keeps its promises (e.g. parity fails)."""


class ExportBusyError(FileExistsError, ValueError):
    """Another export is writing the same destination; this one wrote nothing.

    Also a ValueError (a destination in use is a bad argument), so every
    command's one-line error path catches it.
    """


def lock_path(out: str) -> str:
    """The lock file that an export to `out` holds: ``.NAME.lock`` beside it."""
    parent, name = os.path.split(os.path.abspath(out))
    return os.path.join(parent, f".{name}.lock")


def _stale_pattern(name: str) -> re.Pattern:
    # mkdtemp's 8 random characters; ".old" is replace_dir's non-atomic fallback
    return re.compile(rf"\.{re.escape(name)}\.(tmp|old)-[a-z0-9_]{{8}}(\.old)?")


def _acquire(out: str) -> int:
    """Takes the lock on `out` without waiting; returns its file descriptor.

    The holder unlinks the lock file before releasing it, so a lock taken on
    a file that is no longer the one at the path is dropped and taken again.
    """
    path = lock_path(out)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode("ascii", "replace").strip()
            os.close(fd)
            who = f" (pid {holder})" if holder.isdigit() else ""
            raise ExportBusyError(
                f"another export{who} is writing {out} (it holds {path}); "
                "wait for it to finish or choose another --out"
            ) from None
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)  # its holder released and unlinked it meanwhile


def remove_stale(out: str) -> list[str]:
    """Removes the staging directories of killed exports to `out`; returns their paths.

    Only safe while holding `out`'s lock (as `Staged` does): then no live
    export owns any of them. Where `out` is missing because a killed
    non-atomic replacement had moved the old bundle away (``<staging>.old``,
    or ``.NAME.old-*/bundle`` of earlier versions), it is put back first.
    """
    parent, name = os.path.split(os.path.abspath(out))
    pattern = _stale_pattern(name)
    entries = sorted(e for e in os.listdir(parent) if pattern.fullmatch(e))
    if not os.path.lexists(out):
        for e in entries:
            moved = os.path.join(parent, e, "bundle") if ".old-" in e else os.path.join(parent, e)
            if (e.endswith(".old") or ".old-" in e) and os.path.isfile(
                os.path.join(moved, MANIFEST)
            ):
                os.rename(moved, out)
                break
    removed = []
    for entry in entries:
        p = os.path.join(parent, entry)
        if not os.path.lexists(p):  # the bundle put back above
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)
        removed.append(p)
    return removed


class Staged:
    """A bundle directory being assembled next to its destination, exclusively.

    Creating one takes the lock on `out` (`ExportBusyError` if another export
    holds it), removes the leftovers of killed exports, checks `out` and
    creates the staging directory ``self.dir``; `commit` swaps it in,
    `abort` deletes it, and either releases the lock.

    Raises:
      ExportBusyError: another export holds `out`.
      FileExistsError: `out` exists and `overwrite` is False, or `out` is a
        symlink, a file, or a non-empty directory that is not a bundle (no
        manifest), which an export never replaces.
    """

    def __init__(self, out: str, overwrite: bool):
        out = os.path.abspath(out)
        self.out = out
        self.dir = None
        os.makedirs(os.path.dirname(out), exist_ok=True)
        self._lock = _acquire(out)
        try:
            remove_stale(out)
            _check_destination(out, overwrite)
            self.dir = tempfile.mkdtemp(
                prefix=f".{os.path.basename(out)}.tmp-", dir=os.path.dirname(out)
            )
        except BaseException:
            self._release()
            raise

    def commit(self) -> None:
        """Replaces `out` with the staged bundle atomically, then releases the lock."""
        if self._lock is None:
            raise RuntimeError(f"staging of {self.out} was already committed or aborted")
        replace_dir(self.dir, self.out)
        self._release()

    def abort(self) -> None:
        """Deletes the staged directory and releases the lock (a no-op once done)."""
        if self._lock is None:
            return
        shutil.rmtree(self.dir, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is None:
            return
        try:
            os.unlink(lock_path(self.out))  # while still held: see _acquire
        except FileNotFoundError:
            pass
        os.close(self._lock)  # closing drops the flock
        self._lock = None

    def __enter__(self) -> Staged:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()  # after a commit: nothing left to do


def _check_destination(out: str, overwrite: bool) -> None:
    if os.path.islink(out):
        raise FileExistsError(f"{out} is a symlink; export to the directory it points to")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise FileExistsError(
            f"{out} exists and is not a directory; remove it or choose another --out"
        )
    if not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    if os.listdir(out) and not os.path.isfile(os.path.join(out, MANIFEST)):
        raise FileExistsError(
            f"{out} is not a bundle (it has no {MANIFEST}); refusing to replace it, "
            "remove it yourself or choose another --out"
        )


def write_manifest(directory: str, manifest: dict) -> None:
    """Records every file's sha256 + size in `manifest`, writes it and its own digest."""
    files = {}
    for name in sorted(os.listdir(directory)):
        if name in (MANIFEST, MANIFEST_DIGEST):
            continue
        p = os.path.join(directory, name)
        files[name] = {"sha256": sha256_file(p), "bytes": os.path.getsize(p)}
    manifest["files"] = files
    raw = (json.dumps(jsonable(manifest), indent=1, sort_keys=False) + "\n").encode()
    with open(os.path.join(directory, MANIFEST), "wb") as f:
        f.write(raw)
    with open(os.path.join(directory, MANIFEST_DIGEST), "w") as f:
        f.write(f"{hashlib.sha256(raw).hexdigest()}  {MANIFEST}\n")


def rewrite_manifest(bundle_dir: str, manifest: dict) -> None:
    """Replaces an existing bundle's manifest (same files), staged and verified first."""
    with Staged(bundle_dir, overwrite=True) as staged:
        for name in os.listdir(bundle_dir):
            if name not in (MANIFEST, MANIFEST_DIGEST):
                shutil.copy2(os.path.join(bundle_dir, name), os.path.join(staged.dir, name))
        write_manifest(staged.dir, manifest)
        Bundle.from_dir(staged.dir)
        staged.commit()
