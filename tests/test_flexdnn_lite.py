"""FlexDNN on a frozen pretrained EfficientNet-Lite0 over the real clips (issue 13, item 1)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from flexjax import flexdnn
from flexjax.models import build, init
from flexjax.spec import FINAL, Net
from flexjax.transforms import TransformError

from conftest import ROOT, run_job

SMOKE = os.path.join(ROOT, "configs", "clips_lite0_flexdnn.py") + ":smoke"


def _head(in_shape=(14, 14, 24), features=12, blocks=2, classes=7):
    layers = flexdnn.separable_head(in_shape, classes, features, blocks)
    net = Net(tuple(in_shape), classes, layers, (), "head")
    return net, init(net, jax.random.key(0))


def _logits(net, variables, x):
    return np.asarray(build(net).apply(variables, x, False)[FINAL])


def test_separable_head_is_depthwise_then_pointwise_and_pools_large_maps():
    layers = flexdnn.separable_head((28, 28, 40), 1000, features=64, blocks=2)
    kinds = [(x.kind, x.get("groups", 1), x.get("kernel")) for x in layers]
    assert kinds[0][0] == "max_pool"  # 28 > 14: pooled first
    assert kinds[1:4] == [("conv", 40, (3, 3)), ("conv", 1, (1, 1)), ("relu6", 1, None)]
    assert kinds[4:7] == [("conv", 64, (3, 3)), ("conv", 1, (1, 1)), ("relu6", 1, None)]
    assert [x.kind for x in layers[-2:]] == ["global_pool", "dense"]
    assert flexdnn.separable_head((7, 7, 192), 10)[0].kind == "conv"  # small map: no pool
    with pytest.raises(flexdnn.FlexDNNError):
        flexdnn.separable_head((7, 7, 8), 10, features=0)


def test_prune_separable_follows_the_pruned_channels_through_the_depthwise_conv():
    net, variables = _head()
    sites = flexdnn.separable_sites(net)
    # Both pointwise convs are prunable (the first through the next depthwise conv);
    # depthwise convs and the classifier are not.
    assert sites == ["layer_01", "layer_04"]
    x = np.random.default_rng(0).normal(size=(5, 14, 14, 24)).astype(np.float32)
    # Zero the filters pruning will drop: the pruned net must compute the same logits.
    n = net.layers[1]["features"]
    params = {k: dict(v) for k, v in variables["params"].items()}
    kernel = np.asarray(params["layer_01"]["kernel"]).copy()
    norms = np.abs(kernel).reshape(-1, n).sum(0)
    drop = np.argsort(-norms, kind="stable")[5:]
    kernel[..., drop] = 0.0
    bias = np.asarray(params["layer_01"]["bias"]).copy()
    bias[drop] = 0.0
    params["layer_01"] = {"kernel": kernel, "bias": bias}
    zeroed = {"params": params}
    # The depthwise conv's bias on a dropped channel would leak through relu6: zero it too.
    dw = dict(params["layer_03"])
    dw["bias"] = np.asarray(dw["bias"]).copy()
    dw["bias"][drop] = 0.0
    params["layer_03"] = dw
    pruned_net, pruned = flexdnn.prune_separable(net, zeroed, "layer_01", 5)
    assert pruned_net.layers[1]["features"] == 5
    assert pruned_net.layers[3]["features"] == 5 and pruned_net.layers[3]["groups"] == 5
    assert np.asarray(pruned["params"]["layer_04"]["kernel"]).shape[2] == 5
    np.testing.assert_allclose(
        _logits(pruned_net, pruned, x), _logits(net, zeroed, x), rtol=1e-5, atol=1e-5
    )
    # The last pointwise conv feeds the classifier (through the pool).
    net2, v2 = flexdnn.prune_separable(net, variables, "layer_04", 3)
    assert np.asarray(v2["params"]["layer_07"]["kernel"]).shape == (3, 7)
    assert _logits(net2, v2, x).shape == (5, 7)
    for site, keep in (("layer_00", 3), ("layer_07", 3), ("layer_01", 0), ("layer_01", 99)):
        with pytest.raises(TransformError):
            flexdnn.prune_separable(net, variables, site, keep)


def test_search_on_cached_features_prunes_separable_heads_with_distillation():
    net, variables = _head(features=8)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(64, 14, 14, 24)).astype(np.float32)
    teacher = rng.normal(size=(64, 7)).astype(np.float32)
    y = teacher.argmax(-1).astype(np.int32)
    res = flexdnn.search_exit(
        net, variables, (x, y), (x[:32], y[:32]), delta=1.0, finetune_steps=2, max_trials=4,
        batch_size=16, prune=flexdnn.prune_separable, sites=flexdnn.separable_sites,
        teacher=teacher, distill_weight=0.5, temperature=2.0,
    )  # fmt: skip
    # delta = 1: every step is accepted, so the head shrank.
    assert res.history[1]["accepted"] and res.history[1]["action"].startswith("prune")
    assert res.to_dict()["flops"] < res.history[0]["flops"]


def _job(workdir, *extra):
    return run_job("train.flexdnn", f"--config={SMOKE}", f"--workdir={workdir}", *extra,
                   timeout=1800)  # fmt: skip


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--config.lite.backbone=resnet9", "lite.backbone 'resnet9' is not a pretrained model"),
        ("--config.flexdnn.positions=(8,99)", "candidate position 99 does not exist"),
        ("--config.flexdnn.positions=(3,8)", "candidate position 3 does not exist"),
        ("--config.flexdnn.branchy_positions=(2,)", "branchy_positions: position 2"),
        ("--config.flexdnn.delta=1.5", "flexdnn.delta"),
        ("--config.flexdnn.delta=-0.1", "flexdnn.delta"),
        ("--config.exits.epsilon=1.0", "exits.epsilon"),
        ("--config.exits.epsilon=nan", "exits.epsilon"),
        ("--config.lite.clips.test=()", "lite.clips.test names no clip"),
        ("--config.lite.clips.val=('tree','bikes')", "bikes"),
        ("--config.lite.clips.train=('nope',)", "unknown clip 'nope'"),
        ("--config.lite.head=mlp", "lite.head must be one of"),
        ("--config.lite.every=0", "lite.every"),
        ("--config.lite.stills=-2", "lite.stills"),
        ("--config.lite.calibrate_on=labels", "lite.calibrate_on must be reference or backbone"),
    ],
)
def test_bad_value_is_one_error_line_and_writes_nothing(tmp_path, flag, words):
    workdir = tmp_path / "bad"
    proc = _job(workdir, flag)
    assert proc.returncode == 1, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and words in last, proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr
    assert not workdir.exists()


def test_smoke_searches_on_cached_features_exports_bundles_runtime_bench_agrees(tmp_path):
    workdir = tmp_path / "lite0"
    proc = _job(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    index = json.loads((workdir / "features/index.json").read_text())
    # Candidates and BranchyNet positions cached once; train = 4 frames and their mirrors.
    assert index["positions"] == [8, 9, 13, 14]
    assert index["frames"] == {"train": 8, "val": 4, "test": 4}
    assert [c["position"] for c in report["candidates"]] == [8, 14]
    for c in report["candidates"]:
        kinds = [(x["kind"], x.get("groups", 1)) for x in c["over_parameterized"]["layers"]]
        assert ("conv", 40 if c["position"] == 8 else 112) in kinds  # depthwise on the input
        assert c["flops"] <= c["over_parameterized"]["flops"]
        assert c["search"]["history"][0]["action"] == "start"
    assert report["branchynet"]["positions"] == [9, 13]
    assert report["branchynet"]["steps"] == 10 + 2 * 5
    rows = report["benchmark"]["test"]["systems"]
    assert set(rows) == {"backbone", "flexdnn", "branchynet"}
    assert rows["backbone"]["backbone_agreement"] == 1.0
    for row in rows.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["time_per_frame"]["mean_ms"] > 0
    kept = report["plan"]["kept"]
    assert set(report["R_remeasured_on_test"]["test"]) == set(kept)
    assert (workdir / "report.txt").read_text().startswith("FlexDNN on a frozen efficientnet_lite0")
    # Both bundles verify, and runtime.bench runs the FlexDNN one on the saved test frames.
    for name in ("flexdnn", "branchynet"):
        bundle = workdir / "bundles" / name
        assert json.loads((bundle / "manifest.json").read_text())["calibration"]["cost"] == (
            "measured_ms"
        )
        v = subprocess.run([sys.executable, "-m", "runtime.verify", str(bundle)], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert v.returncode == 0, v.stderr[-2000:]
    out = tmp_path / "bench.json"
    b = subprocess.run(
        [sys.executable, "-m", "runtime.bench", f"--bundle={workdir / 'bundles/flexdnn'}",
         f"--data=npz:{workdir / 'frames_test.npz'}", "--target=local", "--threads=1",
         f"--json={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert b.returncode == 0, b.stderr[-2000:]
    bench = json.loads(out.read_text())
    assert bench["frames"] == 4
    # The report is reproducible from the bundle with the runtime alone (what `make demo`
    # checks): same accuracy and exit rates; every stage's wall and CPU time is reported.
    row = rows["flexdnn"]
    assert bench["accuracy"] == row["accuracy"]
    assert bench["exit_rates"] == pytest.approx(row["exit_rates"], abs=1e-12)
    check = subprocess.run(
        [sys.executable, "-m", "pipelines.bench_check", f"--report={workdir / 'report.json'}",
         f"--bench={out}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr[-2000:]
    assert "runtime.bench reproduces the report's FlexDNN row on 4 test frames" in check.stdout
    assert "headline" in check.stdout
    stages = report["timing"]["stages_s"]
    for stage in ("clips", "feature_cache", "distill_candidates", "search", "measured_costs",
                  "plan", "branchynet", "export", "bench_interleaved"):  # fmt: skip
        assert stages[stage] >= 0 and report["timing"]["stages_cpu_s"][stage] >= 0, stage
    assert sum(stages.values()) <= report["job_seconds"] + 1e-6
    # A rerun resumes: every stage is found, nothing is retrained.
    again = _job(workdir)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "distilling" not in again.stderr and "searching" not in again.stderr


def test_bench_check_refuses_a_bench_run_that_does_not_reproduce_the_report():
    from pipelines import bench_check

    row = {"accuracy": 0.5, "exit_rates": {"exit_7": 0.25, "final": 0.75},
           "ratio_vs_backbone": 0.8}  # fmt: skip
    report = {"benchmark": {"test": {"frames": 4, "systems": {"flexdnn": row}}}}
    bench = {"frames": 4, "accuracy": 0.5, "exit_rates": {"exit_7": 0.25, "final": 0.75},
             "ratio_vs_full": {"early_exit": 0.88}}  # fmt: skip
    got = bench_check.compare(report, bench)
    assert got["ratio_vs_backbone"]["relative_difference"] == pytest.approx(0.1)
    for change, words in [
        ({"frames": 3}, "ran 3 frames, the report 4"),
        ({"accuracy": 0.75}, "accuracy"),
        ({"exit_rates": {"exit_7": 0.5, "final": 0.5}}, "exit rates"),
        ({"exit_rates": {"final": 1.0}}, "exit rates"),
    ]:
        with pytest.raises(bench_check.MismatchError, match=words):
            bench_check.compare(report, {**bench, **change})
    with pytest.raises(bench_check.MismatchError, match="no benchmark row"):
        bench_check.compare({"benchmark": {}}, bench)
    with pytest.raises(bench_check.MismatchError, match="not a runtime.bench report"):
        bench_check.compare(report, {"frames": 4})


def test_bench_check_cli_mismatch_is_one_error_line(tmp_path):
    report = {
        "benchmark": {
            "test": {
                "frames": 4,
                "systems": {
                    "flexdnn": {
                        "accuracy": 0.5,
                        "exit_rates": {"final": 1.0},
                        "ratio_vs_backbone": 1.0,
                    }
                },
            }
        }
    }
    bench = {"frames": 4, "accuracy": 0.25, "exit_rates": {"final": 1.0},
             "ratio_vs_full": {"early_exit": 1.0}}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(report))
    (tmp_path / "b.json").write_text(json.dumps(bench))
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.bench_check", f"--report={tmp_path / 'r.json'}",
         f"--bench={tmp_path / 'b.json'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: runtime.bench does not reproduce")
