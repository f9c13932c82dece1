"""A host stand-in for TFLite's ``benchmark_model`` CLI, on the real LiteRT interpreter.

    python -m runtime.benchmark_model_host --graph=model.tflite \\
        --signature_to_run_for=exit_1 --num_threads=4 --num_runs=50 \\
        --warmup_runs=5 --min_secs=0 --warmup_min_secs=0 [--use_gpu=true] \\
        [--enable_op_profiling=true]

It takes the flags `runtime.adb.AdbTarget.benchmark` passes to the Android
binary and prints the same lines, so the adb path can be exercised (and a
model measured) on a machine without a phone or a ``benchmark_model`` build:

* ``Initialized session in X ms.`` then, per phase, ``count= first= curr= min=
  max= avg= std=`` (microseconds), and ``Inference timings in us: Init: ...,
  First inference: ..., Warmup (avg): ..., Inference (avg): ...``. Semantics
  follow the real tool: *Init* is model load + interpreter creation + tensor
  allocation (``Interpreter(model_path, num_threads=N)`` and
  ``get_signature_runner``); *First inference* is the first warmup run;
  *Warmup (avg)* averages the warmup runs (the first included); *Inference
  (avg)* averages the regular runs. A phase runs at least ``--*runs`` times
  and at least ``--*min_secs`` seconds, stopping after ``--max_secs``. Every run
  is timed with ``time.perf_counter`` around one call of the signature runner
  on fixed random inputs (uniform in [-0.5, 0.5) for floats, like the real
  tool), so it includes the Python API's per-call work (input copy, tensor
  (re)allocation check, output copy).
* ``--use_gpu=true``: there is no GPU delegate on the host; this says so and
  runs on the CPU (XNNPACK).
* ``--enable_op_profiling=true``: the Python LiteRT API has no op-level
  profiler, so the "Operator-wise Profiling Info for Regular Benchmark Runs"
  tables (same layout as the real tool's: ``[node type] [first] [avg ms] [%]
  [cdf%] [mem KB] [times called] [Name]``) hold ONE row for the whole
  signature (node type ``SIGNATURE``), and a line says so.

Errors (unknown flag, bad value, missing graph, unknown signature, a model that
does not load or run) print one ``ERROR:`` line to stderr and exit 1.
Only stdlib, numpy and ai_edge_litert are imported (this is ``runtime/``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from runtime import args as args_lib

# name -> (type, default, help); defaults are the real tool's. A number's type is its
# declared domain (runtime.args): NaN, inf and values that would run for ever are refused.
FLAGS: dict[str, tuple[Callable[[str], object], object, str]] = {
    "graph": (str, "", "path of the .tflite model"),
    "signature_to_run_for": (str, "", "signature key to run (required with several)"),
    "num_threads": (args_lib.count(-1, args_lib.MAX_THREADS), -1,
                    "interpreter threads (-1: LiteRT's default)"),
    "num_runs": (args_lib.count(0, args_lib.MAX_COUNT), 50, "minimum number of regular runs"),
    "min_secs": (args_lib.real(0.0, 3600.0), 1.0, "minimum seconds of regular runs"),
    "max_secs": (args_lib.real(0.0, 86_400.0), 150.0, "stop a phase after this many seconds"),
    "warmup_runs": (args_lib.count(0, args_lib.MAX_COUNT), 1, "minimum number of warmup runs"),
    "warmup_min_secs": (args_lib.real(0.0, 3600.0), 0.5, "minimum seconds of warmup runs"),
    "use_gpu": (bool, False, "ignored on the host (no GPU delegate): runs on CPU"),
    "gpu_precision_loss_allowed": (bool, True, "ignored on the host"),
    "enable_op_profiling": (bool, False, "print the op-profiling tables (one row)"),
    "random_seed": (args_lib.seed(), 0, "seed of the random inputs"),
}  # fmt: skip
_TRUE = ("1", "true", "yes", "y", "t")
_FALSE = ("0", "false", "no", "n", "f")


class UsageError(Exception):
    """A bad command line or model; printed as one ``ERROR:`` line."""


def _log(line: str = "") -> None:
    print(f"INFO: {line}" if line else "", flush=True)


def parse_flags(argv: Sequence[str]) -> dict[str, object]:
    """Parses ``--name=value`` flags (``--name`` alone means true for booleans)."""
    values = {name: default for name, (_, default, _) in FLAGS.items()}
    for arg in argv:
        if not arg.startswith("--"):
            raise UsageError(f"unexpected argument {arg!r} (flags are --name=value)")
        name, eq, raw = arg[2:].partition("=")
        if name not in FLAGS:
            raise UsageError(f"unknown flag --{name} (known: {', '.join(FLAGS)})")
        kind = FLAGS[name][0]
        if kind is bool:
            low = raw.strip().lower() if eq else "true"
            if low not in _TRUE + _FALSE:
                raise UsageError(f"--{name} expects true/false, got {raw!r}")
            values[name] = low in _TRUE
        else:
            try:
                values[name] = kind(raw)
            except ValueError as e:
                raise UsageError(f"--{name} {e}") from None
    return values


def _g(x: float) -> str:
    """A number as C++'s default ``ostream`` prints a double (6 significant digits)."""
    return f"{x:.6g}"


@dataclasses.dataclass
class Stat:
    """Run times in microseconds, summarized like TFLite's ``Stat<int64_t>``."""

    times_us: list[float] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.times_us)

    @property
    def avg(self) -> float:
        return sum(self.times_us) / len(self.times_us) if self.times_us else 0.0

    @property
    def std(self) -> float:
        if len(self.times_us) < 2:
            return 0.0
        m = self.avg
        return math.sqrt(sum((t - m) ** 2 for t in self.times_us) / len(self.times_us))

    def line(self) -> str:
        """``count=.. first=.. curr=.. min=.. max=.. avg=.. std=..`` as the real tool prints."""
        if not self.times_us:
            return "count=0"
        t = [int(round(x)) for x in self.times_us]
        return (
            f"count={len(t)} first={t[0]} curr={t[-1]} min={min(t)} max={max(t)} "
            f"avg={_g(self.avg)} std={int(round(self.std))}"
        )


def run_phase(fn: Callable[[], object], min_runs: int, min_secs: float, max_secs: float) -> Stat:
    """Calls `fn` at least `min_runs` times and `min_secs` seconds (at most `max_secs`)."""
    _log(
        f"Running benchmark for at least {min_runs} iterations and at least {_g(min_secs)} "
        f"seconds but terminate if exceeding {_g(max_secs)} seconds."
    )
    stat = Stat()
    start = time.perf_counter()
    while True:
        elapsed = time.perf_counter() - start
        if stat.count >= min_runs and elapsed >= min_secs:
            break
        if elapsed > max_secs:
            break
        t0 = time.perf_counter()
        fn()
        stat.times_us.append((time.perf_counter() - t0) * 1e6)
    _log(stat.line())
    _log()
    return stat


def random_inputs(details: dict[str, dict], seed: int) -> dict[str, np.ndarray]:
    """Random arrays for a signature's inputs (shape and dtype from `details`)."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for name, d in details.items():
        shape = tuple(int(s) if s > 0 else 1 for s in d["shape"])
        dtype = np.dtype(d["dtype"])
        if dtype.kind == "f":
            arr = rng.uniform(-0.5, 0.5, size=shape).astype(dtype)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, size=shape).astype(dtype)
        elif dtype.kind in "iu":
            info = np.iinfo(dtype)
            lo, hi = (max(info.min, -128), min(info.max, 127)) if dtype.kind == "i" else (0, 255)
            arr = rng.integers(lo, hi + 1, size=shape).astype(dtype)
        else:
            raise UsageError(f"input {name!r} has unsupported dtype {dtype}")
        inputs[name] = arr
    return inputs


def _field(value: object, width: int) -> str:
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    return "\t" + text.rjust(width)


def profile_tables(signature: str, stat: Stat) -> str:
    """The real tool's op-profiling tables for one row covering the whole signature."""
    first_ms = stat.times_us[0] / 1000.0 if stat.times_us else 0.0
    avg_ms = stat.avg / 1000.0
    name = f"[{signature}]:0"
    header = (
        _field("[node type]", 24)
        + _field("[first]", 9)
        + _field("[avg ms]", 9)
        + _field("[%]", 8)
        + _field("[cdf%]", 8)
        + _field("[mem KB]", 10)
        + _field("[times called]", 9)
        + "\t[Name]"
    )
    row = (
        _field("SIGNATURE", 24)
        + _field(first_ms, 9)
        + _field(avg_ms, 9)
        + _field(f"{100.0:.3f}%", 8)
        + _field(f"{100.0:.3f}%", 8)
        + _field(0.0, 10)
        + _field(1, 9)
        + f"\t{name}"
    )
    summary_header = (
        _field("[Node type]", 24)
        + _field("[count]", 9)
        + _field("[avg ms]", 10)
        + _field("[avg %]", 11)
        + _field("[cdf %]", 11)
        + _field("[mem KB]", 10)
        + _field("[times called]", 10)
    )
    summary_row = (
        _field("SIGNATURE", 24)
        + _field(1, 9)
        + _field(avg_ms, 10)
        + _field(f"{100.0:.3f}%", 10)
        + _field(f"{100.0:.3f}%", 10)
        + _field(0.0, 10)
        + _field(1, 9)
    )
    bar = "=============================="
    return "\n".join(
        [
            f"{bar} Run Order {bar}",
            header,
            row,
            "",
            f"{bar} Top by Computation Time {bar}",
            header,
            row,
            "",
            "Number of nodes executed: 1",
            f"{bar} Summary by node type {bar}",
            summary_header,
            summary_row,
            "",
            f"Timings (microseconds): {stat.line()}",
            "Memory (bytes): count=0",
            "1 nodes observed",
            "",
        ]
    )


def benchmark(flags: dict[str, object]) -> None:
    """Loads the model, runs warmup and regular phases, prints the real tool's lines."""

    graph = str(flags["graph"])
    signature = str(flags["signature_to_run_for"])
    num_threads = int(flags["num_threads"])  # type: ignore[arg-type]
    if not graph:
        raise UsageError("--graph is required (path of the .tflite model to benchmark)")
    if not os.path.isfile(graph):
        raise UsageError(f"model file not found: {graph}")
    if num_threads == 0 or num_threads < -1:
        raise UsageError(f"--num_threads must be -1 or >= 1, got {num_threads}")

    _log("STARTING!")
    _log("Log parameter values verbosely: [0]")
    _log(f"Min num runs: [{flags['num_runs']}]")
    _log(f"Min runs duration (seconds): [{_g(flags['min_secs'])}]")  # type: ignore[arg-type]
    _log(f"Num threads: [{num_threads}]")
    _log(f"Min warmup runs: [{flags['warmup_runs']}]")
    _log(f"Min warmup runs duration (seconds): [{_g(flags['warmup_min_secs'])}]")  # type: ignore[arg-type]
    _log(f"Graph: [{graph}]")
    _log(f"Signature to run: [{signature}]")
    if flags["enable_op_profiling"]:
        _log("Enable op profiling: [1]")
    if flags["use_gpu"]:
        _log("Use gpu: [1]")
        _log(
            "GPU delegate is unavailable on the host (benchmark_model_host); "
            "running on CPU instead."
        )

    t0 = time.perf_counter()
    try:
        interp = Interpreter(
            model_path=graph, num_threads=None if num_threads == -1 else num_threads
        )
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"cannot load model {graph}: {e}") from None
    signatures = sorted(interp.get_signature_list())
    if not signature:
        if len(signatures) > 1:
            raise UsageError(
                f"model has {len(signatures)} signatures ({', '.join(signatures)}); "
                "pass --signature_to_run_for"
            )
        signature = signatures[0] if signatures else ""
    elif signature not in signatures:
        raise UsageError(
            f"signature {signature!r} not found in {graph} "
            f"(available: {', '.join(signatures) or 'none'})"
        )
    if signature:
        runner = interp.get_signature_runner(signature)
        input_details = runner.get_input_details()
    else:  # a model without signatures: the main subgraph's inputs
        interp.allocate_tensors()
        input_details = {d["name"]: d for d in interp.get_input_details()}
    init_us = (time.perf_counter() - t0) * 1e6
    _log(f"Loaded model {graph}")
    _log(f"The input model file size (MB): {_g(os.path.getsize(graph) / 1e6)}")
    _log(f"Initialized session in {init_us / 1000.0:.3f}ms.")

    inputs = random_inputs(input_details, int(flags["random_seed"]))  # type: ignore[arg-type]
    if signature:

        def run_once() -> object:
            return runner(**inputs)

    else:
        index = {d["name"]: d["index"] for d in interp.get_input_details()}

        def run_once() -> object:
            for name, value in inputs.items():
                interp.set_tensor(index[name], value)
            interp.invoke()
            return None

    max_secs = float(flags["max_secs"])  # type: ignore[arg-type]
    try:
        warmup = run_phase(
            run_once,
            int(flags["warmup_runs"]),  # type: ignore[arg-type]
            float(flags["warmup_min_secs"]),  # type: ignore[arg-type]
            max_secs,
        )
        regular = run_phase(
            run_once,
            int(flags["num_runs"]),  # type: ignore[arg-type]
            float(flags["min_secs"]),  # type: ignore[arg-type]
            max_secs,
        )
    except (ValueError, RuntimeError) as e:
        raise UsageError(f"inference failed for signature {signature!r}: {e}") from None

    first_us = warmup.times_us[0] if warmup.times_us else 0.0
    _log(
        f"Inference timings in us: Init: {int(round(init_us))}, First inference: "
        f"{int(round(first_us))}, Warmup (avg): {_g(warmup.avg)}, "
        f"Inference (avg): {_g(regular.avg)}"
    )
    if flags["enable_op_profiling"]:
        _log(
            "The Python LiteRT API has no op-level profiler: the table has one row "
            "for the whole signature."
        )
        _log("Operator-wise Profiling Info for Regular Benchmark Runs:")
        print(profile_tables(signature or "main", regular), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit status (0 ok, 1 error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv):
        print(__doc__.split("\n\n")[0].strip())
        for name, (kind, default, text) in FLAGS.items():
            what = kind.domain.describe() if hasattr(kind, "domain") else kind.__name__
            print(f"  --{name}={default!r} ({what}): {text}")
        return 0
    try:
        benchmark(parse_flags(argv))
    except UsageError as e:
        print(f"ERROR: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
