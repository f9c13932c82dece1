"""A bundle on disk: ``manifest.json`` + ``manifest.sha256`` + the model files.

`Bundle.from_dir` verifies everything before any byte reaches the interpreter, and the
interpreter then runs exactly the bytes it verified:

* the manifest: a regular file of at most `MAX_MANIFEST_BYTES`, its own digest, strict JSON
  (no NaN/Infinity, no duplicate keys, nesting at most `MAX_JSON_DEPTH`, every number finite
  and integers within 2**53), its schema version and the types of the fields the runtime
  reads, and values that can be right: thresholds inside their criterion's range (entropy
  in [0, ln C], max-softmax in [0, 1]) and every count or size the runtime could be made to
  allocate under a cap (`LIMITS`);
* every listed file: a plain name (no separators, no symlink, resolves inside the bundle
  directory), a regular file read ONCE into memory; its size and sha256 are checked on those
  bytes, `tflite_model.read_model` parses those bytes (linear time, bounded tensor sizes),
  and the model's signatures must agree with the manifest (input and output shapes, every
  exit's logits [1, num_classes], the manifest's input = the first segment's input; a
  several-output signature's outputs by name and shape; an exit's optional ``stage`` takes
  its segment's input and gives exactly its segment's activation and [1, num_classes] logits);
* LiteRT itself: an interpreter built from the verified bytes prepares (allocates) every
  signature, so "verified" means LiteRT will run it.

`Bundle.load` / `Bundle.load_partitions` build interpreters from the verified bytes; nothing
re-opens a bundle's model by path. Every refusal is a `BundleError` with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

from runtime import criteria, latency_model, tflite_model
from runtime.encoding import ENCODINGS, Encoding, EncodingError
from runtime.lite import Model, Signature
from runtime.names import ACTIVATION, LOGITS, MANIFEST, MANIFEST_DIGEST, STAGE_OUTPUTS

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

# Caps on what a manifest can make the runtime read, walk or allocate.
MAX_MANIFEST_BYTES = 8 << 20
MAX_JSON_DEPTH = 32
MAX_INT = 1 << 53  # integers beyond this are not exact as JSON numbers anywhere else
LIMITS = {
    "file_bytes": (1 << 31) - 1,  # a flatbuffer cannot be larger
    "files": 16,
    "signatures": 4096,
    "outputs": 16,  # outputs of one signature
    "exits": 256,
    "num_classes": 100_000,
    "dimension": 1 << 16,  # any one input / signature dimension
    "num_clips": 10_000,
    "frames_per_clip": 100_000,
    "frames": 1_000_000,  # num_clips * frames_per_clip
    "frame_bytes": 4 << 30,  # frames * input elements * 4 (float32)
    "data_limit": 10_000_000,
    "image_size": 1 << 14,
}
_THRESHOLD_SLACK = 1e-6  # calibrated thresholds are observed scores; allow rounding


class BundleError(ValueError):
    """A bundle that is missing, corrupt or does not match its manifest."""


# ---------------------------------------------------------------------------------- files


def _valid_name(name: Any) -> bool:
    return (
        isinstance(name, str)
        and 0 < len(name) <= 255
        and name not in (".", "..", MANIFEST, MANIFEST_DIGEST)
        and not any(c in name for c in "/\\\0")
        and os.path.basename(name) == name
    )


def _read_regular(directory: str, name: str, cap: int) -> bytes:
    """Reads `directory/name` once: a regular file, not a symlink, at most `cap` bytes.

    The checks are made on the open descriptor (``O_NOFOLLOW`` + ``fstat``), so the bytes
    returned are the bytes of the file that passed them.
    """
    p = os.path.join(directory, name)
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        raise BundleError(f"bundle file {p} is missing") from None
    except OSError as e:
        raise BundleError(f"bundle file {p} cannot be read: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise BundleError(f"bundle file {p} is a symlink (bundle files must be regular files)")
    if os.path.realpath(os.path.dirname(p)) != os.path.realpath(directory):
        raise BundleError(f"bundle file {p} resolves outside the bundle directory")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        why = "is a symlink" if e.errno == errno.ELOOP else f"cannot be read: {e.strerror}"
        raise BundleError(f"bundle file {p} {why}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise BundleError(f"bundle file {p} is not a regular file")
    with os.fdopen(fd, "rb") as f:
        if st.st_size > cap:
            raise BundleError(f"bundle file {p} has {st.st_size} bytes, more than {cap} allowed")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise BundleError(f"bundle file {p} grew past {cap} bytes while being read")
    return data


def _bundle_dir(path: str) -> str:
    if not isinstance(path, str) or not os.path.isdir(path):
        raise BundleError(f"bundle {path} does not exist or is not a directory")
    return os.path.realpath(path)


class _StrictJSONError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _StrictJSONError(f"duplicate key {dup[:60]!r}")
    return out


def _no_constant(name: str) -> Any:
    raise _StrictJSONError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def _check_values(value: Any, where: str) -> None:
    """Iteratively: nesting depth, finite floats and integers within `MAX_INT` everywhere."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise BundleError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((x, depth + 1) for x in (v.values() if isinstance(v, dict) else v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise BundleError(f"{where} holds a non-finite number {v}")
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            raise BundleError(f"{where} holds an integer beyond 2**53 ({str(v)[:20]}...)")


def read_manifest(path: str) -> dict:
    """Reads ``manifest.json`` of a bundle directory after checking it against its digest.

    The manifest is at most `MAX_MANIFEST_BYTES` (checked before parsing), strict JSON (no
    NaN/Infinity constants, no duplicate keys), nested at most `MAX_JSON_DEPTH` deep, with
    finite numbers and integers within 2**53.

    Raises:
      BundleError: a missing directory or file, a symlink, a digest mismatch, invalid or
        oversized JSON.
    """
    return _read_manifest(path)[1]


def _read_manifest(path: str) -> tuple[str, dict]:
    """(sha256 of the manifest bytes, the parsed manifest): see `read_manifest`."""
    directory = _bundle_dir(path)
    mpath = os.path.join(path, MANIFEST)
    raw = _read_regular(directory, MANIFEST, MAX_MANIFEST_BYTES)
    digest = _read_regular(directory, MANIFEST_DIGEST, 1024)
    words = digest.decode("ascii", errors="replace").split()
    expected = words[0] if words else ""
    actual = hashlib.sha256(raw).hexdigest()
    if actual != expected:
        raise BundleError(f"{mpath} does not match its checksum in {MANIFEST_DIGEST} (corrupt)")
    try:
        manifest = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_no_duplicates
        )
    except _StrictJSONError as e:
        raise BundleError(f"{mpath} is not valid JSON: {e}") from None
    except RecursionError:
        raise BundleError(f"{mpath} nests deeper than {MAX_JSON_DEPTH} levels") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is not valid JSON: {' '.join(str(e).split())}") from None
    _check_values(manifest, mpath)
    return actual, manifest


def read_files(path: str, manifest: Mapping[str, Any]) -> dict[str, bytes]:
    """Reads every file `manifest["files"]` lists under `path` once, checking size and sha256.

    Returns:
      ``{file name: its verified bytes}``: use these bytes, never the file again.

    Raises:
      BundleError: a missing, truncated, replaced or corrupt file, a bad file name, a symlink
        or a file that is not regular, or more files / bytes than `LIMITS` allows.
    """
    directory = _bundle_dir(path)
    files = manifest.get("files") if isinstance(manifest, Mapping) else None
    if not isinstance(files, Mapping):
        raise BundleError(f"{path}/{MANIFEST} has no files table")
    if len(files) > LIMITS["files"]:
        raise BundleError(f"manifest lists {len(files)} files; at most {LIMITS['files']} allowed")
    out = {}
    for name, meta in files.items():
        if not _valid_name(name):
            raise BundleError(f"manifest lists an invalid file name {str(name)[:80]!r}")
        want = meta.get("bytes") if isinstance(meta, Mapping) else None
        if not isinstance(want, int) or isinstance(want, bool):
            raise BundleError(f"manifest files[{name!r}] needs an int 'bytes'")
        if not 0 <= want <= LIMITS["file_bytes"]:
            raise BundleError(f"manifest files[{name!r}] claims {want} bytes (out of range)")
        p = os.path.join(path, name)
        data = _read_regular(directory, name, want)
        if len(data) != want:
            raise BundleError(
                f"bundle file {p} has {len(data)} bytes, manifest says {want} "
                "(truncated or replaced)"
            )
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise BundleError(f"bundle file {p} does not match its sha256 (corrupt)")
        out[name] = data
    return out


@contextlib.contextmanager
def verified_copy(data: bytes, name: str) -> Iterator[str]:
    """Writes `data` (verified bytes) to a private temporary ``name``; yields its path."""
    with tempfile.TemporaryDirectory(prefix="bundle_") as tmp:
        path = os.path.join(tmp, name)
        with open(path, "wb") as f:
            f.write(data)
        yield path


def check_files(path: str, manifest: Mapping[str, Any]) -> None:
    """Checks the size and sha256 of every file `manifest["files"]` lists (see `read_files`).

    Raises:
      BundleError: a missing, truncated, replaced or corrupt file, or a bad file name.
    """
    read_files(path, manifest)


def _check_signatures(
    label: str, data: bytes, signatures: Mapping[str, Any]
) -> dict[str, tflite_model.SignatureInfo]:
    """The flatbuffer parses and has every signature with the promised shapes."""

    try:
        sigs = tflite_model.read_model(data)
    except tflite_model.ModelFormatError as e:
        raise BundleError(f"{label}: {e}") from None
    for name, meta in signatures.items():
        if name not in sigs:
            raise BundleError(f"{label} lacks signature {name!r} (wrong model file)")
        info = sigs[name]
        for key, tensors in (("input_shape", info.inputs), ("output_shape", info.outputs)):
            if key not in meta:
                continue
            got = tuple(tensors[0].shape) if tensors else ()
            if len(tensors) != 1 or got != tuple(meta[key]):
                raise BundleError(
                    f"{label} signature {name!r} {key.split('_')[0]}s {got} "
                    f"({len(tensors)} tensors), manifest says {tuple(meta[key])} "
                    "(wrong model file)"
                )
        if "outputs" in meta:
            got = {t.name: tuple(t.shape) for t in info.outputs}
            want = {o["name"]: tuple(o["shape"]) for o in meta["outputs"]}
            if got != want or len(info.outputs) != len(want):
                raise BundleError(
                    f"{label} signature {name!r} outputs {got}, manifest says {want} "
                    "(wrong model file)"
                )
    return sigs


def _prepare(label: str, data: bytes, sigs: Mapping[str, tflite_model.SignatureInfo]) -> None:
    """LiteRT builds an interpreter from `data` and prepares (allocates) every signature.

    After preparation, LiteRT's own input and output shapes must be the ones the flatbuffer
    declares (`sigs`): an op whose options imply another shape is refused here, not when a
    frame first flows from one segment into the next. Linear in the number of signatures:
    LiteRT's ``get_signature_runner`` re-lists every SignatureDef per call, so the list is
    read once and each subgraph is allocated once, however many signatures run it.
    """
    try:
        model = Model.from_bytes(data, name=label, default_delegates=False)
        interp = model.interpreter
        wrapper = getattr(interp, "_interpreter", None)
        defs = interp._get_full_signature_list()  # {key: {"inputs": {name: idx}, ...}}
        missing = [n for n in sigs if n not in defs]
        if missing:
            raise BundleError(f"{label}: LiteRT finds no signature {missing[0]!r}")
        allocated: set[int] = set()
        for n, info in sigs.items():
            if wrapper is None or not hasattr(wrapper, "GetSubgraphIndexFromSignature"):
                Signature(interp, n)  # pragma: no cover - other LiteRT versions
                continue
            sub = wrapper.GetSubgraphIndexFromSignature(n)
            if sub not in allocated:
                wrapper.AllocateTensors(sub)
                allocated.add(sub)
            for what, tensors, declared in (
                ("input", defs[n]["inputs"], info.inputs),
                ("output", defs[n]["outputs"], info.outputs),
            ):
                got = [
                    tuple(int(d) for d in interp._get_tensor_details(i, sub)["shape"])
                    for i in tensors.values()
                ]
                want = [tuple(t.shape) for t in declared]
                if len(got) != len(want) or not all(
                    len(g) == len(w) and all(b in (-1, a) for a, b in zip(g, w))
                    for g, w in zip(sorted(got), sorted(want))
                ):
                    raise BundleError(
                        f"{label}: LiteRT prepares signature {n!r} with {what} shapes {got}, "
                        f"the model declares {want} (corrupt or crafted)"
                    )
    except BundleError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever LiteRT raises, the model is refused
        detail = " ".join(str(e).split())[:200]
        raise BundleError(f"{label}: LiteRT refuses it: {type(e).__name__}: {detail}") from None


# ---------------------------------------------------------------------------------- schema


def _where(path: tuple) -> str:
    return "".join(f"[{p!r}]" if isinstance(p, str) else f"[{p}]" for p in path) or "manifest"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _need(m: Any, *path: Any, kind: str = "any", optional: bool = False) -> Any:
    """``m[path...]`` of `kind` (int, num, str, bool, dict, list, shape, any).

    `optional`: the last key may be absent (None is returned); a present value, null
    included, must be of `kind`.
    """
    v = m
    for i, p in enumerate(path):
        container_ok = isinstance(v, dict) if isinstance(p, str) else isinstance(v, list)
        if not container_ok:
            raise BundleError(f"{MANIFEST} is malformed: {_where(path[:i])} has the wrong type")
        if isinstance(p, str):
            if p not in v:
                if optional and i == len(path) - 1:
                    return None
                raise BundleError(f"{MANIFEST} is malformed: {_where(path[: i + 1])} is missing")
            v = v[p]
        else:
            v = v[p]
    ok = {
        "int": _is_int,
        "num": _is_num,
        "str": lambda x: isinstance(x, str),
        "bool": lambda x: isinstance(x, bool),
        "dict": lambda x: isinstance(x, dict),
        "list": lambda x: isinstance(x, list),
        "shape": lambda x: (
            isinstance(x, list) and all(_is_int(d) and 0 < d <= LIMITS["dimension"] for d in x)
        ),
        "any": lambda x: True,
    }[kind]
    if not ok(v):
        what = "a shape of positive ints" if kind == "shape" else f"of type {kind}"
        raise BundleError(f"{MANIFEST} is malformed: {_where(path)} must be {what}")
    return v


def _cap(value: int, key: str, where: str, low: int = 0) -> None:
    if not low <= value <= LIMITS[key]:
        raise BundleError(
            f"{MANIFEST}: {where} = {value} is outside [{low}, {LIMITS[key]}] (corrupt or crafted)"
        )


def _check_threshold(t: Any, criterion: str, num_classes: int, where: str) -> None:
    if t is None:
        return
    if not _is_num(t):
        raise BundleError(f"{MANIFEST} is malformed: threshold {where} must be a number or null")
    high = math.log(num_classes) if criterion == "entropy" else 1.0
    if not -_THRESHOLD_SLACK <= t <= high + _THRESHOLD_SLACK:
        raise BundleError(
            f"{MANIFEST}: threshold {where} = {t:g} is outside the {criterion} range "
            f"[0, {high:.6g}] for {num_classes} classes"
        )


def _check_criterion(c: Any, where: str) -> str:
    try:
        return criteria.check(c)
    except (ValueError, TypeError):
        raise BundleError(
            f"{MANIFEST}: {where} is {str(c)[:40]!r}; valid: {', '.join(criteria.CRITERIA)}"
        ) from None


def _check_outputs(m: dict, name: str) -> None:
    """A signature's optional ``outputs``: ``[{"name": str, "shape": shape}, ...]``, in order.

    What a several-output signature (a stage) declares instead of ``output_shape``.
    """
    outputs = _need(m, "signatures", name, "outputs", kind="list", optional=True)
    if outputs is None:
        return
    if "output_shape" in m["signatures"][name]:
        raise BundleError(f"{MANIFEST}: signature {name!r} has both output_shape and outputs")
    if not 2 <= len(outputs) <= LIMITS["outputs"]:
        raise BundleError(
            f"{MANIFEST}: signature {name!r} lists {len(outputs)} outputs; "
            f"2 to {LIMITS['outputs']} allowed (one output is output_shape)"
        )
    for j in range(len(outputs)):
        _need(m, "signatures", name, "outputs", j, kind="dict")
        _need(m, "signatures", name, "outputs", j, "name", kind="str")
        _need(m, "signatures", name, "outputs", j, "shape", kind="shape")
    if len({o["name"] for o in outputs}) != len(outputs):
        raise BundleError(f"{MANIFEST}: signature {name!r} lists an output name twice")


_ENCODING_KEYS = {"name", "scale", "zero_point", "bytes", "exits"}
_EFFECT_KEYS = {"accuracy", "agreement"}
_EVAL_KEYS = {"calibration_frames", "validation_frames"}


def _check_encodings(part: dict) -> None:
    """The optional cut-tensor encodings of a partitions section (`export.partitions`).

    Per cut ``activations[cut].encodings``: float32 first, each encoding at most
    once, valid parameters (`runtime.encoding.Encoding.from_json`), its bytes
    those of the cut's shape, and an accuracy / agreement in [0, 1] for exactly
    the exits whose edge path reads that cut. Bundles without encodings
    (float32 only) pass unchanged.
    """
    readers: dict[str, set[str]] = {}
    for e in part["exits"]:
        for p in e["edge"]:
            readers.setdefault(p, set()).add(e["name"])
    ev = part.get("encoding_eval")
    if ev is not None:
        if (
            not isinstance(ev, dict)
            or set(ev) != _EVAL_KEYS
            or not all(_is_int(v) and 1 <= v <= MAX_INT for v in ev.values())
        ):
            raise BundleError(
                f"{MANIFEST}: partitions encoding_eval must be {{{', '.join(sorted(_EVAL_KEYS))}}}"
                " with positive integers"
            )
    for cut, act in part["activations"].items():
        where = f"partitions cut {cut!r}"
        if not isinstance(act, dict):
            raise BundleError(f"{MANIFEST}: {where}: activation must be an object")
        unknown = set(act) - {"shape", "dtype", "bytes", "encodings"}
        if unknown:
            raise BundleError(f"{MANIFEST}: {where} has unknown keys {sorted(unknown)[:3]}")
        entries = act.get("encodings")
        if entries is None:
            continue
        if ev is None:
            raise BundleError(f"{MANIFEST}: {where} has encodings but no encoding_eval")
        if cut not in readers:
            raise BundleError(f"{MANIFEST}: {where} has encodings but no edge path reads it")
        if not isinstance(entries, list) or not 1 <= len(entries) <= len(ENCODINGS):
            raise BundleError(f"{MANIFEST}: {where}: encodings must list 1 to {len(ENCODINGS)}")
        seen = []
        for j, entry in enumerate(entries):
            at = f"{where} encoding {j}"
            if not isinstance(entry, dict):
                raise BundleError(f"{MANIFEST}: {at} must be an object")
            unknown = set(entry) - _ENCODING_KEYS
            if unknown:
                raise BundleError(f"{MANIFEST}: {at} has unknown keys {sorted(unknown)[:3]}")
            try:
                enc = Encoding.from_json({k: entry[k] for k in ("name", "scale", "zero_point")
                                          if k in entry})  # fmt: skip
            except EncodingError as e:
                raise BundleError(f"{MANIFEST}: {at}: {e}") from None
            if enc.name != "int8" and ("scale" in entry or "zero_point" in entry):
                raise BundleError(f"{MANIFEST}: {at}: {enc.name} takes no scale or zero_point")
            if enc.name in seen:
                raise BundleError(f"{MANIFEST}: {where} lists {enc.name} twice")
            seen.append(enc.name)
            want = enc.nbytes(act["shape"])
            if not _is_int(entry.get("bytes")) or entry["bytes"] != want:
                raise BundleError(
                    f"{MANIFEST}: {at}: bytes must be {want} for {enc.name} of {act['shape']}"
                )
            exits = entry.get("exits")
            if not isinstance(exits, dict) or set(exits) != readers[cut]:
                raise BundleError(f"{MANIFEST}: {at}: exits must be exactly {sorted(readers[cut])}")
            for name, eff in exits.items():
                if (
                    not isinstance(eff, dict)
                    or set(eff) != _EFFECT_KEYS
                    or not all(_is_num(v) and 0.0 <= v <= 1.0 for v in eff.values())
                ):
                    raise BundleError(
                        f"{MANIFEST}: {at} exit {name!r}: needs accuracy and agreement in [0, 1]"
                    )
        if seen[0] != "float32":
            raise BundleError(f"{MANIFEST}: {where}: float32 (the reference) must come first")


def _check_stage(m: dict, i: int, last: bool) -> None:
    """An exit's optional ``stage``: a signature with outputs `STAGE_OUTPUTS`, side exits only.

    Absent or null: the exit runs as segment then head (bundles exported before stages).
    """
    stage = _need(m, "exits", i, "stage", kind="any", optional=True)
    if stage is None:
        return
    name = m["exits"][i]["name"]
    if last:
        raise BundleError(
            f"{MANIFEST}: the final exit {name!r} has a stage (its segment already ends in logits)"
        )
    if not isinstance(stage, str) or stage not in m["signatures"]:
        raise BundleError(f"exit {name!r} names unknown stage signature {str(stage)[:80]!r}")
    outputs = m["signatures"][stage].get("outputs")
    names = tuple(o["name"] for o in outputs) if outputs is not None else ()
    if names != STAGE_OUTPUTS:
        raise BundleError(
            f"{MANIFEST}: stage signature {stage!r} of exit {name!r} must declare outputs "
            f"{list(STAGE_OUTPUTS)}, in that order; it declares {list(names)}"
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
      stage: signature running the segment and then the head in one call (outputs
        `runtime.names.STAGE_OUTPUTS`); None for ``final`` and in bundles without stages.
    """

    name: str
    after: int
    segment: str
    head: str | None
    threshold: float | None
    stage: str | None = None


class Bundle:
    """A verified bundle. Construct with `Bundle.from_dir`.

    Attributes:
      path: the bundle directory.
      manifest: the verified manifest.
      files: ``{file name: bytes}`` of every file, as verified (what the interpreters run).
      digest: sha256 of the verified ``manifest.json`` bytes (what edge and device compare).
    """

    def __init__(
        self, path: str, manifest: Mapping[str, Any], files: Mapping[str, bytes] | None = None
    ):
        self.path = path
        self.manifest = manifest
        self.files = dict(files or {})
        self.digest = ""

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str) -> Bundle:
        """Opens and verifies a bundle directory (module docstring: what is checked).

        Raises:
          BundleError: anything missing, corrupt, inconsistent or out of range (one line).
        """
        digest, manifest = _read_manifest(path)
        bundle = cls(path, manifest)
        bundle.digest = digest
        bundle._check_manifest()
        bundle.files = read_files(path, manifest)
        bundle._check_model()
        bundle._check_partitions()
        return bundle

    def _check_manifest(self) -> None:
        m = self.manifest
        if not isinstance(m, dict):
            raise BundleError(f"{self.path}/{MANIFEST} is not a JSON object")
        version = m.get("schema_version")
        if version != SCHEMA_VERSION or not _is_int(version):
            raise BundleError(
                f"bundle {self.path} has schema version {str(version)[:20]!r}; this runtime "
                f"reads version {SCHEMA_VERSION} (re-export it with this flexjax)"
            )
        missing = [k for k in _REQUIRED if k not in m]
        if missing:
            raise BundleError(f"{self.path}/{MANIFEST} lacks {', '.join(missing)}")
        try:
            self._check_structure(m)
        except (TypeError, KeyError, AttributeError, ValueError, IndexError) as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(
                f"{self.path}/{MANIFEST} is malformed: {type(e).__name__} {e}"
            ) from None

    def _check_structure(self, m: dict) -> None:
        files = _need(m, "files", kind="dict")
        if len(files) > LIMITS["files"]:
            raise BundleError(f"manifest lists {len(files)} files; at most {LIMITS['files']}")
        for name in files:
            _need(m, "files", name, "bytes", kind="int")
            _need(m, "files", name, "sha256", kind="str")
        if _need(m, "model", kind="str") not in files:
            raise BundleError(f"manifest model file {m['model']!r} is not among its files")
        _need(m, "format", kind="str")
        _need(m, "precision", kind="str")
        c = _need(m, "net", "num_classes", kind="int")
        _cap(c, "num_classes", "net.num_classes", low=2)
        shape = _need(m, "input", "shape", kind="shape")
        if len(shape) != 4 or shape[0] != 1:
            raise ValueError("input.shape must be [1, H, W, C]")
        net_shape = _need(m, "net", "input_shape", kind="shape", optional=True)
        if net_shape is not None and list(net_shape) != list(shape[1:]):
            raise BundleError(f"{MANIFEST}: net.input_shape {net_shape} != input.shape {shape}")
        sigs = _need(m, "signatures", kind="dict")
        if not 0 < len(sigs) <= LIMITS["signatures"]:
            raise BundleError(
                f"{MANIFEST}: {len(sigs)} signatures; 1 to {LIMITS['signatures']} allowed"
            )
        for name in sigs:
            _need(m, "signatures", name, "input_shape", kind="shape")
            _need(m, "signatures", name, "output_shape", kind="shape", optional=True)
            _check_outputs(m, name)
            for key, kind in (("flops", "num"), ("ops", "dict"), ("gpu_compatible", "bool")):
                _need(m, "signatures", name, key, kind=kind, optional=True)
        exits = _need(m, "exits", kind="list")
        if not exits or not isinstance(exits[-1], dict) or exits[-1].get("head") is not None:
            raise ValueError("exits must be non-empty and end with the backbone's final exit")
        if len(exits) > LIMITS["exits"]:
            raise BundleError(f"{MANIFEST}: {len(exits)} exits; at most {LIMITS['exits']}")
        criterion = _check_criterion(m["criterion"], "criterion")
        names = set()
        for i, e in enumerate(exits):
            if not isinstance(e, dict):
                raise TypeError("every exit needs a str 'name' and an int 'after'")
            if not isinstance(e.get("name"), str) or not _is_int(e.get("after")):
                raise TypeError("every exit needs a str 'name' and an int 'after'")
            if "head" not in e:
                raise KeyError(f"exit {e['name']!r} lacks 'head' (null for the final exit)")
            if e["name"] in names:
                raise BundleError(f"{MANIFEST}: exit {e['name']!r} appears twice")
            names.add(e["name"])
            for key in ("segment", "head"):
                sig = e.get(key)
                if key == "segment" and not isinstance(sig, str):
                    raise TypeError(f"exit {e['name']!r} needs a str 'segment'")
                if sig is not None and (not isinstance(sig, str) or sig not in sigs):
                    raise BundleError(f"exit {e['name']!r} names unknown signature {sig!r}")
            if i < len(exits) - 1 and e.get("head") is None:
                raise ValueError(f"side exit {e['name']!r} needs a head signature")
            _check_stage(m, i, last=i == len(exits) - 1)
            _need(m, "exits", i, "flops", kind="num", optional=True)
            _check_threshold(e.get("threshold"), criterion, c, f"exits[{i}].threshold")
        cal = _need(m, "calibration", kind="dict")
        if "criterion" in cal:
            _check_criterion(cal["criterion"], "calibration.criterion")
        _need(m, "calibration", "epsilon", kind="num", optional=True)
        thresholds = _need(m, "calibration", "thresholds", kind="dict")
        for name, t in thresholds.items():
            if t is not None and not _is_num(t):
                raise TypeError(f"threshold of {name!r} must be a number or null")
            _check_threshold(t, criterion, c, f"calibration.thresholds[{name!r}]")
        for i, row in enumerate(_need(m, "calibrations", kind="list", optional=True) or []):
            _need(m, "calibrations", i, "source", kind="str")
            _need(m, "calibrations", i, "epsilon", kind="num")
            rc = _check_criterion(row.get("criterion", criterion), f"calibrations[{i}].criterion")
            for name, t in _need(m, "calibrations", i, "thresholds", kind="dict").items():
                _check_threshold(t, rc, c, f"calibrations[{i}].thresholds[{name!r}]")
        self._check_sizes(m)

    def _check_sizes(self, m: dict) -> None:
        """Caps on the sizes the data loaders allocate from the manifest (`runtime.data`)."""
        video = _need(m, "video", kind="dict", optional=True) or {}
        counts = {}
        for key in ("num_clips", "frames_per_clip", "seed"):
            v = _need(m, "video", key, kind="int", optional=True) if video else None
            if v is not None and key != "seed":
                _cap(v, key, f"video.{key}", low=1)
            counts[key] = v
        if counts["num_clips"] and counts["frames_per_clip"]:
            frames = counts["num_clips"] * counts["frames_per_clip"]
            _cap(frames, "frames", "video frames (num_clips * frames_per_clip)")
            shape = m["input"]["shape"]
            _cap(frames * math.prod(shape) * 4, "frame_bytes", "video frame bytes")
        data = _need(m, "data", kind="dict", optional=True) or {}
        if data:
            for key, cap in (("limit", "data_limit"), ("image_size", "image_size")):
                v = _need(m, "data", key, kind="int", optional=True)
                if v is not None:
                    _cap(v, cap, f"data.{key}")
            ch = _need(m, "data", "channels", kind="int", optional=True)
            if ch is not None and not 0 <= ch <= 4:
                raise BundleError(f"{MANIFEST}: data.channels = {ch} is outside [0, 4]")

    def _check_model(self) -> None:
        m = self.manifest
        label = self.model_path
        sigs = _check_signatures(label, self.files[m["model"]], m["signatures"])
        c = self.num_classes
        first = m["exits"][0]["segment"]
        got = sigs[first].inputs[0].shape
        if tuple(got) != tuple(m["input"]["shape"]):
            raise BundleError(
                f"{label}: first segment {first!r} takes {tuple(got)}, manifest input is "
                f"{tuple(m['input']['shape'])} (wrong model file)"
            )
        prev = None
        for e in m["exits"]:
            seg = sigs[e["segment"]]
            if prev is not None and seg.inputs[0].shape != prev:
                raise BundleError(
                    f"{label}: segment {e['segment']!r} takes {seg.inputs[0].shape}, the "
                    f"previous segment gives {prev} (inconsistent bundle)"
                )
            prev = seg.outputs[0].shape
            logits = sigs[e["head"]] if e["head"] is not None else seg
            if e["head"] is not None and logits.inputs[0].shape != prev:
                raise BundleError(
                    f"{label}: head {e['head']!r} takes {logits.inputs[0].shape}, its segment "
                    f"gives {prev} (inconsistent bundle)"
                )
            if tuple(logits.outputs[0].shape) != (1, c):
                raise BundleError(
                    f"{label}: exit {e['name']!r} gives {logits.outputs[0].shape}, expected "
                    f"logits (1, {c}) for net.num_classes={c} (wrong model file)"
                )
            if e.get("stage") is not None:
                stage = sigs[e["stage"]]
                got = {t.name: tuple(t.shape) for t in stage.outputs}
                want = {ACTIVATION: tuple(prev), LOGITS: (1, c)}
                if stage.inputs[0].shape != seg.inputs[0].shape or got != want:
                    raise BundleError(
                        f"{label}: stage {e['stage']!r} maps {stage.inputs[0].shape} to {got}; "
                        f"exit {e['name']!r} needs {seg.inputs[0].shape} to {want} "
                        "(inconsistent bundle)"
                    )
        _prepare(label, self.files[m["model"]], sigs)

    def _check_partitions(self) -> None:
        """The optional Edgent sections: partition signatures and latency models."""
        part = self.manifest.get("partitions")
        if part is not None:
            try:
                sigs = dict(part["signatures"])
                if len(sigs) > LIMITS["signatures"]:
                    raise BundleError(f"{MANIFEST}: {len(sigs)} partition signatures")
                names = [*part["device"].values()]
                for e in part["exits"]:
                    names += list(e["edge"].values())
                for key in part["activations"].values():
                    if not all(_is_int(d) and d > 0 for d in key["shape"]):
                        raise TypeError("activation shapes must be positive ints")
                for name in sigs:
                    _need(part, "signatures", name, "input_shape", kind="shape")
                    _need(part, "signatures", name, "output_shape", kind="shape", optional=True)
                if not isinstance(part["model"], str) or part["model"] not in self.files:
                    raise BundleError(f"partition model {part['model']!r} is not among its files")
                missing = [n for n in names if n not in sigs]
                if missing:
                    raise BundleError(f"partitions name unknown signatures {missing[:3]}")
                _check_encodings(part)
            except (TypeError, KeyError, AttributeError, IndexError) as e:
                raise BundleError(
                    f"{self.path}/{MANIFEST} has a malformed partitions section: "
                    f"{type(e).__name__} {e}"
                ) from None
            label = os.path.join(self.path, part["model"])
            data = self.files[part["model"]]
            infos = _check_signatures(label, data, sigs)
            _prepare(label, data, infos)
        models = self.manifest.get("latency_models")
        if models is not None:
            try:
                for target in models.values():
                    latency_model.check(target)
            except (latency_model.LatencyModelError, AttributeError, TypeError) as e:
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
            ExitInfo(
                e["name"],
                e["after"],
                e["segment"],
                e["head"],
                thresholds.get(e["name"]),
                e.get("stage"),
            )  # fmt: skip
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

    def load(self, num_threads: int = 1) -> Model:
        """An interpreter (`runtime.lite.Model`) over the verified bytes of the bundle's model."""
        return Model.from_bytes(
            self.files[self.manifest["model"]], num_threads, name=self.model_path
        )

    @contextlib.contextmanager
    def verified_file(self, name: str | None = None) -> Iterator[str]:
        """A private temporary copy of the verified bytes of file `name` (default: the model).

        For tools that need a path (``adb push`` of the model to a phone): they get the bytes
        that were verified, not whatever the bundle directory holds now. Removed on exit.
        """
        name = self.manifest["model"] if name is None else name
        with verified_copy(self.files[name], name) as path:
            yield path

    def load_partitions(self, num_threads: int = 1) -> Model:
        """An interpreter over the verified bytes of the Edgent partition model.

        Raises:
          BundleError: the bundle has no partitions (export it with --partitions).
        """
        part = self.manifest.get("partitions")
        if part is None:
            raise BundleError(f"bundle {self.path} has no partitions (export it with --partitions)")
        return Model.from_bytes(
            self.files[part["model"]], num_threads, name=os.path.join(self.path, part["model"])
        )


def _num(v: Any, fmt: str) -> str:
    """`v` formatted, or ``?`` when an optional descriptive field is missing or not a number."""
    return format(v, fmt) if _is_num(v) else "?"


def summary(manifest: Mapping[str, Any]) -> str:
    """A short human-readable summary of a verified bundle.

    Descriptive fields the runtime does not otherwise read (flops, ops, GPU verdicts, test
    results) may be absent or odd in a hand-edited manifest: they print as ``?``.
    """

    def get(obj: Any, *keys: str) -> Any:
        for k in keys:
            obj = obj.get(k) if isinstance(obj, Mapping) else None
        return obj

    gpu = get(manifest, "gpu", "compatible")
    lines = [
        f"precision {manifest['precision']}{' +sparsity' if get(manifest, 'sparsity') else ''}"
        f", model {_num(manifest['files'][manifest['model']]['bytes'], ',')} bytes, "
        f"GPU-delegate compatible: {gpu if isinstance(gpu, bool) else '?'}",
        f"{'signature':<16}{'flops':>14}{'gpu':>6}  ops",
    ]
    for name, s in manifest["signatures"].items():
        ops = get(s, "ops")
        ops = ",".join(f"{k}x{v}" for k, v in sorted(ops.items())) if isinstance(ops, dict) else "?"
        g = get(s, "gpu_compatible")
        g = "?" if not isinstance(g, bool) else "yes" if g else "NO"
        lines.append(f"{name:<16}{_num(get(s, 'flops'), ','):>14}{g:>6}  {ops}")
    cal = manifest["calibration"]
    lines.append(
        f"calibrated on val ({get(cal, 'criterion') or manifest['criterion']}, "
        f"eps={_num(get(cal, 'epsilon'), 'g')}): "
        + ", ".join(
            f"{n}: {'never' if t is None else f'{t:.3g}'}" for n, t in cal["thresholds"].items()
        )
    )
    t = get(manifest, "test")
    if isinstance(t, dict):
        rates = t.get("exit_rates") if isinstance(t.get("exit_rates"), dict) else {}
        lines.append(
            f"test ({_num(t.get('examples'), 'g')}): early-exit accuracy "
            f"{_num(t.get('accuracy'), '.4f')} (final {_num(t.get('final_accuracy'), '.4f')}), "
            f"FLOPs {_num(t.get('flops_ratio'), '.3f')}x of the backbone, "
            "exit rates " + ", ".join(f"{n} {_num(r, '.2f')}" for n, r in rates.items())
        )
    return "\n".join(lines)
