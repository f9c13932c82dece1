"""The catalog job end to end on the smoke config, and AMS / sharing on what it wrote."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from test_adb import fake_adb, host_binary  # noqa: F401  (fixtures)

from conftest import ROOT, run_job

CONFIG = os.path.join(ROOT, "configs", "mnist_catalog.py")


@pytest.fixture(scope="session")
def catalog_dir(tmp_path_factory) -> str:
    """The smoke catalog, built once per test session even under pytest-xdist.

    xdist workers share the base temp directory's parent; the first worker to
    take the lock builds the catalog, the others wait and reuse it.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    workdir = root / "mcdnn_smoke_catalog"
    with open(root / "mcdnn_smoke_catalog.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not (workdir / "DONE").exists():
                run_job(
                    "train.catalog", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
                    check=True,
                )  # fmt: skip
                (workdir / "DONE").write_text("ok\n")
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(workdir)


def _catalog(d: str) -> dict:
    with open(os.path.join(d, "catalog.json")) as f:
        return json.load(f)


def test_catalog_records_measured_costs_for_every_variant(catalog_dir):
    cat = _catalog(catalog_dir)
    assert set(cat["tasks"]) == {"digit", "parity"}
    e = cat["energy_model"]
    for task, t in cat["tasks"].items():
        names = [v["name"] for v in t["variants"]]
        assert names[0] == "original" and len(names) == len(set(names))
        orig = t["variants"][0]
        for v in t["variants"]:
            model = os.path.join(catalog_dir, v["bundle"], "model.tflite")
            assert v["bytes"] == os.path.getsize(model)
            assert 0.0 <= v["accuracy"] <= 1.0 and v["latency_ms"] > 0 and v["load_ms"] > 0
            assert v["latency_ratio"] == pytest.approx(orig["latency_ms"] / v["latency_ms"])
            run = e["cpu_power_w"] * v["latency_ms"] / 1e3 + e["dram_j_per_byte"] * v["bytes"]
            assert v["energy_run_j"] == pytest.approx(run)
            load = e["storage_j_per_byte"] * v["bytes"] + e["cpu_power_w"] * v["load_ms"] / 1e3
            assert v["energy_load_j"] == pytest.approx(load)
            assert v["flops"] > 0 and v["params_count"] >= v["nonzero_params"] > 0
        assert os.path.isfile(os.path.join(catalog_dir, f"pareto_{task}.png"))
        assert set(t["targets"]) == {"max_drop_points", "memory", "latency"}
    digit = {v["name"]: v for v in cat["tasks"]["digit"]["variants"]}
    assert digit["width_1_2"]["flops"] < digit["original"]["flops"] / 3
    assert digit["lowrank_r1_4"]["technique"] == "low_rank"
    pruned = digit["prune_90"]
    assert pruned["nonzero_params"] < 0.2 * pruned["params_count"]  # masks survive fine-tuning
    assert pruned["bytes"] < 0.5 * digit["original"]["bytes"]  # stored sparse


def test_shared_stem_runs_once_and_matches_each_tasks_original(catalog_dir):
    from runtime.lite import Model
    from runtime.mcdnn import SharedStem

    cat = _catalog(catalog_dir)
    shared = SharedStem(os.path.join(catalog_dir, "shared"))
    data = np.load(os.path.join(catalog_dir, "eval.npz"))
    x = data["x"][:40]
    preds = shared.run_batch(x)
    for task in ("digit", "parity"):
        path = os.path.join(catalog_dir, "bundles", task, "original", "model.tflite")
        sig = Model(path).signature("full")
        full = [int(np.argmax(sig(np.ascontiguousarray(xi[None])))) for xi in x]
        assert (preds[task] == np.asarray(full)).mean() >= 0.95
    sh = cat["shared"]
    assert sh["bytes"]["shared"] < sh["bytes"]["separate"] and sh["speedup"] > 0
    assert cat["specialize"]["detected"] is True
    r = cat["specialize"]["retrain_seconds"]
    assert min(r["full_retrain_s"], r["retarget_s"], r["retarget_preforward_s"]) > 0
    assert 0 <= cat["specialize"]["stream"]["fallback_rate"] <= 1


def test_ams_cli_on_the_catalog_executes_sampled_requests_for_real(catalog_dir, tmp_path):
    out = str(tmp_path / "ams.json")
    proc = run_job(
        "runtime.ams",
        f"--bundle={catalog_dir}",
        f"--trace={os.path.join(catalog_dir, 'trace.json')}",
        f"--json={out}",
        "--policies=mcdnn,pace,best_model",
        "--execute=15",
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(open(out).read())
    for name in ("mcdnn", "pace", "best_model"):
        ex = rep["executed"][name]
        if rep["policies"][name]["served"]:
            assert ex["executed"] == 15 and ex["measured_latency_ms_mean"] > 0
            assert 0.0 <= ex["measured_accuracy"] <= 1.0 and ex["loads"] >= 1
    assert os.path.isfile(os.path.join(catalog_dir, "fig11.png"))
    with open(os.path.join(catalog_dir, "ams.json")) as f:  # the job's own Fig. 11 run
        job = json.load(f)
    assert set(job["policies"]) == {"mcdnn", "pace", "best_model", "original"}
    assert (
        job["offline_optimum"]["expected_correct"]
        >= max(p["expected_correct"] for p in job["policies"].values()) - 1e-6
    )


def test_runtime_side_of_mcdnn_runs_without_jax_or_tensorflow(catalog_dir):
    code = (
        "import importlib.abc, sys\n"
        "class B(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] in ('jax', 'jaxlib', 'tensorflow', 'flax', 'optax'):\n"
        "            raise ImportError(name + ' is blocked')\n"
        "sys.meta_path.insert(0, B())\n"
        "from runtime import ams, traces, skew, mcdnn\n"
        f"sys.exit(ams.main(['--bundle={catalog_dir}', "
        f"'--trace={catalog_dir}/trace.json', '--execute=3', '--policies=pace']))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_bad_catalog_config_is_one_error_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "cat"
    proc = run_job(
        "train.catalog", f"--config={CONFIG}:smoke", f"--workdir={workdir}",
        "--config.specialize.variant=nope",
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: specialize.variant 'nope'")
    assert not workdir.exists()


@pytest.mark.usefixtures("fake_adb")
def test_energy_is_measured_through_adb_when_a_phone_is_configured(
    catalog_dir,
    host_binary,  # noqa: F811
):
    """The adb path of `measure_costs`, on the stand-in adb + host benchmark_model."""
    import importlib.util

    from flexjax import training
    from pipelines import mcdnn

    spec = importlib.util.spec_from_file_location("mnist_catalog", CONFIG)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config("smoke")
    config.energy.adb_binary = host_binary
    c = mcdnn.validate(config)
    cat = _catalog(catalog_dir)
    variants = {"digit": [dict(v) for v in cat["tasks"]["digit"]["variants"][:2]]}
    info = mcdnn.measure_costs(c, variants, training.load_data(c.base), catalog_dir)
    assert info["adb_serial"] == "emulator-5554"
    for v in variants["digit"]:
        assert v["energy_source"] == "adb emulator-5554" and v["phone_latency_ms"] > 0
        # 412 mA x 3.85 V from the fake battery, times the phone's mean latency
        assert v["energy_run_j"] == pytest.approx(0.412 * 3.85 * v["phone_latency_ms"] / 1e3)
