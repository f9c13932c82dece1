"""Profiles latency on a target: a sweep bundle's layers or a bundle's partitions.

  python -m runtime.profile --bundle=SWEEP_OR_BUNDLE \\
      --target=local[:threads=N][:slowdown=S][:clock=virtual|sleep] \\
      --out=PROFILE.json [--runs=20]
  python -m runtime.profile --bundle=... --target=adb[:SERIAL] --benchmark-binary=PATH --out=...

* A sweep bundle (`export.sweep`): the median time of every single-layer
  signature, the per-invocation overhead (the ``probe`` signature), and model
  loading (interpreter creation + tensor allocation + first run) for models of
  growing size. `export.latency_fit` fits the regressions on it.
* A bundle exported with ``--partitions``: the median time of every partition
  signature (device prefixes and edge paths) and the loading time of its model
  files: the measured whole-path latencies the fit is checked against.

Targets. ``local:threads=N`` runs the LiteRT interpreter here with N threads
and reports wall time. One machine stands in for both Edgent machines: the
**edge** is ``local:threads=1`` (wall time: the edge server shares this
machine for real), the **device** is ``local:threads=1:slowdown=S``, a
dedicated CPU S times slower than one core here (a Raspberry Pi 3 runs
AlexNet-class layers ~10-20x slower than a desktop core).

**The device's clock is virtual** (``clock=virtual``, the default). The
interpreter really runs here, at full speed, on the calling thread; the time
the emulated device takes for that call is *defined* as ``S x`` the compute
time the call took here: the CPU time it consumed on the calling thread
(``time.thread_time``, ``clock_gettime(CLOCK_THREAD_CPUTIME_ID)``, 1 ns
resolution) less one reading of that clock (a system call, ~0.7 us here,
`clock_overhead_s`), or the call's wall time read tight around it when that is
smaller (no preemption: the wall reading is the tighter one). Nothing sleeps,
so the computation being scaled is not perturbed (no cold caches or clock
ramps after a sleep, no sleep overshoot), and a tenant of this shared
machine that preempts the call adds nothing (a dedicated device does not wait
for it). Calls of a few microseconds still read ~10-30% long (the two clock
system calls around each call disturb it; `runtime.emulation_check` shows
it). What is virtual: every device time reported by `time_signature`,
`time_loading` (profile rows) and by `runtime.coinfer` (per-frame device time,
deadline accounting: `Timeline`); what stays real: the edge's compute, and
the transfers. `Target.run` returns ``(output, device seconds)``; ``python -m
runtime.emulation_check`` shows the ratio device / edge per signature
against S. LiteRT with ``threads=1`` computes on the calling thread (XNNPACK
starts no worker for one thread; `emulation_check` reports process / thread
CPU time during the device's calls, 1.000 here); with ``threads>1`` a slowed
target accounts the process's CPU time instead (which includes any other
busy thread of this process).

``clock=sleep`` (``local:threads=1:slowdown=S:clock=sleep``) is the former
emulation, kept for comparison: the call returns ``S x`` its CPU time after
it started, sleeping for the rest, and its time is the wall time. It perturbs
the compute it scales (measured 16-89x instead of 20x, issue 14).

``adb[:SERIAL]`` times every signature on a phone with TFLite's
``benchmark_model`` (`runtime.adb`).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime.adb import AdbTarget
from runtime.bundle import Bundle, BundleError, read_files, read_manifest, verified_copy
from runtime.lite import Model
from runtime.timing import time_stats

SWEEP_FORMAT = "flexjax-sweep"
MAX_SLOWDOWN = 1000.0  # an emulated device this many times slower than one core here


CLOCKS = ("virtual", "sleep")
_CLOCK_OVERHEAD: dict[Callable[[], float], float] = {}


def clock_overhead_s(clock: Callable[[], float], samples: int = 2000) -> float:
    """What one reading of `clock` adds to an interval it bounds (median of back-to-back pairs).

    ``clock_gettime(CLOCK_THREAD_CPUTIME_ID)`` is a system call (~0.5-1 us);
    without this correction S x that would be charged to every device call,
    doubling the time of a 1 us signature at S = 20. Measured once per clock
    and process.
    """
    if clock not in _CLOCK_OVERHEAD:
        d = np.empty(samples)
        for i in range(samples):
            a = clock()
            d[i] = clock() - a
        _CLOCK_OVERHEAD[clock] = float(np.median(d))
    return _CLOCK_OVERHEAD[clock]


@dataclasses.dataclass(frozen=True)
class Target:
    """Where signatures run: ``local`` (threads, slowdown, clock) or ``adb`` (serial).

    A local target with ``slowdown > 1`` is an emulated device whose time is
    ``slowdown`` x the CPU time of each call: virtual (``clock="virtual"``) or
    slept (``clock="sleep"``); see the module docstring.
    """

    kind: str
    threads: int = 1
    slowdown: float = 1.0
    serial: str | None = None
    spec: str = "local"
    clock: str = "virtual"

    def __post_init__(self):
        if self.clock not in CLOCKS:
            raise ValueError(f"unknown clock {self.clock!r}; valid: {', '.join(CLOCKS)}")

    @staticmethod
    def parse(spec: str) -> Target:
        """Parses ``local[:threads=N][:slowdown=S][:clock=virtual|sleep]`` or ``adb[:SERIAL]``.

        Raises:
          ValueError: anything else (the message shows the accepted forms).
        """
        head, _, rest = spec.partition(":")
        if head == "adb":
            return Target("adb", serial=rest or None, spec=spec)
        if head != "local":
            raise ValueError(
                f"unknown target {spec!r}; valid: local[:threads=N][:slowdown=S]"
                "[:clock=virtual|sleep], adb[:SERIAL]"
            )
        threads, slowdown, clock = 1, 1.0, "virtual"
        for part in filter(None, rest.split(":")):
            key, _, value = part.partition("=")
            try:
                if key == "threads":
                    threads = args_lib.threads()(value)
                elif key == "slowdown":
                    slowdown = args_lib.real(1.0, MAX_SLOWDOWN)(value)
                elif key == "clock":
                    if value not in CLOCKS:
                        raise ValueError(f"valid clocks: {', '.join(CLOCKS)}")
                    clock = value
                else:
                    raise ValueError("valid: threads=N, slowdown=S, clock=virtual|sleep")
            except ValueError as e:
                raise ValueError(f"bad target option {part!r} in {spec!r}: {e}") from None
        return Target("local", threads, slowdown, spec=spec, clock=clock)

    @property
    def emulated(self) -> bool:
        """A slowed local target: its time is ``slowdown`` x CPU time, not wall time."""
        return self.kind == "local" and self.slowdown > 1.0

    def cpu_clock(self) -> Callable[[], float]:
        """The CPU clock a slowed target scales: this thread's (1 thread) or the process's."""
        return time.thread_time if self.threads == 1 else time.process_time

    def pad(self, start_s: float, cpu_s: float) -> None:
        """``clock=sleep`` only: sleeps until ``start_s + slowdown * cpu_s`` (perf_counter)."""
        if self.emulated and self.clock == "sleep":
            rest = start_s + self.slowdown * cpu_s - time.perf_counter()
            if rest > 0:
                time.sleep(rest)

    def compute_s(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float, float]:
        """``(fn(*args), compute seconds here, perf_counter at the start)``.

        Compute seconds: the CPU time of the call (this thread's, or the
        process's with ``threads > 1``) less one clock reading
        (`clock_overhead_s`); with one thread, the smaller of that and the
        call's wall time read tight around it (``perf_counter``, vDSO, no system
        call: the better measure when the thread was not preempted; CPU time,
        when it was, excludes the wait for other tenants).
        """
        clock = self.cpu_clock()
        overhead = clock_overhead_s(clock)
        c0 = clock()
        w0 = time.perf_counter()
        y = fn(*args)
        w1 = time.perf_counter()
        cpu_s = max(0.0, clock() - c0 - overhead)
        return y, (min(cpu_s, w1 - w0) if self.threads == 1 else cpu_s), w0

    def measure(self, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """``(fn(*args), seconds it takes on this target)``.

        Real targets: wall time. Emulated devices: ``slowdown`` x the compute
        time (`compute_s`), virtual (returned at once) or slept (then the wall
        time of call + sleep).
        """
        if not self.emulated:
            t0 = time.perf_counter()
            y = fn(*args)
            return y, time.perf_counter() - t0
        y, compute, t0 = self.compute_s(fn, *args)
        if self.clock == "virtual":
            return y, self.slowdown * compute
        self.pad(t0, compute)
        return y, time.perf_counter() - t0

    def run(self, sig, x: np.ndarray) -> tuple[np.ndarray, float]:
        """Runs one `runtime.lite.Signature`: ``(output, seconds on this target)``."""
        return self.measure(sig, x)

    def call(self, sig, x: np.ndarray) -> np.ndarray:
        """Runs one `runtime.lite.Signature` on this target; returns its output only."""
        return self.run(sig, x)[0]


class Timeline:
    """An emulated wall clock: real time plus the virtual time of emulated-device calls.

    `runtime.coinfer` times a frame on it: a device call advances `now` by its
    virtual device time (S x CPU time) instead of the real time it took here,
    while transfers, the edge and everything else advance it by real time. So
    ``now() - start`` of a frame is virtual device time + real transfer + real
    edge time, and a bandwidth trace is read on the same clock.
    """

    def __init__(self) -> None:
        self.skew_s = 0.0  # emulated minus real elapsed time, summed over device calls

    def now(self) -> float:
        """Seconds on the emulated clock (``time.perf_counter`` + skew)."""
        return time.perf_counter() + self.skew_s

    def measure(self, target: Target, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
        """`Target.measure` that also moves this clock by the target's time, not the real one."""
        t0 = time.perf_counter()
        y, seconds = target.measure(fn, *args)
        if target.emulated and target.clock == "virtual":
            self.skew_s += seconds - (time.perf_counter() - t0)
        return y, seconds

    def run(self, target: Target, sig, x: np.ndarray) -> tuple[np.ndarray, float]:
        """`Target.run` on this clock: ``(output, seconds on the target)``."""
        return self.measure(target, sig, x)


def time_signature(target: Target, sig, runs: int, warmup: int = 3) -> dict:
    """Median / mean / p95 (ms) of `runs` calls of `sig` on a zero input, on `target`'s clock."""
    x = np.zeros(sig.input_shape, sig.input_dtype)
    for _ in range(warmup):
        target.call(sig, x)
    ts = [target.run(sig, x)[1] * 1e9 for _ in range(runs)]
    s = time_stats(ts)
    return {"median_ms": s["p50_ms"], "mean_ms": s["mean_ms"], "p95_ms": s["p95_ms"], "runs": runs}


def time_loading(target: Target, data: bytes, signature: str, runs: int) -> dict:
    """Model loading: interpreter creation + allocation + first invocation (ms, median).

    `data` are a bundle file's verified bytes (the interpreter never re-reads the file).
    """

    def load() -> None:
        model = Model.from_bytes(data, num_threads=target.threads)
        sig = model.signature(signature)
        sig(np.zeros(sig.input_shape, sig.input_dtype))

    ts = [target.measure(load)[1] * 1e3 for _ in range(runs)]
    return {"median_ms": float(np.median(ts)), "runs": runs, "bytes": len(data)}


def _adb_times(target: Target, binary: str, model_path: str, sigs: Sequence[str], runs: int):
    adb = AdbTarget(target.serial, binary)
    adb.check()
    timings = adb.benchmark_all(
        model_path, list(sigs), num_threads=1, num_runs=runs, warmup_runs=3, op_profiling=False
    )
    return timings


def profile_sweep(
    manifest: Mapping, path: str, target: Target, runs: int, binary=None, files=None
) -> dict:
    """Times every layer signature, the probe and the loading models of a sweep bundle.

    `files` are the verified bytes (`runtime.bundle.read_files`); read here when None.
    """
    files = read_files(path, manifest) if files is None else files
    names = [r["signature"] for r in manifest["layers"]]
    layers = {}
    loading = []
    if target.kind == "adb":  # the phone gets copies of the verified bytes
        with verified_copy(files[manifest["model"]], manifest["model"]) as model_path:
            timings = _adb_times(target, binary, model_path, names, runs)
        for r in manifest["layers"]:
            layers[r["signature"]] = {"median_ms": timings[r["signature"]].avg_us / 1e3}
        for m in manifest["loading"]:
            with verified_copy(files[m["file"]], m["file"]) as p:
                t = _adb_times(target, binary, p, [m["signature"]], 1)
            loading.append({"file": m["file"], "bytes": m["bytes"],
                            "median_ms": t[m["signature"]].init_us / 1e3})  # fmt: skip
    else:
        model = Model.from_bytes(files[manifest["model"]], num_threads=target.threads)
        for r in manifest["layers"]:
            layers[r["signature"]] = time_signature(target, model.signature(r["signature"]), runs)
        for m in manifest["loading"]:
            t = time_loading(target, files[m["file"]], m["signature"], max(3, runs // 4))
            loading.append({"file": m["file"], **t})
    rows = [{**r, **layers[r["signature"]]} for r in manifest["layers"]]
    return {
        "kind": "sweep",
        "overhead_ms": layers[manifest["probe"]]["median_ms"],
        "layers": rows,
        "loading": loading,
    }


def profile_partitions(
    manifest: Mapping, path: str, target: Target, runs: int, binary=None, bundle=None
):
    """Times every partition signature of a bundle and the loading of its model files.

    `bundle` is the verified `Bundle` (opened here when None); its bytes are what runs.
    """
    part = manifest.get("partitions")
    if part is None:
        raise BundleError(f"bundle {path} has no partitions (export it with --partitions)")
    names = list(part["signatures"])
    bundle = Bundle.from_dir(path) if bundle is None else bundle
    if target.kind == "adb":
        with bundle.verified_file(part["model"]) as model_path:
            timings = _adb_times(target, binary, model_path, names, runs)
        sigs = {n: {"median_ms": t.avg_us / 1e3} for n, t in timings.items()}
        loading = []
    else:
        model = bundle.load_partitions(target.threads)
        sigs = {n: time_signature(target, model.signature(n), runs) for n in names}
        data = bundle.files[part["model"]]
        loading = [{"file": part["model"], **time_loading(target, data, names[0], 3)}]
    return {"kind": "partitions", "signatures": sigs, "loading": loading}


def profile(bundle: str, target: Target, runs: int = 20, binary: str | None = None) -> dict:
    """Profiles a sweep bundle or a partitioned bundle on `target` (see the module docstring).

    Raises:
      BundleError: a missing / corrupt bundle, or one with nothing to profile.
      ValueError: bad arguments.
    """
    if runs < 1:
        raise ValueError(f"--runs must be >= 1; got {runs}")
    if target.kind == "adb" and not binary:
        raise ValueError("--target=adb needs --benchmark-binary=PATH (TFLite benchmark_model)")
    manifest = read_manifest(bundle)
    if not isinstance(manifest, dict):
        raise BundleError(f"{bundle}: manifest is not a JSON object")
    if manifest.get("format") == SWEEP_FORMAT:
        try:
            files = read_files(bundle, manifest)
            result = profile_sweep(manifest, bundle, target, runs, binary, files)
        except (KeyError, TypeError) as e:
            msg = f"{bundle}: malformed sweep manifest ({type(e).__name__} {e})"
            raise BundleError(msg) from None
    else:
        b = Bundle.from_dir(bundle)
        result = profile_partitions(b.manifest, bundle, target, runs, binary, b)
    return {
        "bundle": os.path.abspath(bundle),
        "target": dataclasses.asdict(target),
        "runs": runs,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count()},
        **result,
    }  # fmt: skip


def _target(spec: str) -> Target:
    try:
        return Target.parse(spec)
    except ValueError as e:
        raise args_lib.DomainError(str(e)) from None


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.profile`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(
        prog="python -m runtime.profile", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir(),
                   help="a sweep bundle or a --partitions bundle")  # fmt: skip
    p.add_argument("--target", default="local", type=_target,
                   help="local[:threads=N][:slowdown=S][:clock=C] or adb[:SERIAL]")  # fmt: skip
    p.add_argument("--out", required=True, type=args_lib.output_file(),
                   help="profile JSON to write")  # fmt: skip
    p.add_argument("--runs", type=args_lib.count(1, 100_000), default=20,
                   help="timed runs per signature")  # fmt: skip
    p.add_argument("--benchmark-binary", default=None, type=args_lib.existing_file(),
                   help="benchmark_model for --target=adb")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    rep = profile(args.bundle, args.target, args.runs, args.benchmark_binary)
    write_json_atomic(args.out, rep)
    n = len(rep.get("layers", rep.get("signatures", [])))
    print(f"profiled {n} signatures on {args.target.spec} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
