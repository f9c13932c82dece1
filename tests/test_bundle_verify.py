"""runtime.bundle verification by class: sense of the manifest, bytes verified = bytes run, LiteRT.

Every case list here is GENERATED (from the manifest's own paths, the caps, the criteria
ranges, a seeded fuzzer), not a list of cases someone happened to try. A rewritten manifest
always gets a recomputed digest, so it is the deep checks that must refuse it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest

from runtime import Bundle, BundleError, criteria
from runtime import bundle as bundle_lib
from runtime.lite import Model
from runtime.names import MANIFEST, MANIFEST_DIGEST

from conftest import ROOT


@pytest.fixture
def copy(smoke_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, dst)
    return str(dst)


def _write_raw(path: str, raw: bytes) -> None:
    with open(os.path.join(path, MANIFEST), "wb") as f:
        f.write(raw)
    with open(os.path.join(path, MANIFEST_DIGEST), "w") as f:
        f.write(hashlib.sha256(raw).hexdigest() + "\n")


def _manifest(path: str) -> dict:
    with open(os.path.join(path, MANIFEST)) as f:
        return json.load(f)


def _rewrite(path: str, edit) -> None:
    m = _manifest(path)
    edit(m)
    _write_raw(path, json.dumps(m).encode())


def _refused(path: str, match: str | None = None) -> str:
    with pytest.raises(BundleError) as e:
        Bundle.from_dir(path)
    msg = str(e.value)
    assert msg and "\n" not in msg
    if match is not None:
        assert any(m in msg for m in match.split("|")), msg
    return msg


def _leaf_paths(value, prefix=()):
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for k, v in items:
        if isinstance(v, (dict, list)) and v:
            out += _leaf_paths(v, (*prefix, k))
        else:
            out.append((*prefix, k))
    return out


def _set(m, path, value):
    for k in path[:-1]:
        m = m[k]
    m[path[-1]] = value


# ------------------------------------------------------------------ 1. the manifest's sense


def _threshold_cases():
    """(criterion, value, accepted) around each criterion's range, for C = 10 classes."""
    cases = []
    for crit, high in (("entropy", math.log(10)), ("max_softmax", 1.0)):
        for frac in (0.0, 0.25, 0.5, 0.999, 1.0):
            cases.append((crit, frac * high, True))
        for eps in (1e-4, 1e-2, 1.0, 1e3, 1e300):
            cases += [(crit, high + eps, False), (crit, -eps, False)]
    return cases


@pytest.mark.parametrize("crit, value, accepted", _threshold_cases())
@pytest.mark.parametrize("where", ["calibration", "exit", "calibrations"])
def test_threshold_outside_its_criterion_range_is_refused(copy, crit, value, accepted, where):
    def edit(m):
        assert m["net"]["num_classes"] == 10
        m["criterion"] = m["calibration"]["criterion"] = crit
        for row in m.get("calibrations", []):
            row["criterion"] = crit
            row["thresholds"] = {k: None for k in row["thresholds"]}
        m["calibration"]["thresholds"] = {k: None for k in m["calibration"]["thresholds"]}
        for e in m["exits"]:
            e["threshold"] = None
        if where == "calibration":
            m["calibration"]["thresholds"]["exit_2"] = value
        elif where == "exit":
            m["exits"][0]["threshold"] = value
        else:
            m["calibrations"][-1]["thresholds"]["exit_2"] = value

    _rewrite(copy, edit)
    if accepted:
        Bundle.from_dir(copy)
    else:
        _refused(copy, f"{crit} range")


def _paths_sample(smoke_bundle, n, seed, containers=False):
    m = _manifest(smoke_bundle)
    paths = _leaf_paths(m)
    if containers:
        paths = sorted({p[:-1] for p in paths if len(p) > 1 and isinstance(p[-2], str)}, key=str)
    return random.Random(seed).sample(paths, min(n, len(paths)))


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_nonfinite_number_anywhere_is_refused(smoke_bundle, copy, token):
    for path in _paths_sample(smoke_bundle, 12, seed=len(token)):
        m = _manifest(smoke_bundle)
        _set(m, path, "__X__")
        _write_raw(copy, json.dumps(m).replace('"__X__"', token).encode())
        _refused(copy, "non-finite")


def test_duplicate_key_anywhere_is_refused(smoke_bundle, copy):
    m = _manifest(smoke_bundle)
    dict_paths = [p for p in _leaf_paths(m) if isinstance(p[-1], str)]
    for path in random.Random(0).sample(dict_paths, 15):
        m = _manifest(smoke_bundle)
        old = m
        for k in path:
            old = old[k]
        _set(m, path, "__X__")
        dup = f"{json.dumps(old)}, {json.dumps(path[-1])}: {json.dumps(old)}"
        _write_raw(copy, json.dumps(m).replace('"__X__"', dup).encode())
        _refused(copy, "duplicate key")


@pytest.mark.parametrize("depth", [bundle_lib.MAX_JSON_DEPTH + 1, 1000, 200_000])
def test_deep_nesting_is_refused_without_recursion_blowup(smoke_bundle, copy, depth):
    m = _manifest(smoke_bundle)
    m["extra"] = "__X__"
    _write_raw(copy, json.dumps(m).replace('"__X__"', "[" * depth + "]" * depth).encode())
    _refused(copy, "deeper than")


def test_oversized_manifest_is_refused_before_parsing(copy, monkeypatch):
    calls = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: calls.append(1))
    for extra in (1, 4096):
        _write_raw(copy, b" " * (bundle_lib.MAX_MANIFEST_BYTES + extra))
        _refused(copy, "more than")
    assert not calls


def _set_exits(m, n):
    m["exits"] = [dict(m["exits"][0], name=f"e{i}") for i in range(n)] + m["exits"]


# (LIMITS key, how a manifest sets that size to v)
_CAPPED = [
    ("num_classes", lambda m, v: m["net"].update(num_classes=v)),
    ("num_clips", lambda m, v: m["video"].update(num_clips=v)),
    ("frames_per_clip", lambda m, v: m["video"].update(frames_per_clip=v)),
    ("data_limit", lambda m, v: m["data"].update(limit=v)),
    ("image_size", lambda m, v: m["data"].update(image_size=v)),
    ("file_bytes", lambda m, v: m["files"]["model.tflite"].update(bytes=v)),
    ("dimension", lambda m, v: m["input"].update(shape=[1, v, 28, 1])),
    ("files", lambda m, v: m["files"].update(
        {f"f{i}.bin": {"bytes": 1, "sha256": "0" * 64} for i in range(v)})),
    ("signatures", lambda m, v: m["signatures"].update(
        {f"s{i}": dict(m["signatures"]["full"]) for i in range(v)})),
    ("exits", _set_exits),
]  # fmt: skip


def _cap_cases():
    """Every capped size just past its cap and far past it, plus the frame product.

    Far is 1000x for a number, 2x for a count of entries (the manifest must stay writable).
    """
    cases = [
        (key, set_, bundle_lib.LIMITS[key] * factor + extra)
        for key, set_ in _CAPPED
        for factor, extra in ((1, 1), (2 if key in ("files", "signatures", "exits") else 1000, 0))
    ]
    both = bundle_lib.LIMITS["num_clips"]

    def frames(m, v):
        m["video"].update(num_clips=both, frames_per_clip=v)

    cases.append(("frames", frames, bundle_lib.LIMITS["frames_per_clip"]))
    return cases


@pytest.mark.parametrize("case", range(len(_cap_cases())))
def test_every_size_a_manifest_drives_is_capped(copy, case):
    what, set_, value = _cap_cases()[case]
    _rewrite(copy, lambda m: set_(m, value))
    msg = _refused(copy)
    assert any(w in msg for w in ("outside", "at most", "allowed", "out of range", "positive")), (
        what,
        msg,
    )


def _shape_cases(m):
    """Every dimension of every declared shape, off by one (and num_classes moved)."""
    out = []
    for name, sig in m["signatures"].items():
        for key in ("input_shape", "output_shape"):
            for i in range(len(sig.get(key, []))):
                out.append((f"signatures.{name}.{key}[{i}]", ("signatures", name, key, i)))
        for j, o in enumerate(sig.get("outputs", [])):  # a stage's outputs
            for i in range(len(o["shape"])):
                where = ("signatures", name, "outputs", j, "shape", i)
                out.append((f"signatures.{name}.outputs[{j}].shape[{i}]", where))
    for i in range(1, 4):
        out.append((f"input.shape[{i}]", ("input", "shape", i)))
    return out


def test_shapes_off_by_one_are_refused(smoke_bundle, copy):
    m0 = _manifest(smoke_bundle)
    cases = _shape_cases(m0)
    assert len(cases) > 20
    for _label, path in cases:
        for delta in (1, -1):
            m = _manifest(smoke_bundle)
            ref = m
            for k in path[:-1]:
                ref = ref[k]
            ref[path[-1]] += delta
            if path[0] == "input":
                m["net"]["input_shape"] = m["input"]["shape"][1:]
            _write_raw(copy, json.dumps(m).encode())
            _refused(copy, "wrong model file|inconsistent|positive|input_shape")


@pytest.mark.parametrize("num_classes", [-1, 0, 1, 2, 9, 11, 20, 1000])
def test_num_classes_must_match_every_exit_logits(copy, num_classes):
    _rewrite(copy, lambda m: m["net"].update(num_classes=num_classes))
    _refused(copy, "outside|logits")


def _bad_names():
    seps = ["/", "\\", "\0"]
    return (
        [f"a{s}b" for s in seps]
        + [f"..{s}model.tflite" for s in seps]
        + ["", ".", "..", MANIFEST, MANIFEST_DIGEST, "x" * 300, "/etc/passwd"]
    )


@pytest.mark.parametrize("name", _bad_names())
def test_file_names_must_be_plain_names_in_the_bundle(copy, name):
    def edit(m):
        meta = m["files"].pop("model.tflite")
        m["files"][name] = meta
        m["model"] = name

    _rewrite(copy, edit)
    _refused(copy, "invalid file name")


@pytest.mark.parametrize("victim", ["model.tflite", MANIFEST, MANIFEST_DIGEST])
@pytest.mark.parametrize("kind", ["symlink_inside", "symlink_outside", "directory", "fifo"])
def test_bundle_files_must_be_regular_files(copy, tmp_path, victim, kind):
    p = os.path.join(copy, victim)
    target = os.path.join(copy if kind == "symlink_inside" else str(tmp_path), "real_" + victim)
    shutil.move(p, target)
    if kind.startswith("symlink"):
        os.symlink(target, p)
    elif kind == "directory":
        os.mkdir(p)
    else:
        os.mkfifo(p)
    _refused(copy, "symlink|regular file|not a regular|cannot be read")


def test_symlinked_bundle_directory_resolves_and_verifies(copy, tmp_path):
    link = tmp_path / "link"
    os.symlink(copy, link)
    assert Bundle.from_dir(str(link)).num_classes == 10


# --------------------------------------------------------------- 2. run the verified bytes


def _swaps(data: bytes):
    rng = random.Random(3)
    from runtime import crafted_tflite

    flipped = bytearray(data)
    for _ in range(50):
        flipped[rng.randrange(len(flipped))] ^= 0xFF
    return {
        "truncated": data[: len(data) // 2],
        "zeros": bytes(len(data)),
        "bit_flipped": bytes(flipped),
        "other_model": crafted_tflite.many_signatures(3, 2),
        "removed": None,
    }


@pytest.mark.parametrize("swap", list(_swaps(b"\0" * 64)))
def test_file_swapped_after_verification_never_runs(copy, swap):
    bundle = Bundle.from_dir(copy)
    x = np.random.default_rng(0).random(bundle.manifest["input"]["shape"], np.float32)
    want = bundle.load().signature("full")(x).copy()
    path = os.path.join(copy, "model.tflite")
    new = _swaps(open(path, "rb").read())[swap]
    os.remove(path)
    if new is not None:
        open(path, "wb").write(new)
    for model in (bundle.load(), bundle.load(num_threads=2)):
        np.testing.assert_array_equal(model.signature("full")(x), want)
    _refused(copy)  # while a fresh verification sees the swap


def test_model_from_bytes_equals_model_from_path(smoke_bundle):
    path = os.path.join(smoke_bundle, "model.tflite")
    a, b = Model(path), Model.from_bytes(open(path, "rb").read(), name=path)
    x = np.ones(a.signature("full").input_shape, np.float32)
    np.testing.assert_array_equal(a.signature("full")(x), b.signature("full")(x))
    assert b.path == path and a.signature_names == b.signature_names
    with pytest.raises(ValueError):
        Model()


def test_bundle_digest_is_the_verified_manifest(copy):
    bundle = Bundle.from_dir(copy)
    raw = open(os.path.join(copy, MANIFEST), "rb").read()
    assert bundle.digest == hashlib.sha256(raw).hexdigest()
    _write_raw(copy, raw + b" ")
    assert bundle.digest == hashlib.sha256(raw).hexdigest()


def test_no_runtime_module_reopens_a_bundle_model_by_path():
    # Bundles' models are built through Bundle.load / load_partitions (verified bytes).
    offenders = []
    for name in sorted(os.listdir(os.path.join(ROOT, "runtime"))) + [
        f"ams/{n}" for n in os.listdir(os.path.join(ROOT, "runtime", "ams"))
    ]:
        if not name.endswith(".py"):
            continue
        src = open(os.path.join(ROOT, "runtime", name)).read()
        for needle in ("Model(b.model_path", 'Model(os.path.join(bundle.path, part["model"])',
                       "Model(self.path", "Model(bundle.model_path"):  # fmt: skip
            if needle in src:
                offenders.append((name, needle))
    assert not offenders


# ------------------------------------------------------------------------- 3. LiteRT agrees


def test_litert_failure_during_verification_is_one_line(copy, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("tensorflow/lite/kernels/x.cc:1 failed\nNode number 3 failed")

    monkeypatch.setattr(bundle_lib.Model, "from_bytes", classmethod(lambda cls, *a, **k: boom()))
    _refused(copy, "LiteRT refuses it")


def test_verification_prepares_with_litert(copy, monkeypatch):
    calls = []
    real = bundle_lib.Model.from_bytes.__func__
    monkeypatch.setattr(
        bundle_lib.Model,
        "from_bytes",
        classmethod(lambda cls, *a, **k: calls.append(1) or real(cls, *a, **k)),
    )
    Bundle.from_dir(copy)
    assert calls


def test_fuzz_small_run_has_no_failures(smoke_bundle):
    # 40 seeded mutations, each verified (and run when accepted) in a subprocess.
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.fuzz_bundle", f"--bundle={smoke_bundle}",
         "--mutations=40", "--seed=11", "--batch=20", "--timeout=60"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["mutations"] == 40 and set(rep["counts"]) <= {"refused", "ran"}
    assert rep["counts"].get("refused", 0) > 5


def test_criteria_names_are_the_ones_checked():
    assert set(criteria.CRITERIA) == {"entropy", "max_softmax"}
