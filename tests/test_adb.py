"""runtime.adb and runtime.benchmark_model_host: real adb (no phone), a stand-in adb, parsers."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import textwrap

import pytest

from runtime import adb as radb
from runtime.adb import AdbError, AdbTarget, parse_op_profile, parse_timings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKES = os.path.join(ROOT, "tests", "fakes")
SIGNATURES = ("exit_a", "segment_b")

# --- genuine benchmark_model output ------------------------------------------------------
# Timing line as printed by benchmark_model on an Android phone, quoted in
# https://github.com/tensorflow/tensorflow/issues/42507 (2020, `adb shell` run with
# --enable_op_profiling=true).
REAL_TIMINGS = """\
count=50 first=32891 curr=33978 min=32641 max=34005 avg=33209.4 std=450

Inference timings in us: Init: 855, First inference: 49060, Warmup (avg): 34825.1, Inference (avg): 33209.4
Note: as the benchmark tool itself affects memory footprint, the following is only APPROXIMATE to the actual memory footprint of the model at runtime. Take the information at your discretion.
Peak memory footprint (MB): init=0 overall=12.8672
"""  # noqa: E501

# Op profiling of the regular runs (tab-separated, with the older [start] column; NNAPI
# delegate nodes and a name holding ", "), from the README of
# https://github.com/freedomtan/deeplabv3_tflite_for_nnapi_delegate (first rows, verbatim).
REAL_OP_PROFILE = (
    "Operator-wise Profiling Info for Regular Benchmark Runs:\n"
    "============================== Run Order ==============================\n"
    "\t             [node type]\t          [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]"
    "\t  [mem KB]\t[times called]\t[Name]\n"
    "\t     TfLiteNnapiDelegate\t            0.000\t   11.665\t   11.422\t 21.939%\t 21.939%"
    "\t     0.000\t        1\t[MobilenetV2/expanded_conv_16/project/add_fold, aspp0/Relu]:71\n"
    "\t         AVERAGE_POOL_2D\t           11.422\t    0.075\t    0.080\t  0.153%\t 22.092%"
    "\t     0.000\t        1\t[AvgPool2D/AvgPool]:61\n"
    "\t     TfLiteNnapiDelegate\t           11.503\t    0.549\t    0.654\t  1.256%\t 23.348%"
    "\t     0.000\t        1\t[image_pooling/Relu]:72\n"
    "\t                 ARG_MAX\t           36.740\t   15.440\t   15.326\t 29.438%\t100.000%"
    "\t     0.000\t        1\t[ArgMax]:70\n"
)

# Older binaries: the README of tensorflow/lite/tools/benchmark in tensorflow/tensorflow
# ("Profiling model operators"): tables without a section header, then this summary line.
REAL_OLD_README = (
    "============================== Run Order ==============================\n"
    "\t             [node type]\t  [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]"
    "\t  [mem KB]\t[times called]\t[Name]\n"
    "\t                 CONV_2D\t    0.000\t    4.269\t    4.269\t  0.107%\t  0.107%"
    "\t     0.000\t        0\t[MobilenetV1/MobilenetV1/Conv2d_0/Relu6]\n"
    "\t       DEPTHWISE_CONV_2D\t    4.270\t    2.150\t    2.150\t  0.054%\t  0.161%"
    "\t     0.000\t        0\t[MobilenetV1/MobilenetV1/Conv2d_1_depthwise/Relu6]\n"
    "\n"
    "============================== Top by Computation Time ==============================\n"
    "\t             [node type]\t  [start]\t  [first]\t [avg ms]\t     [%]\t  [cdf%]"
    "\t  [mem KB]\t[times called]\t[Name]\n"
    "\t                 CONV_2D\t   19.352\t    6.652\t    6.652\t  0.167%\t  0.167%"
    "\t     0.000\t        0\t[MobilenetV1/MobilenetV1/Conv2d_3_pointwise/Relu6]\n"
    "\n"
    "Average inference timings in us: Warmup: 83235, Init: 38467, Inference: 79760.9\n"
)

# The same table as LiteRT's newer summarizer lays it out (space-aligned, no [start],
# node types with spaces: XNNPACK-delegated ops), as in published logs of
# linux_x86-64_benchmark_model --enable_op_profiling=true.
SPACE_ALIGNED_PROFILE = """\
INFO: Profiling Info for Benchmark Initialization:
============================== Run Order ==============================
                                     [node type]          [first]        [avg ms]            [%]          [cdf%]          [mem KB]        [times called]  [Name]
                                 AllocateTensors            5.061           5.061        44.360%        100.000%         10292.000                1       AllocateTensors/0

INFO: Operator-wise Profiling Info for Regular Benchmark Runs:
============================== Run Order ==============================
                                     [node type]          [first]        [avg ms]            [%]          [cdf%]          [mem KB]        [times called]  [Name]
                                        QUANTIZE            0.199           0.203         1.328%          1.328%             0.000                1       [tfl.quantize]:0
                   Convolution (NHWC, QC8) IGEMM            0.398           0.407         2.658%          3.986%             0.000                1       Delegate/Convolution (NHWC, QC8) IGEMM:0
                  Convolution (NHWC, QC8) DWConv            0.428           0.051         4.317%          8.304%             0.000               13       Delegate/Convolution (NHWC, QC8) DWConv:1

============================== Top by Computation Time ==============================
"""  # noqa: E501


# --- parsers ---------------------------------------------------------------------------------


def test_parse_timings_real_line():
    t = parse_timings(REAL_TIMINGS)
    assert t == {
        "init_us": 855.0,
        "first_us": 49060.0,
        "warmup_avg_us": 34825.1,
        "avg_us": 33209.4,
    }


def test_parse_timings_log_prefix_exponent_and_old_format():
    line = (
        "INFO: Inference timings in us: Init: 52687, First inference: 1.23457e+06, "
        "Warmup (avg): 14452.5, Inference (avg): 14290.9"
    )
    assert parse_timings(line)["first_us"] == pytest.approx(1.23457e6)
    old = parse_timings(REAL_OLD_README)
    assert old["init_us"] == 38467 and old["warmup_avg_us"] == 83235
    assert old["avg_us"] == pytest.approx(79760.9) and math.isnan(old["first_us"])


def test_parse_timings_garbage_is_one_line_error():
    garbage = "STARTING!\nsegmentation fault\nAborted (core dumped)\n"
    with pytest.raises(AdbError, match="Aborted") as e:
        parse_timings(garbage)
    assert "\n" not in str(e.value)
    with pytest.raises(AdbError, match="no output"):
        parse_timings("")


def test_parse_op_profile_real_sample():
    rows = parse_op_profile(REAL_TIMINGS + REAL_OP_PROFILE)
    assert [r["node_type"] for r in rows] == [
        "TfLiteNnapiDelegate",
        "AVERAGE_POOL_2D",
        "TfLiteNnapiDelegate",
        "ARG_MAX",
    ]
    first = rows[0]
    assert first["name"] == "[MobilenetV2/expanded_conv_16/project/add_fold, aspp0/Relu]:71"
    assert first["start_ms"] == 0.0 and first["first_ms"] == 11.665
    assert first["avg_ms"] == 11.422 and first["percent"] == 21.939
    assert first["cdf_percent"] == 21.939 and first["mem_kb"] == 0.0
    assert first["times_called"] == 1
    assert rows[-1]["cdf_percent"] == 100.0


def test_parse_op_profile_old_readme_takes_run_order_only():
    rows = parse_op_profile(REAL_OLD_README)
    assert [r["name"] for r in rows] == [
        "[MobilenetV1/MobilenetV1/Conv2d_0/Relu6]",
        "[MobilenetV1/MobilenetV1/Conv2d_1_depthwise/Relu6]",
    ]
    assert rows[1]["start_ms"] == 4.27 and rows[1]["avg_ms"] == 2.15


def test_parse_op_profile_space_aligned_skips_init_section():
    rows = parse_op_profile(SPACE_ALIGNED_PROFILE)
    assert [r["node_type"] for r in rows] == [
        "QUANTIZE",
        "Convolution (NHWC, QC8) IGEMM",
        "Convolution (NHWC, QC8) DWConv",
    ]
    assert "start_ms" not in rows[0]
    assert rows[1]["name"] == "Delegate/Convolution (NHWC, QC8) IGEMM:0"
    assert rows[2]["times_called"] == 13 and rows[2]["avg_ms"] == 0.051


def test_parse_op_profile_absent():
    assert parse_op_profile(REAL_TIMINGS) == []
    assert parse_op_profile("") == []


# --- a real two-signature model ----------------------------------------------------------

_MAKE_MODEL = textwrap.dedent(
    """
    import os, sys
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    out_dir = sys.argv[1]

    class Two(tf.Module):
        def __init__(self):
            super().__init__()
            self.w = tf.Variable(tf.random.stateless_normal([8, 4], seed=[1, 2]))
            self.k = tf.Variable(tf.random.stateless_normal([3, 3, 3, 8], seed=[3, 4]))

        # Distinct function names per signature (REFERENCE.md trap).
        @tf.function(input_signature=[tf.TensorSpec([1, 8], tf.float32, name="x")])
        def exit_a(self, x):
            return {"logits": tf.nn.softmax(tf.matmul(x, self.w))}

        @tf.function(input_signature=[tf.TensorSpec([1, 16, 16, 3], tf.float32, name="image")])
        def segment_b(self, image):
            y = tf.nn.relu(tf.nn.conv2d(image, self.k, 1, "SAME"))
            return {"activation": tf.reduce_mean(y, axis=[1, 2])}

    m = Two()
    saved = os.path.join(out_dir, "saved")
    tf.saved_model.save(m, saved, signatures={"exit_a": m.exit_a, "segment_b": m.segment_b})
    flat = tf.lite.TFLiteConverter.from_saved_model(saved).convert()
    with open(os.path.join(out_dir, "two.tflite"), "wb") as f:
        f.write(flat)
    """
)


@pytest.fixture(scope="module")
def two_sig_model(tmp_path_factory) -> str:
    """A tiny real .tflite with two signatures (built by TensorFlow in a subprocess)."""
    out = tmp_path_factory.mktemp("model")
    proc = subprocess.run(
        [sys.executable, "-c", _MAKE_MODEL, str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = str(out / "two.tflite")
    from ai_edge_litert.interpreter import Interpreter

    assert sorted(Interpreter(model_path=path).get_signature_list()) == list(SIGNATURES)
    return path


def _host_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "runtime.benchmark_model_host", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_host_tool_prints_real_format(two_sig_model):
    proc = _host_tool(
        f"--graph={two_sig_model}",
        "--signature_to_run_for=segment_b",
        "--num_threads=2",
        "--num_runs=7",
        "--warmup_runs=2",
        "--min_secs=0",
        "--warmup_min_secs=0",
        "--enable_op_profiling=true",
        "--use_gpu=true",
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "count=2 " in out and "count=7 " in out
    assert "GPU delegate is unavailable on the host" in out
    t = parse_timings(out)
    assert all(t[k] > 0 for k in t)
    rows = parse_op_profile(out)
    assert len(rows) == 1 and rows[0]["node_type"] == "SIGNATURE"
    assert rows[0]["name"] == "[segment_b]:0" and rows[0]["percent"] == 100.0
    assert rows[0]["avg_ms"] == pytest.approx(t["avg_us"] / 1000, abs=1e-3)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--bogus=1",), "unknown flag --bogus"),
        (("--num_runs=3",), "--graph is required"),
        (("--graph=/nonexistent/m.tflite",), "model file not found"),
        (("--signature_to_run_for=nope",), "signature 'nope' not found"),
        ((), "pass --signature_to_run_for"),
        (("--use_gpu=maybe",), "expects true/false"),
    ],
)
def test_host_tool_errors_are_one_line(two_sig_model, args, message):
    if not any(a.startswith("--graph") for a in args) and "--graph is required" not in message:
        args = (f"--graph={two_sig_model}", *args)
    proc = _host_tool(*args)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and message in lines[0], lines


# --- adb: real client without a phone, adb missing -------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def real_adb(tmp_path, monkeypatch):
    """The real adb client, on a private server port, HOME and key dir; server killed after."""
    adb_path = shutil.which("adb", path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin")
    if adb_path is None:
        pytest.skip("the real adb client is not installed (Debian: apt-get install adb)")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("ADB_VENDOR_KEYS", str(home / "adbkeys"))
    monkeypatch.setenv("ANDROID_ADB_SERVER_PORT", str(_free_port()))
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    monkeypatch.setenv("PATH", os.path.dirname(adb_path) + os.pathsep + "/bin")
    yield adb_path
    subprocess.run(
        [adb_path, "kill-server"],
        capture_output=True,
        timeout=30,
        check=False,
    )


def test_real_adb_without_device(real_adb, tmp_path):
    with pytest.raises(AdbError, match="no Android device attached") as e:
        AdbTarget(None, str(tmp_path / "benchmark_model")).check()
    assert "\n" not in str(e.value)
    # A requested serial that is not there: still no device at all.
    with pytest.raises(AdbError, match="no Android device attached"):
        AdbTarget("0123456789ABCDEF", "benchmark_model").check()


def test_adb_missing_from_path(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    target = AdbTarget(None, "benchmark_model")
    with pytest.raises(AdbError, match="adb not found on PATH"):
        target.check()
    with pytest.raises(AdbError, match="adb not found"):
        AdbTarget(None, "benchmark_model", adb=str(tmp_path / "no-adb")).check()


# --- adb: the stand-in ---------------------------------------------------------------------


@pytest.fixture
def fake_adb(tmp_path, monkeypatch):
    """tests/fakes/adb first on PATH, the device's filesystem under tmp_path/device."""
    device = tmp_path / "device"
    (device / "data" / "local" / "tmp").mkdir(parents=True)
    battery = device / "sys" / "class" / "power_supply" / "battery"
    battery.mkdir(parents=True)
    (battery / "current_now").write_text("-412000\n")  # µA, negative while discharging
    (battery / "voltage_now").write_text("3850000\n")  # µV
    monkeypatch.setenv("FAKE_ADB_ROOT", str(device))
    monkeypatch.delenv("FAKE_ADB_DEVICES", raising=False)
    monkeypatch.delenv("ANDROID_SERIAL", raising=False)
    # The venv's python3 next, so the stand-in's `env python3` starts fast (no pyenv shim).
    path = [FAKES, os.path.dirname(sys.executable), os.environ.get("PATH", "")]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    return device


def _script(path, body: str) -> str:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def host_binary(tmp_path) -> str:
    """A 'benchmark_model' for the fake device: execs the host re-implementation."""
    return _script(
        tmp_path / "benchmark_model_host.sh",
        f'PYTHONPATH="{ROOT}" exec "{sys.executable}" -m runtime.benchmark_model_host "$@"\n',
    )


def test_fake_adb_states(fake_adb, monkeypatch):
    assert AdbTarget(None, "bm").check() == "emulator-5554"
    assert AdbTarget("emulator-5554", "bm").check() == "emulator-5554"
    with pytest.raises(AdbError, match="'ZX1G22' is not attached.*emulator-5554 \\(device\\)"):
        AdbTarget("ZX1G22", "bm").check()
    monkeypatch.setenv("FAKE_ADB_DEVICES", "emulator-5554:device,R58M:device")
    with pytest.raises(AdbError, match="several Android devices attached"):
        AdbTarget(None, "bm").check()
    assert AdbTarget("R58M", "bm").check() == "R58M"
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:unauthorized")
    with pytest.raises(AdbError, match="unauthorized"):
        AdbTarget(None, "bm").check()
    monkeypatch.setenv("FAKE_ADB_DEVICES", "R58M:offline")
    with pytest.raises(AdbError, match="offline"):
        AdbTarget("R58M", "bm").check()
    monkeypatch.setenv("FAKE_ADB_DEVICES", "")
    with pytest.raises(AdbError, match="no Android device attached"):
        AdbTarget(None, "bm").check()


def test_benchmark_all_through_fake_adb(fake_adb, host_binary, two_sig_model):
    # Pin like on a phone's big cores, with a mask of the CPUs this host lets us use.
    mask = format(sum(1 << c for c in os.sched_getaffinity(0)), "x")
    target = AdbTarget(None, host_binary, taskset=mask if shutil.which("taskset") else None)
    remote = target.push(two_sig_model)
    assert remote == "/data/local/tmp/flexjax/two.tflite"
    on_device = fake_adb / "data" / "local" / "tmp" / "flexjax"
    assert (on_device / "two.tflite").read_bytes() == open(two_sig_model, "rb").read()
    assert os.access(on_device / "benchmark_model", os.X_OK)

    results = target.benchmark_all(
        two_sig_model, SIGNATURES, num_threads=2, num_runs=6, warmup_runs=2, energy=True
    )
    assert list(results) == list(SIGNATURES)
    for sig, r in results.items():
        assert r.signature == sig and r.num_runs == 6 and r.num_threads == 2
        assert not r.use_gpu
        for v in (r.init_us, r.first_us, r.warmup_avg_us, r.avg_us):
            assert isinstance(v, float) and v > 0
        assert len(r.op_profile) == 1 and r.op_profile[0]["name"] == f"[{sig}]:0"
        e = r.energy
        assert e is not None and e["samples"] >= 1
        assert e["current_a"] == pytest.approx(0.412)
        assert e["voltage_v"] == pytest.approx(3.85)
        assert e["power_w"] == pytest.approx(0.412 * 3.85)
        assert e["duration_s"] > 0
        assert e["energy_per_inference_j"] == pytest.approx(e["power_w"] * e["duration_s"] / 6)
        assert all(math.isfinite(e[k]) for k in ("power_w", "energy_per_inference_active_j"))
        json.dumps(r.to_dict())

    gpu = target.benchmark(
        two_sig_model, "exit_a", use_gpu=True, op_profiling=False, num_runs=3, warmup_runs=1
    )
    assert gpu.use_gpu and gpu.op_profile == [] and gpu.energy is None and gpu.avg_us > 0


def test_benchmark_command_flags():
    target = AdbTarget("S", "bm", device_dir="/data/local/tmp/x/", taskset="f0")
    argv = target.benchmark_command(
        "/data/local/tmp/x/m.tflite", "exit_1", num_threads=1, use_gpu=True, num_runs=9
    )
    assert argv == [
        "taskset",
        "f0",
        "/data/local/tmp/x/benchmark_model",
        "--graph=/data/local/tmp/x/m.tflite",
        "--signature_to_run_for=exit_1",
        "--num_threads=1",
        "--num_runs=9",
        "--warmup_runs=5",
        "--min_secs=0",
        "--warmup_min_secs=0",
        "--use_gpu=true",
        "--gpu_precision_loss_allowed=true",
        "--enable_op_profiling=true",
    ]


def test_benchmark_failures_are_one_line(fake_adb, host_binary, two_sig_model, tmp_path):
    target = AdbTarget(None, host_binary)
    with pytest.raises(AdbError, match=r"signature 'nope'.*exit 1.*not found") as e:
        target.benchmark(two_sig_model, "nope", num_runs=2, warmup_runs=1)
    assert "\n" not in str(e.value)

    crashing = _script(
        tmp_path / "crash.sh", 'echo "STARTING!"\necho "Segmentation fault" >&2\nexit 139\n'
    )
    with pytest.raises(AdbError, match=r"exit 139\): Segmentation fault") as e:
        AdbTarget(None, crashing).benchmark(two_sig_model, "exit_a")
    assert "\n" not in str(e.value)

    silent = _script(tmp_path / "silent.sh", 'echo "STARTING!"\necho "Loaded model"\n')
    with pytest.raises(AdbError, match="no 'Inference timings in us' line.*Loaded model"):
        AdbTarget(None, silent).benchmark(two_sig_model, "exit_a")

    slow = _script(tmp_path / "slow.sh", "sleep 5\n")
    with pytest.raises(AdbError, match="timed out after 0.5 s"):
        AdbTarget(None, slow, timeout_s=0.5).benchmark(two_sig_model, "exit_a")

    with pytest.raises(AdbError, match="benchmark_model binary not found"):
        AdbTarget(None, str(tmp_path / "missing")).push(two_sig_model)
    with pytest.raises(AdbError, match="no such file to push"):
        target.push(str(tmp_path / "missing.tflite"))


def test_energy_unreadable_battery_fails_early(fake_adb, host_binary, two_sig_model):
    os.remove(fake_adb / "sys" / "class" / "power_supply" / "battery" / "current_now")
    with pytest.raises(AdbError, match="current_now") as e:
        AdbTarget(None, host_binary).benchmark(two_sig_model, "exit_a", energy=True)
    assert "\n" not in str(e.value)


def test_runtime_imports_no_jax_or_tensorflow():
    code = (
        "import sys, runtime.adb, runtime.benchmark_model_host; "
        "bad = [m for m in ('jax', 'tensorflow') if m in sys.modules]; "
        "assert not bad, bad"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert radb.BENCHMARK_REMOTE_NAME == "benchmark_model"
