"""runtime/: bundle verification, the early-exit executor, the bench CLI, the JAX/TF boundary."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_adb import fake_adb, host_binary  # noqa: F401  (fixtures)

from flexjax import exits as exits_lib
from runtime import Bundle, BundleError, EarlyExitExecutor, criteria
from runtime.bench import expected_time
from runtime.names import MANIFEST, MANIFEST_DIGEST

from conftest import ROOT, run_job


@pytest.fixture
def bundle_copy(smoke_bundle, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(smoke_bundle, dst)
    return str(dst)


def _rewrite_manifest(path, edit):
    import hashlib

    m = json.load(open(os.path.join(path, MANIFEST)))
    edit(m)
    raw = json.dumps(m).encode()
    open(os.path.join(path, MANIFEST), "wb").write(raw)
    open(os.path.join(path, MANIFEST_DIGEST), "w").write(hashlib.sha256(raw).hexdigest() + "\n")


def _flip(path, offset):
    data = bytearray(open(path, "rb").read())
    data[offset % len(data)] ^= 0x10
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: os.truncate(os.path.join(b, "model.tflite"), 1000), "truncated"),
        (lambda b: _flip(os.path.join(b, "model.tflite"), 5000), "sha256"),
        (lambda b: _flip(os.path.join(b, "model.tflite"), 5), "sha256"),
        (lambda b: _flip(os.path.join(b, MANIFEST), 200), "checksum"),
        (lambda b: os.remove(os.path.join(b, MANIFEST_DIGEST)), "manifest.sha256"),
        (lambda b: os.remove(os.path.join(b, "model.tflite")), "missing"),
        (lambda b: _rewrite_manifest(b, lambda m: m.update(schema_version=99)), "schema version"),
        (lambda b: _rewrite_manifest(b, lambda m: m.pop("exits")), "lacks exits"),
        (lambda b: _rewrite_manifest(b, lambda m: m.update(exits=["a"])), "malformed"),
        (lambda b: _rewrite_manifest(b, lambda m: m.update(exits=[])), "malformed"),
        (lambda b: _rewrite_manifest(b, lambda m: m["files"].clear()), "not among its files"),
        (
            lambda b: _rewrite_manifest(
                b, lambda m: m["calibration"].update(thresholds={"exit_2": "high"})
            ),
            "malformed",
        ),
        (lambda b: open(os.path.join(b, MANIFEST), "w").write("{"), "checksum"),
        (
            lambda b: _rewrite_manifest(
                b, lambda m: m["signatures"]["full"].update(input_shape=[1, 32, 32, 3])
            ),
            "wrong model file",
        ),
    ],
)
def test_corrupt_bundle_is_one_clear_error(bundle_copy, damage, message):
    damage(bundle_copy)
    with pytest.raises(BundleError, match=message) as e:
        Bundle.from_dir(bundle_copy)
    assert "\n" not in str(e.value)


def test_model_file_of_another_bundle_is_refused(bundle_copy):
    # A consistent manifest whose model is replaced by another valid .tflite.
    import jax

    from export import convert
    from flexjax import models

    net = models.get_model("lenet_branchy", input_shape=(20, 20, 1), num_classes=10, width=0.25)
    buf = convert.to_tflite(
        net, models.init(net, jax.random.PRNGKey(0)), convert.plan_signatures(net)
    )
    path = os.path.join(bundle_copy, "model.tflite")
    open(path, "wb").write(buf)

    def fix_files(m):
        import hashlib

        m["files"]["model.tflite"] = {"sha256": hashlib.sha256(buf).hexdigest(), "bytes": len(buf)}

    _rewrite_manifest(bundle_copy, fix_files)
    with pytest.raises(BundleError, match="wrong model file"):
        Bundle.from_dir(bundle_copy)


def test_missing_bundle_dir():
    with pytest.raises(BundleError, match="does not exist"):
        Bundle.from_dir("/nonexistent/bundle")


def _test_frames(bundle):
    from runtime import data

    return data.load("mnist5k:test", bundle.manifest)


def test_executor_single_and_batched_agree_and_match_offline_rule(smoke_bundle):
    b = Bundle.from_dir(smoke_bundle)
    ex = EarlyExitExecutor(b)
    frames = _test_frames(b)
    # A threshold that splits the frames, so both exits are used.
    logits = ex.all_logits(frames.x)
    h = float(np.median(-criteria.score(logits["exit_2"], "entropy")))
    ex = EarlyExitExecutor(b, thresholds={"exit_2": h})
    results = [ex.run(x) for x in frames.x]
    where = np.array([r.index for r in results])
    pred = np.array([r.prediction for r in results])
    assert 0 < (where == 0).sum() < len(where)
    blogits, bwhere = ex.run_batch(frames.x)
    np.testing.assert_array_equal(bwhere, where)
    np.testing.assert_array_equal(blogits.argmax(-1), pred)
    # The same rule flexjax.exits calibrates with, applied offline to the same logits.
    sim = exits_lib.simulate(logits, frames.y, {"exit_2": h}, "entropy", names=("exit_2", "final"))
    np.testing.assert_array_equal(sim.exit_index, where)
    assert sim.accuracy == pytest.approx(float((pred == frames.y).mean()))
    # Results carry the logits of the exit taken.
    r = results[int(np.argmax(where == 0))]
    assert r.exit == "exit_2" and r.logits.shape == (1, 10)


def test_never_exit_segments_only_and_full_agree_on_final_logits(smoke_bundle):
    b = Bundle.from_dir(smoke_bundle)
    never = EarlyExitExecutor.never_exit(b)
    seg = EarlyExitExecutor(b, heads=False, model=never.model)
    for x in _test_frames(b).x[:20]:
        a, s = never.run(x), seg.run(x)
        assert a.exit == s.exit == "final"
        np.testing.assert_allclose(a.logits, never.run_full(x), atol=1e-5)
        np.testing.assert_array_equal(a.logits, s.logits)


def test_executor_bad_input(smoke_bundle):
    b = Bundle.from_dir(smoke_bundle)
    with pytest.raises(BundleError, match="unknown exits"):
        EarlyExitExecutor(b, thresholds={"exit_9": 1.0})
    ex = EarlyExitExecutor(b, num_threads=2)
    with pytest.raises(ValueError, match="does not fit"):
        ex.run(np.zeros((32, 32, 3), np.float32))
    with pytest.raises(ValueError, match="do not fit"):
        ex.run_batch(np.zeros((4, 28, 28), np.float32))
    with pytest.raises(ValueError, match="num_threads"):
        EarlyExitExecutor(b, num_threads=0)


def test_scores_match_flexjax_calibration_rule():
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(500, 10)) * rng.uniform(0.1, 20, (500, 1))).astype(np.float32)
    for c in criteria.CRITERIA:
        np.testing.assert_array_equal(criteria.score(logits, c), exits_lib.score(logits, c))
        one = np.array([criteria.score_one(row, c) for row in logits])
        np.testing.assert_allclose(one, exits_lib.score(logits, c), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="unknown exit criterion"):
        criteria.score(logits, "margin")


def test_expected_time_combines_signature_times_and_rates():
    exits = [
        {"name": "exit_1", "segment": "s1", "head": "e1"},
        {"name": "exit_2", "segment": "s2", "head": "e2"},
        {"name": "final", "segment": "sf", "head": None},
    ]
    t = {"s1": 1.0, "e1": 0.5, "s2": 2.0, "e2": 0.5, "sf": 4.0}
    rates = {"exit_1": 0.5, "exit_2": 0.25, "final": 0.25}
    assert expected_time(exits, rates, t) == pytest.approx(0.5 * 1.5 + 0.25 * 4.0 + 0.25 * 8.0)


def test_bench_local_writes_report_with_full_baseline(smoke_bundle, tmp_path):
    out = tmp_path / "bench.json"
    proc = run_job(
        "runtime.bench", f"--bundle={smoke_bundle}", "--data=mnist5k:test", "--limit=60",
        "--rounds=1", "--threads=2", f"--json={out}", "--two-call",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.load(open(out))
    assert rep["frames"] == 60 and 0.0 <= rep["accuracy"] <= 1.0
    # --two-call: the stage signatures' one call per stage vs segment + head, same run.
    sc = rep["stage_calls"]
    assert sc["calls_per_stage"] == {
        "early_exit": {"exit_2": 1, "final": 1},
        "early_exit_two_call": {"exit_2": 2, "final": 1},
    }
    assert rep["time_per_frame"]["early_exit_two_call"]["frames"] == 60
    assert "two-call" in proc.stdout
    assert sum(rep["exit_histogram"].values()) == 60
    for mode in ("early_exit", "full", "segments_only", "never_exit"):
        s = rep["time_per_frame"][mode]
        assert 0 < s["p50_ms"] <= s["p95_ms"] and s["frames"] == 60
    assert rep["ratio_vs_full"]["full"] == 1.0
    assert rep["calibration"]["source"] == "val"
    assert "early_exit" in proc.stdout and "x full" in proc.stdout


def test_bench_video_uses_video_calibration_and_reports_difficulty(smoke_bundle, tmp_path):
    out = tmp_path / "v.json"
    proc = run_job(
        "runtime.bench", f"--bundle={smoke_bundle}", "--data=video:mnist5k", "--rounds=1",
        f"--json={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.load(open(out))
    assert rep["calibration"]["source"] == "video_val"
    assert len(rep["by_difficulty"]) == 5 and rep["frames"] == 100


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bundle=/nonexistent", "--data=mnist5k:test"], "does not exist"),
        (["--data=mnist5k:nope"], "unknown split"),
        (["--data=mnist5k"], "DATASET:SPLIT"),
        (["--data=npz:/nonexistent.npz"], "nonexistent"),
        (["--data=mnist5k:test", "--target=phone"], "unknown --target"),
        (["--data=mnist5k:test", "--target=adb"], "--benchmark-binary"),
        (["--data=mnist5k:test", "--epsilon=0.3"], "no calibration"),
        (["--data=mnist5k:test", "--threads=0"], "--threads"),
    ],
)
def test_bench_bad_input_is_one_line(smoke_bundle, args, message):
    if not any(a.startswith("--bundle") for a in args):
        args = [f"--bundle={smoke_bundle}", *args]
    proc = run_job("runtime.bench", *args)
    assert proc.returncode in (1, 2)  # 2: refused while parsing (runtime.args)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and message in last, last


def test_bench_adb_through_stand_in_device(smoke_bundle, fake_adb, host_binary, tmp_path):  # noqa: F811
    out = tmp_path / "adb.json"
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.bench", f"--bundle={smoke_bundle}",
         "--target=adb:emulator-5554", f"--benchmark-binary={host_binary}", "--num-runs=5",
         "--warmup-runs=1", "--energy", f"--json={out}"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    rep = json.load(open(out))
    assert rep["serial"] == "emulator-5554"
    assert set(rep["signature_ms"]) == {
        "segment_2", "exit_2", "stage_2", "segment_final", "full"
    }  # fmt: skip
    assert all(v > 0 for v in rep["signature_ms"].values())
    assert rep["exit_rates_from"].startswith("bundle calibration")
    ms = rep["signature_ms"]
    # The executor runs exit_2's stage signature: one call instead of segment + head.
    assert rep["time_per_frame"]["never_exit"]["mean_ms"] == pytest.approx(
        ms["stage_2"] + ms["segment_final"]
    )
    assert rep["energy_per_frame_j"]["full"] > 0
    # The model really went to the device directory.
    assert os.path.exists(fake_adb / "data/local/tmp/flexjax/model.tflite")


_BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('jax', 'jaxlib', 'tensorflow', 'flax', 'optax'):
            raise ImportError(f'{name} is blocked: runtime must not import it')
        return None
sys.meta_path.insert(0, _Block())
"""


def test_runtime_runs_where_jax_and_tensorflow_cannot_be_imported(smoke_bundle, tmp_path):
    out = tmp_path / "r.json"
    code = _BLOCK + (
        "import runtime.bench as b\n"
        f"rc = b.main(['--bundle={smoke_bundle}', '--data=mnist5k:test', '--limit=30', "
        f"'--rounds=1', '--json={out}'])\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('jax', 'tensorflow')]\n"
        "assert rc == 0 and not bad, (rc, bad)\n"
        "try:\n    import jax\nexcept ImportError:\n    print('blocked ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blocked ok" in proc.stdout and json.load(open(out))["frames"] == 30


def test_verify_cli_verifies_and_summarises(smoke_bundle, bundle_copy):
    proc = run_job("runtime.verify", smoke_bundle)
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout and "segment_2" in proc.stdout and "GPU" in proc.stdout
    _flip(os.path.join(bundle_copy, "model.tflite"), 777)
    proc = run_job("runtime.verify", bundle_copy)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error:")
    assert len(proc.stderr.strip().splitlines()) == 1
