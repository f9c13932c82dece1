"""Mutation fuzzing of bundle verification: every mutation is refused or runs, nothing else.

    python -m runtime.fuzz_bundle --bundle=DIR --mutations=500 --seed=0 [--json=OUT]

Each mutation changes ONE thing in a copy of a real exported bundle: bytes of a model file
(bit flips, overwrites with boundary values, truncation, insertion, deletion) or the
manifest at the JSON level (a number changed, made huge, negative or NaN/Infinity; a value
of another type; a key removed or duplicated; deep nesting). The digests are then
RECOMPUTED (``files[*].bytes`` / ``sha256`` and ``manifest.sha256``), so the mutation gets
past the checksums to the deep checks. The bundle then goes through `Bundle.from_dir` and,
when accepted, one inference on every signature of every model and one early-exit frame,
in a SUBPROCESS with a timeout, so a crash (signal) or a hang inside LiteRT is seen.

Outcomes: ``refused`` (a one-line `BundleError`) and ``ran`` are fine; ``error`` (any other
exception or a multi-line refusal), ``litert`` (accepted, but LiteRT then refuses to run
it), ``crash`` (the process died by a signal) and ``hang`` (timeout) are failures. Cases
run in batches per subprocess; when a batch dies, its unfinished cases are re-run one per
subprocess to find the culprit. Case `i` of seed `s` is reproducible on its own
(``--only=i``). Exit status 1 when any case failed.

Imports neither JAX nor TensorFlow (runtime/ rule).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from ai_edge_litert import schema_py_generated as fb

from runtime import args as args_lib
from runtime.bundle import Bundle, BundleError, summary
from runtime.executor import EarlyExitExecutor
from runtime.names import MANIFEST, MANIFEST_DIGEST

FINE = ("refused", "ran")
_RESULT = "fuzz_result.json"
_CASE = "fuzz_case.txt"
_BOUNDARY_INTS = (0, 1, 2, 3, 4, 7, 8, 0x7F, 0x80, 0xFF, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0x80000000,
                  0xFFFFFFFF, 0xFFFFFFFC)  # fmt: skip
_JSON_VALUES: tuple[Any, ...] = (None, True, "x", "", [], {}, [1], {"a": 1}, 0, -1, 1e308,
                                 -1e308, 2**62, 10**30, 0.5, -0.5)  # fmt: skip


# ---------------------------------------------------------------------------------- mutations


def _structure(data: bytes) -> list[int]:
    """Offsets of the flatbuffer's structure: every byte outside the buffers' tensor data."""
    try:
        model = fb.Model.GetRootAs(data, 0)
        spans = []
        for i in range(model.BuffersLength()):
            buf = model.Buffers(i)
            if buf.DataLength():
                start = buf._tab.Vector(buf._tab.Offset(4))
                spans.append((start, start + buf.DataLength()))
    except Exception:  # noqa: BLE001 - not a flatbuffer: every byte is structure
        return list(range(len(data)))
    out, pos = [], 0
    for start, end in sorted(spans):
        out.extend(range(pos, start))
        pos = max(pos, end)
    out.extend(range(pos, len(data)))
    return out or list(range(len(data)))


def _mutate_bytes(rng: random.Random, data: bytes) -> tuple[bytes, str]:
    """One byte-level mutation, 80% of them in the flatbuffer's structure (not weights)."""
    b = bytearray(data)
    structure = _structure(data)

    def position() -> int:
        return rng.choice(structure) if rng.random() < 0.8 else rng.randrange(len(b))

    kind = rng.choice(("flip", "flip", "overwrite", "int32", "int32", "truncate", "insert",
                       "delete", "header"))  # fmt: skip
    if kind == "flip":
        n = rng.randint(1, 8)
        for _ in range(n):
            pos = position()
            b[pos] ^= 1 << rng.randrange(8)
        return bytes(b), f"{n} bit flips"
    if kind == "overwrite":
        pos, n = position(), rng.randint(1, 16)
        b[pos : pos + n] = rng.randbytes(n)[: len(b) - pos]
        return bytes(b), f"{n} random bytes at {pos}"
    if kind in ("int32", "header"):
        pos = (rng.randrange(0, min(len(b) - 4, 64)) if kind == "header" else position()) & ~3
        value = rng.choice(_BOUNDARY_INTS)
        b[pos : pos + 4] = value.to_bytes(4, "little")
        return bytes(b), f"int32 {value:#x} at {pos}"
    if kind == "truncate":
        n = position()
        return bytes(b[:n]), f"truncated to {n}"
    if kind == "insert":
        pos, n = position(), rng.choice((1, 4, 8, 64))
        return bytes(b[:pos] + rng.randbytes(n) + b[pos:]), f"{n} bytes inserted at {pos}"
    pos, n = position(), rng.choice((1, 4, 8, 64))
    return bytes(b[:pos] + b[pos + n :]), f"{n} bytes deleted at {pos}"


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices), the root excluded."""
    out, stack = [], [(value, prefix)]
    while stack:
        v, p = stack.pop()
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        for k, x in items:
            out.append((*p, k))
            stack.append((x, (*p, k)))
    return out


def _get(value: Any, path: tuple) -> Any:
    for k in path:
        value = value[k]
    return value


def _mutate_manifest(rng: random.Random, m: dict) -> tuple[dict | str, str]:
    """A mutated manifest (a dict, or raw JSON text for what a dict cannot hold)."""
    # Bias towards what the runtime reads: most mutations land under these keys.
    hot = [p for p in _paths(m) if p[0] in ("net", "input", "signatures", "exits", "criterion",
                                             "calibration", "files", "model", "video", "data",
                                             "partitions", "calibrations")]  # fmt: skip
    path = rng.choice(hot if hot and rng.random() < 0.85 else _paths(m))
    parent, key = _get(m, path[:-1]), path[-1]
    old = parent[key]
    kind = rng.choice(("number", "number", "number", "type", "remove", "nonfinite",
                       "duplicate", "deep", "grow"))  # fmt: skip
    where = "/".join(map(str, path))
    if kind == "number" and isinstance(old, (int, float)) and not isinstance(old, bool):
        new = rng.choice((0, -1, 1, 2, -old, old + 1, old - 1, old * 2, old * 1000, old / 3,
                          2**31, 2**53 + 1, 1e30, 1e-30))  # fmt: skip
        parent[key] = new
        return m, f"{where}: {old!r} -> {new!r}"
    if kind == "remove" and isinstance(parent, (dict, list)):
        del parent[key]
        return m, f"{where}: removed"
    if kind == "nonfinite":
        token = rng.choice(("NaN", "Infinity", "-Infinity"))
        parent[key] = "__FUZZ__"
        return json.dumps(m).replace('"__FUZZ__"', token), f"{where}: {token}"
    if kind == "duplicate" and isinstance(parent, dict):
        text = json.dumps(m)
        dup = json.dumps({"__FUZZ__": rng.choice(_JSON_VALUES)})[1:-1]
        parent[key] = "__FUZZ_DUP__"
        text = json.dumps(m).replace('"__FUZZ_DUP__"', json.dumps(old) + ", " + dup)
        return text.replace('"__FUZZ__"', json.dumps(str(key))), f"{where}: duplicate key"
    if kind == "deep":
        depth = rng.choice((40, 1000, 100_000))
        parent[key] = "__FUZZ__"
        return json.dumps(m).replace('"__FUZZ__"', "[" * depth + "]" * depth), (
            f"{where}: nested {depth} deep"
        )
    if kind == "grow" and isinstance(old, (list, dict)):
        n = rng.choice((100, 10_000))
        if isinstance(old, list):
            parent[key] = old + [old[-1] if old else 0] * n
        else:
            extra = {f"fuzz_{i}": next(iter(old.values()), 0) for i in range(n)}
            parent[key] = {**old, **extra}
        return m, f"{where}: grown by {n}"
    new = rng.choice([v for v in _JSON_VALUES if v != old and type(v) is not type(old)])
    parent[key] = new
    return m, f"{where}: {type(old).__name__} -> {json.dumps(new)[:20]}"


def make_case(bundle: str, out: str, seed: int, index: int) -> str:
    """Writes mutation `index` of `seed` of the bundle at `bundle` to `out`; returns its label."""
    rng = random.Random(f"{seed}:{index}")
    with open(os.path.join(bundle, MANIFEST), "rb") as f:
        manifest = json.loads(f.read())
    files = {}
    for name in manifest["files"]:
        with open(os.path.join(bundle, name), "rb") as f:
            files[name] = f.read()
    if rng.random() < 0.5:
        name = rng.choice(sorted(files))
        files[name], what = _mutate_bytes(rng, files[name])
        label = f"{name}: {what}"
        text: dict | str = manifest
    else:
        text, what = _mutate_manifest(rng, manifest)
        label = f"manifest {what}"
    # Recompute the digests so the mutation reaches the deep checks.
    if isinstance(text, dict) and isinstance(text.get("files"), dict):
        for name, data in files.items():
            meta = text["files"].get(name)
            if isinstance(meta, dict):
                meta["sha256"] = hashlib.sha256(data).hexdigest()
                meta["bytes"] = len(data)
    raw = (text if isinstance(text, str) else json.dumps(text, indent=1)).encode()
    os.makedirs(out, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(os.path.join(out, MANIFEST), "wb") as f:
        f.write(raw)
    with open(os.path.join(out, MANIFEST_DIGEST), "w") as f:
        f.write(hashlib.sha256(raw).hexdigest() + "\n")
    with open(os.path.join(out, _CASE), "w") as f:
        f.write(label)
    return label


# ---------------------------------------------------------------------------------- checking


def check_case(path: str) -> tuple[str, str]:
    """(outcome, detail) of verifying and, if accepted, running the bundle at `path`."""
    try:
        bundle = Bundle.from_dir(path)
    except BundleError as e:
        msg = str(e)
        return ("refused", msg) if msg and "\n" not in msg else ("error", f"bad message {msg!r}")
    except Exception as e:  # noqa: BLE001 - the point: anything else is a finding
        return "error", f"from_dir raised {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    try:
        models = [bundle.load()]
        if bundle.manifest.get("partitions") is not None:
            models.append(bundle.load_partitions())
        for model in models:
            for name in model.signature_names:  # every output, several for a stage
                sig = model.signature(name, model.output_names(name))
                sig(np.zeros(sig.input_shape, sig.input_dtype))
        ex = EarlyExitExecutor(bundle, model=models[0])
        ex.run(np.zeros(bundle.manifest["input"]["shape"][1:], np.float32))
        summary(bundle.manifest)
    except Exception as e:  # noqa: BLE001
        return "litert", f"accepted, then {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return "ran", ""


def _worker(paths: Sequence[str]) -> None:
    for p in paths:
        outcome, detail = check_case(p)
        with open(os.path.join(p, _RESULT), "w") as f:
            json.dump({"outcome": outcome, "detail": detail}, f)


def _run_batch(paths: Sequence[str], timeout: float) -> str | None:
    """Runs a worker subprocess over `paths`; returns why it died (None: it finished)."""
    cmd = [sys.executable, "-m", "runtime.fuzz_bundle", "--worker", *paths]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return f"hang (no result within {timeout:.0f} s)"
    if proc.returncode < 0:
        return f"crash (signal {-proc.returncode})"
    if proc.returncode != 0:
        tail = " ".join(proc.stderr.split())[-300:]
        return f"crash (exit {proc.returncode}: {tail})"
    return None


def _result(path: str) -> dict | None:
    try:
        with open(os.path.join(path, _RESULT)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def fuzz(
    bundle: str,
    mutations: int,
    seed: int = 0,
    *,
    batch: int = 50,
    case_timeout: float = 60.0,
    only: Sequence[int] | None = None,
    log=print,
) -> dict:
    """Runs the mutations (module docstring) and returns the counts and the failures."""
    indices = list(only) if only else list(range(mutations))
    counts: Counter[str] = Counter()
    failures: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fuzz_bundle_") as tmp:
        for start in range(0, len(indices), batch):
            chunk = indices[start : start + batch]
            paths = []
            for i in chunk:
                p = os.path.join(tmp, f"case_{i:05d}")
                make_case(bundle, p, seed, i)
                paths.append(p)
            died = _run_batch(paths, case_timeout * len(paths))
            for i, p in zip(chunk, paths):
                res = _result(p)
                if res is None and died is not None:  # re-run alone to pin the culprit
                    why = _run_batch([p], case_timeout)
                    res = _result(p) or {"outcome": (why or "crash").split()[0], "detail": why}
                if res is None:
                    res = {"outcome": "error", "detail": "no result"}
                counts[res["outcome"]] += 1
                if res["outcome"] not in FINE:
                    with open(os.path.join(p, _CASE)) as f:
                        label = f.read()
                    failures.append({"case": i, "mutation": label, **res})
                    log(f"FAIL case {i} ({label}): {res['outcome']}: {res['detail']}")
                shutil.rmtree(p, ignore_errors=True)
            done = start + len(chunk)
            log(f"{done}/{len(indices)} cases, {dict(counts)}, {time.perf_counter() - t0:.0f} s")
    return {
        "bundle": os.path.abspath(bundle),
        "seed": seed,
        "mutations": len(indices),
        "counts": dict(counts),
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.fuzz_bundle``."""
    p = args_lib.ArgumentParser(prog="python -m runtime.fuzz_bundle", description=__doc__)
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir(),
                   help="a real exported bundle (left untouched)")  # fmt: skip
    p.add_argument("--mutations", type=args_lib.count(1), default=500)
    p.add_argument("--seed", type=args_lib.seed(), default=0)
    p.add_argument("--batch", type=args_lib.count(1, 10_000), default=50,
                   help="cases per subprocess")  # fmt: skip
    p.add_argument("--timeout", type=args_lib.positive(3600.0), default=60.0,
                   help="seconds allowed per case")  # fmt: skip
    p.add_argument("--only", type=args_lib.count(0), nargs="*",
                   help="re-run just these case indices")  # fmt: skip
    p.add_argument("--json", default=None, type=args_lib.output_file(),
                   help="write the report here")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        _worker(argv[1:])
        return 0
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    try:
        Bundle.from_dir(args.bundle)
    except BundleError as e:
        raise BundleError(f"--bundle must be a valid bundle: {e}") from None
    rep = fuzz(args.bundle, args.mutations, args.seed, batch=args.batch,
               case_timeout=args.timeout, only=args.only)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    print(json.dumps({k: v for k, v in rep.items() if k != "failures"}))
    return 1 if rep["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
