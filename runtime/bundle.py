"""A bundle on disk: ``manifest.json`` + ``manifest.sha256`` + the model files.

`Bundle.from_dir` verifies everything before any byte reaches the
interpreter: the manifest's own digest, its schema version and required
fields, the size and sha256 of every file it lists, and that the flatbuffer
parses and holds the signatures the manifest promises with the shapes it
promises. A truncated, bit-flipped or swapped file is a `BundleError` with one
clear line, never a crash inside LiteRT.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

from flexjax.io import sha256_file
from runtime import latency_model, tflite_model
from runtime.lite import Model
from runtime.names import MANIFEST, MANIFEST_DIGEST

SCHEMA_VERSION = 1
_REQUIRED = (
    "schema_version",
    "format",
    "model",
    "net",
    "precision",
    "input",
    "signatures",
    "exits",
    "criterion",
    "calibration",
    "files",
)


class BundleError(ValueError):
    """A bundle that is missing, corrupt or does not match its manifest."""


def read_manifest(path: str) -> dict:
    """Reads ``manifest.json`` of a bundle directory after checking it against its digest.

    Raises:
      BundleError: a missing directory or file, a digest mismatch or invalid JSON.
    """
    if not os.path.isdir(path):
        raise BundleError(f"bundle {path} does not exist or is not a directory")
    mpath = os.path.join(path, MANIFEST)
    dpath = os.path.join(path, MANIFEST_DIGEST)
    for p in (mpath, dpath):
        if not os.path.isfile(p):
            raise BundleError(f"bundle {path} has no {os.path.basename(p)}")
    with open(mpath, "rb") as f:
        raw = f.read()
    with open(dpath, encoding="ascii", errors="replace") as f:
        expected = f.read().split()[0] if os.path.getsize(dpath) else ""
    if hashlib.sha256(raw).hexdigest() != expected:
        raise BundleError(f"{mpath} does not match its checksum in {MANIFEST_DIGEST} (corrupt)")
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None


def check_files(path: str, manifest: Mapping[str, Any]) -> None:
    """Checks the size and sha256 of every file `manifest["files"]` lists under `path`.

    Raises:
      BundleError: a missing, truncated, replaced or corrupt file, or a bad file name.
    """
    for name, meta in manifest["files"].items():
        if os.path.basename(name) != name or name in (MANIFEST, MANIFEST_DIGEST):
            raise BundleError(f"manifest lists an invalid file name {name!r}")
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            raise BundleError(f"bundle file {p} is missing")
        size = os.path.getsize(p)
        if size != meta.get("bytes"):
            raise BundleError(
                f"bundle file {p} has {size} bytes, manifest says {meta.get('bytes')} "
                "(truncated or replaced)"
            )
        if sha256_file(p) != meta.get("sha256"):
            raise BundleError(f"bundle file {p} does not match its sha256 (corrupt)")


def _check_signatures(model_path: str, signatures: Mapping[str, Any]) -> None:
    """The flatbuffer parses and has every signature with the promised input shape."""

    with open(model_path, "rb") as f:
        data = f.read()
    try:
        sigs = tflite_model.read_model(data)
    except tflite_model.ModelFormatError as e:
        raise BundleError(f"{model_path}: {e}") from None
    for name, meta in signatures.items():
        if name not in sigs:
            raise BundleError(f"{model_path} lacks signature {name!r} (wrong model file)")
        info = sigs[name]
        got = tuple(info.inputs[0].shape) if info.inputs else ()
        if got != tuple(meta["input_shape"]):
            raise BundleError(
                f"{model_path} signature {name!r} takes {got}, manifest says "
                f"{tuple(meta['input_shape'])} (wrong model file)"
            )


@dataclasses.dataclass(frozen=True)
class ExitInfo:
    """One exit as the runtime sees it (execution order; the last is ``final``).

    Attributes:
      name: exit name (``final`` for the end of the backbone).
      after: backbone position it hangs off (last position for ``final``).
      segment: signature computing the backbone up to this exit.
      head: signature of the exit head; None for ``final`` (its segment ends in logits).
      threshold: calibrated threshold in natural units; None = never exits early.
    """

    name: str
    after: int
    segment: str
    head: str | None
    threshold: float | None


class Bundle:
    """A verified bundle. Construct with `Bundle.from_dir`."""

    def __init__(self, path: str, manifest: Mapping[str, Any]):
        self.path = path
        self.manifest = manifest

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> Bundle:
        """Opens and verifies a bundle directory.

        Raises:
          BundleError: anything missing, corrupt or inconsistent (one line).
        """
        manifest = read_manifest(path)
        bundle = cls(path, manifest)
        bundle._check_manifest()
        bundle._check_files()
        bundle._check_model()
        bundle._check_partitions()
        return bundle

    def _check_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict):
            raise BundleError(f"{self.path}/{MANIFEST} is not a JSON object")
        version = m.get("schema_version")
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"bundle {self.path} has schema version {version!r}; this runtime reads "
                f"version {SCHEMA_VERSION} (re-export it with this flexjax)"
            )
        missing = [k for k in _REQUIRED if k not in m]
        if missing:
            raise BundleError(f"{self.path}/{MANIFEST} lacks {', '.join(missing)}")
        try:
            self._check_structure(m)
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise BundleError(
                f"{self.path}/{MANIFEST} is malformed: {type(e).__name__} {e}"
            ) from None

    def _check_structure(self, m: dict) -> None:
        if m["model"] not in m["files"]:
            raise BundleError(f"manifest model file {m['model']!r} is not among its files")
        for name, meta in m["files"].items():
            if not (isinstance(meta["bytes"], int) and isinstance(meta["sha256"], str)):
                raise TypeError(f"files[{name!r}] needs an int 'bytes' and a str 'sha256'")
        for name, sig in m["signatures"].items():
            if not all(isinstance(d, int) for d in sig["input_shape"]):
                raise TypeError(f"signatures[{name!r}].input_shape must be ints")
        if not m["exits"] or m["exits"][-1]["head"] is not None:
            raise ValueError("exits must be non-empty and end with the backbone's final exit")
        for e in m["exits"]:
            if not isinstance(e["name"], str) or not isinstance(e["after"], int):
                raise TypeError("every exit needs a str 'name' and an int 'after'")
            for key in ("segment", "head"):
                sig = e[key]
                if sig is not None and sig not in m["signatures"]:
                    raise BundleError(f"exit {e['name']!r} names unknown signature {sig!r}")
        thresholds = m["calibration"]["thresholds"]
        for name, t in thresholds.items():
            if t is not None and not isinstance(t, (int, float)):
                raise TypeError(f"threshold of {name!r} must be a number or null")
        if len(m["input"]["shape"]) != 4:
            raise ValueError("input.shape must be [1, H, W, C]")

    def _check_files(self) -> None:
        check_files(self.path, self.manifest)

    def _check_model(self) -> None:
        _check_signatures(self.model_path, self.manifest["signatures"])

    def _check_partitions(self) -> None:
        """The optional Edgent sections: partition signatures and latency models."""
        part = self.manifest.get("partitions")
        if part is not None:
            try:
                sigs = dict(part["signatures"])
                names = [*part["device"].values()]
                for e in part["exits"]:
                    names += list(e["edge"].values())
                for key in part["activations"].values():
                    if not all(isinstance(d, int) for d in key["shape"]):
                        raise TypeError("activation shapes must be ints")
                path = os.path.join(self.path, part["model"])
                if part["model"] not in self.manifest["files"]:
                    raise BundleError(f"partition model {part['model']!r} is not among its files")
                missing = [n for n in names if n not in sigs]
                if missing:
                    raise BundleError(f"partitions name unknown signatures {missing[:3]}")
                _check_signatures(path, sigs)
            except (TypeError, KeyError, AttributeError) as e:
                raise BundleError(
                    f"{self.path}/{MANIFEST} has a malformed partitions section: "
                    f"{type(e).__name__} {e}"
                ) from None
        models = self.manifest.get("latency_models")
        if models is not None:
            try:
                for target in models.values():
                    latency_model.check(target)
            except (latency_model.LatencyModelError, AttributeError) as e:
                raise BundleError(f"{self.path}/{MANIFEST}: latency_models: {e}") from None

    # -- accessors ---------------------------------------------------------------------------

    @property
    def model_path(self) -> str:
        return os.path.join(self.path, self.manifest["model"])

    @property
    def criterion(self) -> str:
        return self.manifest["criterion"]

    @property
    def num_classes(self) -> int:
        return int(self.manifest["net"]["num_classes"])

    @property
    def exits(self) -> tuple[ExitInfo, ...]:
        thresholds = self.manifest["calibration"]["thresholds"]
        return tuple(
            ExitInfo(e["name"], e["after"], e["segment"], e["head"], thresholds.get(e["name"]))
            for e in self.manifest["exits"]
        )

    def calibration(self, source: str = "val", epsilon: float | None = None) -> dict:
        """The calibration row (thresholds, val accuracy, exit rates) for `source` and `epsilon`.

        `source` is ``val`` (still images) or ``video_val``; `epsilon` defaults to
        the bundle's own.

        Raises:
          BundleError: no such calibration (the error lists those there are).
        """
        rows = self.manifest.get("calibrations", [])
        eps = self.manifest["calibration"]["epsilon"] if epsilon is None else epsilon
        for r in rows:
            if r["source"] == source and abs(r["epsilon"] - eps) < 1e-9:
                return r
        have = sorted({(r["source"], r["epsilon"]) for r in rows})
        raise BundleError(
            f"bundle has no calibration for source={source} epsilon={eps}; has {have}"
        )

    def load(self, num_threads: int = 1):
        """The interpreter for this bundle's model (`runtime.lite.Model`)."""

        return Model(self.model_path, num_threads=num_threads)


def summary(manifest: Mapping[str, Any]) -> str:
    """A short human-readable summary of a bundle."""
    lines = [
        f"precision {manifest['precision']}{' +sparsity' if manifest['sparsity'] else ''}, "
        f"model {manifest['files'][manifest['model']]['bytes']:,} bytes, "
        f"GPU-delegate compatible: {manifest['gpu']['compatible']}",
        f"{'signature':<16}{'flops':>14}{'gpu':>6}  ops",
    ]
    for name, s in manifest["signatures"].items():
        ops = ",".join(f"{k}x{v}" for k, v in sorted(s["ops"].items()))
        lines.append(
            f"{name:<16}{s['flops']:>14,}{'yes' if s['gpu_compatible'] else 'NO':>6}  {ops}"
        )
    cal = manifest["calibration"]
    lines.append(
        f"calibrated on val ({cal['criterion']}, eps={cal['epsilon']}): "
        + ", ".join(
            f"{n}: {'never' if t is None else f'{t:.3g}'}" for n, t in cal["thresholds"].items()
        )
    )
    t = manifest["test"]
    lines.append(
        f"test ({t['examples']}): early-exit accuracy {t['accuracy']:.4f} "
        f"(final {t['final_accuracy']:.4f}), FLOPs {t['flops_ratio']:.3f}x of the backbone, "
        "exit rates " + ", ".join(f"{n} {r:.2f}" for n, r in t["exit_rates"].items())
    )
    return "\n".join(lines)
