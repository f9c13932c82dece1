"""Run exported TFLite models on an Android phone with TFLite's ``benchmark_model``.

The flow is the one the TFLite benchmark README describes, driven from Python:

1. ``adb devices`` picks the phone (`AdbTarget.check`);
2. ``adb push`` copies the user's ``benchmark_model`` binary (once, then
   ``chmod +x``) and the ``.tflite`` into ``device_dir`` (`AdbTarget.push`);
3. ``adb shell [taskset MASK] benchmark_model --graph=... --signature_to_run_for=...``
   runs one signature with exact run counts (``--min_secs=0
   --warmup_min_secs=0``), optionally on the GPU delegate and with op
   profiling (`AdbTarget.benchmark`);
4. its output is parsed: the line ``Inference timings in us: Init: ..., First
   inference: ..., Warmup (avg): ..., Inference (avg): ...`` (`parse_timings`)
   and the op-profiling "Run Order" table (`parse_op_profile`).

Energy (optional, ``energy=True``): while the benchmark runs, a thread reads
``/sys/class/power_supply/battery/current_now`` and ``voltage_now`` through a
separate ``adb shell cat`` loop. Caveats that no code can fix:

* units and sign vary by vendor. Most phones report microamperes and
  microvolts; the current is negative while discharging on some and positive
  on others, so its absolute value is used. The voltage unit is guessed from
  its magnitude (µV, mV or V); the current is assumed to be in µA (a phone
  that reports mA reads 1000x too low: check ``current_raw_mean``);
* while the USB cable charges the phone, the battery current is the *net* of
  charging and load, so readings are meaningless. Disable USB charging (e.g.
  ``adb shell dumpsys battery unplug`` on many phones, or a charge-blocking
  cable / ``adb`` over Wi-Fi) before trusting the numbers;
* the reading is whole-phone power, idle (screen, radios) included; the
  per-inference energy is not baseline-corrected.

Everything here is stdlib only (``runtime/`` never imports JAX or TensorFlow);
subprocesses get argument lists (no host shell) and timeouts. Every failure is
an `AdbError` whose message is one line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from typing import Any

BENCHMARK_REMOTE_NAME = "benchmark_model"
BATTERY_DIR = "/sys/class/power_supply/battery"
CURRENT_PATH = f"{BATTERY_DIR}/current_now"
VOLTAGE_PATH = f"{BATTERY_DIR}/voltage_now"
# Seconds between two battery reads (each read is itself one adb round trip, ~10-50 ms).
ENERGY_SAMPLE_INTERVAL_S = 0.05
# `adb devices` may have to start the adb server first.
DEVICES_TIMEOUT_S = 60.0
PUSH_TIMEOUT_S = 300.0
SHELL_TIMEOUT_S = 60.0

_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:inf|nan)"
# Current benchmark_model (TF >= 2.3 and LiteRT): one line, optionally after "INFO: ".
_TIMINGS_RE = re.compile(
    rf"Inference timings in us:\s*Init:\s*(?P<init>{_NUM}),\s*"
    rf"First inference:\s*(?P<first>{_NUM}),\s*"
    rf"Warmup \(avg\):\s*(?P<warmup>{_NUM}),\s*"
    rf"Inference \(avg\):\s*(?P<avg>{_NUM})"
)
# Older benchmark_model (TF 1.x / 2.0-2.2) printed no first-inference time.
_OLD_TIMINGS_RE = re.compile(
    rf"Average inference timings in us:\s*Warmup:\s*(?P<warmup>{_NUM}),\s*"
    rf"Init:\s*(?P<init>{_NUM}),\s*Inference:\s*(?P<avg>{_NUM})"
)
_CELL_NUM_RE = re.compile(rf"^(?:{_NUM})%?$")
# Column header of the op-profiling tables -> key in `parse_op_profile` rows.
_COLUMN_KEYS = {
    "node type": "node_type",
    "start": "start_ms",
    "first": "first_ms",
    "avg ms": "avg_ms",
    "%": "percent",
    "cdf%": "cdf_percent",
    "mem kb": "mem_kb",
    "times called": "times_called",
    "name": "name",
    "count": "count",
    "avg %": "percent",
    "cdf %": "cdf_percent",
}
_INT_KEYS = ("times_called", "count")
_TEXT_KEYS = ("node_type", "name")


class AdbError(RuntimeError):
    """A failure talking to the phone or running ``benchmark_model``; the message is one line."""

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


@dataclasses.dataclass(frozen=True)
class SignatureTiming:
    """``benchmark_model`` results for one signature of one model.

    Attributes:
      signature: the signature that was run (``--signature_to_run_for``).
      init_us: session initialization (model load, delegate, tensor allocation).
      first_us: the first inference (the first warmup run).
      warmup_avg_us: mean of the warmup runs (the first one included).
      avg_us: mean of the ``num_runs`` timed runs: the latency to report.
      num_runs, use_gpu, num_threads: how it was run.
      op_profile: rows of the "Run Order" op-profiling table of the regular runs
        (see `parse_op_profile`); empty without op profiling.
      energy: battery-based power/energy estimate (see the module docstring),
        or None when not requested.
    """

    signature: str
    init_us: float
    first_us: float
    warmup_avg_us: float
    avg_us: float
    num_runs: int
    use_gpu: bool
    num_threads: int
    op_profile: list[dict] = dataclasses.field(default_factory=list)
    energy: dict | None = None

    def to_dict(self) -> dict:
        """A JSON-friendly dict (floats, ints, strings, lists, dicts)."""
        return dataclasses.asdict(self)


def _one_line(text: str) -> str:
    """Collapses whitespace (newlines included) so a message is one line."""
    return " ".join(str(text).split())


def _last_line(text: str) -> str:
    """The last non-empty line of `text`, or ``<no output>``."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "<no output>"


def _to_float(text: str) -> float:
    return float(text.strip().rstrip("%"))


def parse_timings(text: str) -> dict[str, float]:
    """Parses ``benchmark_model``'s timing line.

    Accepts ``Inference timings in us: Init: 1234, First inference: 567, Warmup
    (avg): 89.1, Inference (avg): 78.9`` (with or without a log prefix such as
    ``INFO:``; C++ prints large values as ``1.23457e+06``) and, from older
    binaries, ``Average inference timings in us: Warmup: W, Init: I, Inference:
    A`` (``first_us`` is then NaN). The last such line wins.

    Returns:
      ``{"init_us", "first_us", "warmup_avg_us", "avg_us"}`` in microseconds.

    Raises:
      AdbError: no timing line; the message quotes the output's last line.
    """
    matches = list(_TIMINGS_RE.finditer(text or ""))
    if matches:
        m = matches[-1]
        return {
            "init_us": float(m["init"]),
            "first_us": float(m["first"]),
            "warmup_avg_us": float(m["warmup"]),
            "avg_us": float(m["avg"]),
        }
    old = list(_OLD_TIMINGS_RE.finditer(text or ""))
    if old:
        m = old[-1]
        return {
            "init_us": float(m["init"]),
            "first_us": math.nan,
            "warmup_avg_us": float(m["warmup"]),
            "avg_us": float(m["avg"]),
        }
    raise AdbError(
        "no 'Inference timings in us' line in benchmark_model output; "
        f"last line: {_last_line(text)!r}"
    )


def _column_key(header: str) -> str:
    header = header.strip()
    key = _COLUMN_KEYS.get(header.lower())
    if key is not None:
        return key
    return re.sub(r"[^0-9a-z]+", "_", header.lower()).strip("_") or "column"


def _split_row(line: str, ncols: int) -> list[str] | None:
    """Splits one table row into `ncols` cells (first and last are text), or None."""
    if "\t" in line:
        cells = line.split("\t")
        if cells and not cells[0].strip():
            cells = cells[1:]
        cells = [c.strip() for c in cells]
        if len(cells) > ncols:  # a name that itself holds tabs
            cells = cells[: ncols - 1] + ["\t".join(cells[ncols - 1 :])]
        if len(cells) == ncols and all(_CELL_NUM_RE.match(c) for c in cells[1:-1]):
            return cells
    # Space-aligned tables (LiteRT's summarizer, copy-pasted logs): the node type
    # and the name may hold spaces, the ncols - 2 cells between them are numbers.
    tokens = line.split()
    nnum = ncols - 2
    for i in range(1, len(tokens) - nnum):
        window = tokens[i : i + nnum]
        if all(_CELL_NUM_RE.match(t) for t in window):
            return [" ".join(tokens[:i]), *window, " ".join(tokens[i + nnum :])]
    return None


def _parse_table(lines: list[str], header_index: int) -> list[dict]:
    """Parses the rows under the header line at `header_index` until a blank or ``=`` line."""
    columns = re.findall(r"\[([^\]]+)\]", lines[header_index])
    keys = [_column_key(c) for c in columns]
    rows: list[dict] = []
    if len(keys) < 3:
        return rows
    for line in lines[header_index + 1 :]:
        if not line.strip() or line.lstrip().startswith("="):
            break
        cells = _split_row(line.rstrip("\r\n"), len(keys))
        if cells is None:
            continue
        row: dict[str, Any] = {}
        for key, cell in zip(keys, cells):
            if key in _TEXT_KEYS:
                row[key] = cell
            elif key in _INT_KEYS:
                row[key] = int(round(_to_float(cell)))
            else:
                try:
                    row[key] = _to_float(cell)
                except ValueError:
                    row[key] = cell
        rows.append(row)
    return rows


def parse_op_profile(text: str) -> list[dict]:
    """Parses the op-profiling "Run Order" table of the regular benchmark runs.

    ``--enable_op_profiling=true`` makes ``benchmark_model`` print "Profiling
    Info for Benchmark Initialization:" (skipped here) and "Operator-wise
    Profiling Info for Regular Benchmark Runs:", each followed by "Run Order",
    "Top by Computation Time" and "Summary by node type" tables. The columns
    differ between versions (older ones have ``[start]``; tab-separated
    right-aligned cells in TF, space-aligned in LiteRT's summarizer; node types
    such as ``Convolution (NHWC, QC8) GEMM`` and names hold spaces), so the
    header decides: each row is a dict keyed by its column, e.g.
    ``{"node_type": "CONV_2D", "start_ms": 0.0, "first_ms": 4.269, "avg_ms":
    4.269, "percent": 0.107, "cdf_percent": 0.107, "mem_kb": 0.0,
    "times_called": 1, "name": "[MobilenetV1/Conv2d_0/Relu6]:0"}`` (percentages
    without ``%``; unknown columns get a slugified key). With the GPU delegate
    the table has one row per delegate node. Returns ``[]`` when there is no
    table.
    """
    lines = (text or "").splitlines()
    section = "run"
    found: list[dict] | None = None
    for i, line in enumerate(lines):
        if "Operator-wise Profiling Info" in line:
            section = "run"
        elif "Profiling Info for Benchmark Initialization" in line:
            section = "init"
        elif "Run Order" in line and "=====" in line and section == "run":
            for j in range(i + 1, len(lines)):
                if lines[j].strip():
                    if "[node type]" in lines[j].lower():
                        found = _parse_table(lines, j)
                    break
    return found or []


@dataclasses.dataclass
class _Sample:
    t: float
    current_raw: float
    voltage_raw: float


def _voltage_scale(raw: float) -> float:
    """Divisor that turns a raw ``voltage_now`` into volts, guessed from its magnitude."""
    raw = abs(raw)
    if raw >= 1e5:  # microvolts (the kernel's documented unit): 3.8 V = 3800000
        return 1e6
    if raw >= 100:  # millivolts
        return 1e3
    return 1.0


class _EnergySampler(threading.Thread):
    """Reads the battery current and voltage through ``adb shell cat`` until stopped."""

    def __init__(self, target: AdbTarget) -> None:
        super().__init__(daemon=True)
        self._target = target
        self._stop_event = threading.Event()
        self.samples: list[_Sample] = []
        self.errors: list[str] = []

    def read_once(self) -> _Sample:
        out = self._target._shell(["cat", CURRENT_PATH, VOLTAGE_PATH], timeout=10.0)
        values = out.split()
        if len(values) < 2:
            raise AdbError(
                f"cannot read {CURRENT_PATH} and {VOLTAGE_PATH} on {self._target.serial}: "
                f"{_last_line(out)!r}"
            )
        try:
            return _Sample(time.perf_counter(), float(values[0]), float(values[1]))
        except ValueError as e:
            raise AdbError(f"unexpected battery readings {values[:2]!r}: {e}") from None

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.samples.append(self.read_once())
            except AdbError as e:
                self.errors.append(str(e))
            self._stop_event.wait(ENERGY_SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=15.0)


def _energy_summary(
    samples: list[_Sample], duration_s: float, num_runs: int, avg_us: float
) -> dict:
    currents = [abs(s.current_raw) / 1e6 for s in samples]  # assumed µA -> A
    volts = [s.voltage_raw / _voltage_scale(s.voltage_raw) for s in samples]
    power = [i * v for i, v in zip(currents, volts)]
    power_w = sum(power) / len(power)
    return {
        "current_a": sum(currents) / len(currents),
        "voltage_v": sum(volts) / len(volts),
        "power_w": power_w,
        "samples": len(samples),
        "duration_s": duration_s,
        # Whole benchmark process (init, warmup, timed runs) over the timed runs:
        # an upper bound per inference.
        "energy_per_inference_j": power_w * duration_s / max(num_runs, 1),
        # Power times the measured mean latency: the inference's own share.
        "energy_per_inference_active_j": power_w * avg_us * 1e-6,
        "current_raw_mean": sum(s.current_raw for s in samples) / len(samples),
        "voltage_raw_mean": sum(s.voltage_raw for s in samples) / len(samples),
        "units_note": (
            "current_now assumed in uA (abs taken), voltage unit guessed from magnitude; "
            "vendor-specific, and meaningless while USB charges the phone"
        ),
    }


class AdbTarget:
    """One Android phone reached through ``adb``, with a ``benchmark_model`` binary.

    Args:
      serial: the device serial (``adb devices``); None picks the only attached
        device (or ``$ANDROID_SERIAL`` when set).
      benchmark_binary: local path of TFLite's ``benchmark_model`` built for the
        phone (e.g. ``android_aarch64_benchmark_model``); pushed once as
        ``<device_dir>/benchmark_model``.
      adb: the adb executable (name on PATH or a path).
      device_dir: where binary and models go on the phone.
      timeout_s: limit for one ``benchmark_model`` run.
      taskset: optional CPU affinity mask (hex, e.g. ``"f0"`` for the big cores
        of many phones) run as ``taskset MASK benchmark_model ...``.
    """

    def __init__(
        self,
        serial: str | None,
        benchmark_binary: str,
        *,
        adb: str = "adb",
        device_dir: str = "/data/local/tmp/flexjax",
        timeout_s: float = 600,
        taskset: str | None = None,
    ) -> None:
        self.requested_serial = serial
        self.benchmark_binary = benchmark_binary
        self.adb = adb
        self.device_dir = device_dir.rstrip("/") or "/"
        self.timeout_s = float(timeout_s)
        self.taskset = taskset
        self.serial: str | None = None
        self._dir_ready = False
        self._binary_remote: str | None = None
        self._pushed: dict[tuple[str, int, int], str] = {}

    # -- plumbing ---------------------------------------------------------------------------

    def _adb_path(self) -> str:
        path = shutil.which(self.adb)
        if path is None and os.sep in self.adb:
            raise AdbError(f"adb not found: {self.adb!r} is not an executable file")
        if path is None:
            raise AdbError(
                f"adb not found on PATH ({self.adb!r}); install Android platform-tools "
                "(Debian/Ubuntu: apt-get install adb) or pass adb=/path/to/adb"
            )
        return path

    def _run(
        self, args: Sequence[str], *, timeout: float, what: str
    ) -> subprocess.CompletedProcess:
        """Runs ``adb ARGS`` (stdout and stderr merged); AdbError on a missing adb or timeout."""
        cmd = [self._adb_path(), *args]
        try:
            # Own process group, so a timeout also ends what the client started locally.
            proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                start_new_session=True,
            )
        except FileNotFoundError:
            raise AdbError(f"adb not found ({self.adb!r})") from None
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
            try:
                proc.communicate(timeout=5.0)
            except subprocess.TimeoutExpired:
                if proc.stdout is not None:
                    proc.stdout.close()
            raise AdbError(
                f"{what} timed out after {timeout:g} s (the process may still run on the device)"
            ) from None
        return subprocess.CompletedProcess(cmd, proc.returncode, out, None)

    def _device_args(self) -> list[str]:
        return ["-s", self._ensure_device()]

    def _shell(self, argv: Sequence[str], *, timeout: float = SHELL_TIMEOUT_S) -> str:
        """Runs `argv` on the phone (quoted for its ``sh``); AdbError on a non-zero exit."""
        command = " ".join(shlex.quote(a) for a in argv)
        proc = self._run(
            [*self._device_args(), "shell", command], timeout=timeout, what=f"adb shell {command}"
        )
        if proc.returncode != 0:
            raise AdbError(
                f"adb shell {command} failed on {self.serial} (exit {proc.returncode}): "
                f"{_last_line(proc.stdout)}"
            )
        return proc.stdout

    def _ensure_device(self) -> str:
        return self.serial if self.serial is not None else self.check()

    # -- public API -------------------------------------------------------------------------

    def check(self) -> str:
        """Runs ``adb devices`` and returns the serial in use.

        Raises:
          AdbError: adb is missing; no device is attached; the requested serial
            is not attached; several are attached and none was chosen; or the
            device is unauthorized / offline / not in the ``device`` state.
        """
        proc = self._run(["devices"], timeout=DEVICES_TIMEOUT_S, what="adb devices")
        if proc.returncode != 0:
            raise AdbError(
                f"adb devices failed (exit {proc.returncode}): {_last_line(proc.stdout)}"
            )
        devices: list[tuple[str, str]] = []
        for line in proc.stdout.splitlines():
            line = line.strip()
            if not line or line.startswith("*") or line.startswith("List of devices"):
                continue
            parts = line.split()
            if len(parts) >= 2:
                devices.append((parts[0], parts[1]))
        listing = ", ".join(f"{s} ({st})" for s, st in devices)
        if not devices:
            raise AdbError(
                "no Android device attached (adb devices lists none); connect a phone with "
                "USB debugging enabled and accept its RSA prompt, or start an emulator"
            )
        wanted = self.requested_serial or os.environ.get("ANDROID_SERIAL") or None
        if wanted is None:
            if len(devices) > 1:
                raise AdbError(
                    f"several Android devices attached ({listing}); choose one with serial="
                )
            serial, state = devices[0]
        else:
            states = dict(devices)
            if wanted not in states:
                raise AdbError(
                    f"Android device {wanted!r} is not attached (adb devices lists: {listing})"
                )
            serial, state = wanted, states[wanted]
        if state == "unauthorized":
            raise AdbError(
                f"Android device {serial} is unauthorized: unlock it and accept the "
                "'Allow USB debugging' prompt"
            )
        if state == "offline":
            raise AdbError(
                f"Android device {serial} is offline: reconnect the cable or run adb kill-server"
            )
        if state != "device":
            raise AdbError(f"Android device {serial} is in state {state!r}, not 'device'")
        self.serial = serial
        return serial

    def _push_file(self, local_path: str, remote: str) -> None:
        proc = self._run(
            [*self._device_args(), "push", local_path, remote],
            timeout=PUSH_TIMEOUT_S,
            what=f"adb push {local_path}",
        )
        if proc.returncode != 0:
            raise AdbError(
                f"adb push {local_path} {remote} failed (exit {proc.returncode}): "
                f"{_last_line(proc.stdout)}"
            )

    def _ensure_binary(self) -> str:
        if self._binary_remote is None:
            if not os.path.isfile(self.benchmark_binary):
                raise AdbError(
                    f"benchmark_model binary not found: {self.benchmark_binary!r} (build "
                    "//tensorflow/lite/tools/benchmark:benchmark_model for the phone or "
                    "download android_aarch64_benchmark_model)"
                )
            remote = f"{self.device_dir}/{BENCHMARK_REMOTE_NAME}"
            self._push_file(self.benchmark_binary, remote)
            self._shell(["chmod", "+x", remote])
            self._binary_remote = remote
        return self._binary_remote

    def push(self, local_path: str) -> str:
        """Pushes `local_path` into ``device_dir`` and returns its remote path.

        The first call also creates ``device_dir`` (``mkdir -p``) and pushes the
        benchmark binary (then ``chmod +x``). A file already pushed unchanged
        (same path, size and mtime) is not pushed again.
        """
        if not os.path.isfile(local_path):
            raise AdbError(f"no such file to push: {local_path!r}")
        self._ensure_device()
        if not self._dir_ready:
            self._shell(["mkdir", "-p", self.device_dir])
            self._dir_ready = True
        self._ensure_binary()
        st = os.stat(local_path)
        key = (os.path.abspath(local_path), st.st_size, st.st_mtime_ns)
        if key not in self._pushed:
            remote = f"{self.device_dir}/{os.path.basename(local_path)}"
            self._push_file(local_path, remote)
            self._pushed[key] = remote
        return self._pushed[key]

    def benchmark_command(
        self,
        remote_model: str,
        signature: str,
        *,
        num_threads: int = 4,
        use_gpu: bool = False,
        num_runs: int = 50,
        warmup_runs: int = 5,
        op_profiling: bool = True,
    ) -> list[str]:
        """The device-side argv of one ``benchmark_model`` run (exact run counts)."""
        binary = f"{self.device_dir}/{BENCHMARK_REMOTE_NAME}"
        argv = ["taskset", self.taskset] if self.taskset else []
        argv += [
            binary,
            f"--graph={remote_model}",
            f"--signature_to_run_for={signature}",
            f"--num_threads={int(num_threads)}",
            f"--num_runs={int(num_runs)}",
            f"--warmup_runs={int(warmup_runs)}",
            "--min_secs=0",
            "--warmup_min_secs=0",
        ]
        if use_gpu:
            argv += ["--use_gpu=true", "--gpu_precision_loss_allowed=true"]
        if op_profiling:
            argv.append("--enable_op_profiling=true")
        return argv

    def benchmark(
        self,
        model_path: str,
        signature: str,
        *,
        num_threads: int = 4,
        use_gpu: bool = False,
        num_runs: int = 50,
        warmup_runs: int = 5,
        op_profiling: bool = True,
        energy: bool = False,
    ) -> SignatureTiming:
        """Runs one signature of the local model `model_path` on the phone.

        Raises:
          AdbError: device/push problems, a non-zero exit, a timeout (``timeout_s``)
            or output without a timing line; one line naming the signature and
            quoting the output's last line.
        """
        remote_model = self.push(model_path)
        argv = self.benchmark_command(
            remote_model,
            signature,
            num_threads=num_threads,
            use_gpu=use_gpu,
            num_runs=num_runs,
            warmup_runs=warmup_runs,
            op_profiling=op_profiling,
        )
        command = " ".join(shlex.quote(a) for a in argv)
        sampler: _EnergySampler | None = None
        if energy:
            sampler = _EnergySampler(self)
            sampler.samples.append(sampler.read_once())  # fails early if unreadable
            sampler.start()
        t0 = time.perf_counter()
        try:
            proc = self._run(
                [*self._device_args(), "shell", command],
                timeout=self.timeout_s,
                what=f"benchmark_model ({signature!r} on {self.serial})",
            )
        finally:
            duration_s = time.perf_counter() - t0
            if sampler is not None:
                sampler.stop()
        output = proc.stdout
        if proc.returncode != 0:
            raise AdbError(
                f"benchmark_model failed on {self.serial} for signature {signature!r} "
                f"(exit {proc.returncode}): {_last_line(output)}"
            )
        try:
            timings = parse_timings(output)
        except AdbError as e:
            raise AdbError(f"signature {signature!r} on {self.serial}: {e}") from None
        energy_info = None
        if sampler is not None:
            samples = sampler.samples
            if len(samples) > 1:  # drop the pre-run reading when the run gave its own
                samples = samples[1:]
            energy_info = _energy_summary(samples, duration_s, num_runs, timings["avg_us"])
        return SignatureTiming(
            signature=signature,
            init_us=timings["init_us"],
            first_us=timings["first_us"],
            warmup_avg_us=timings["warmup_avg_us"],
            avg_us=timings["avg_us"],
            num_runs=int(num_runs),
            use_gpu=bool(use_gpu),
            num_threads=int(num_threads),
            op_profile=parse_op_profile(output) if op_profiling else [],
            energy=energy_info,
        )

    def benchmark_all(
        self, model_path: str, signatures: Sequence[str], **kw: Any
    ) -> dict[str, SignatureTiming]:
        """`benchmark` for each signature in turn (the model is pushed once)."""
        return {sig: self.benchmark(model_path, sig, **kw) for sig in signatures}
