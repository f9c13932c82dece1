"""Writing a bundle directory safely: staged next to its destination, then renamed.

Every exporter (`export.bundle`, `export.partitions`, `export.sweep`,
`export.latency_fit`) builds its bundle through `Staged` and seals it with
`write_manifest`, so a failed export leaves nothing half-written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile

from flexjax.io import jsonable, sha256_file
from runtime.bundle import Bundle
from runtime.names import MANIFEST, MANIFEST_DIGEST


class ExportError(RuntimeError):
    """The export cannot produce a bundle that keeps its promises (e.g. parity fails)."""


class Staged:
    """A bundle directory being assembled next to its destination."""

    def __init__(self, out: str, overwrite: bool):
        out = os.path.abspath(out)
        if os.path.exists(out) and not overwrite:
            raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
        parent = os.path.dirname(out)
        os.makedirs(parent, exist_ok=True)
        self.out = out
        self.dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)

    def commit(self) -> None:
        old = None
        if os.path.exists(self.out):
            old = tempfile.mkdtemp(
                prefix=f".{os.path.basename(self.out)}.old-", dir=os.path.dirname(self.out)
            )
            os.rename(self.out, os.path.join(old, "bundle"))
        os.rename(self.dir, self.out)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


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
    staged = Staged(bundle_dir, overwrite=True)
    try:
        for name in os.listdir(bundle_dir):
            if name not in (MANIFEST, MANIFEST_DIGEST):
                shutil.copy2(os.path.join(bundle_dir, name), os.path.join(staged.dir, name))
        write_manifest(staged.dir, manifest)
        Bundle.from_dir(staged.dir)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
