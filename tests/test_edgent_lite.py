"""The Edgent job on a multi-exit EfficientNet-Lite0 (distilled exits, real clips): smoke."""

from __future__ import annotations

import json
import os

import pytest

from conftest import ROOT, run_job

SMOKE = os.path.join(ROOT, "configs", "clips_lite0_edgent.py") + ":smoke"


def _job(workdir, *extra):
    args = (f"--config={SMOKE}", f"--workdir={workdir}", *extra)
    return run_job("train.edgent", *args, timeout=1500)


def test_edgent_lite0_smoke_distills_exits_cuts_at_mbconv_and_runs_every_stage(tmp_path):
    workdir = tmp_path / "lite0"
    proc = _job(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "report.json").read_text())
    train = json.loads((workdir / "train/report.json").read_text())
    # Two distilled exits at the configured MBConv positions, each scored two ways.
    assert [(e["name"], e["position"]) for e in train["exits"]] == [("exit_8", 8), ("exit_14", 14)]
    for e in train["exits"]:
        assert 0.0 <= e["accuracy"] <= 1.0 and 0.0 <= e["backbone_agreement"] <= 1.0
    assert train["accuracy"]["test"]["backbone"]["final"] == 1.0
    assert "not searched" in train["heads"]
    index = json.loads((workdir / "features/index.json").read_text())
    # The exits' positions, and the pooled features the smoke's "mimic" heads also learn.
    assert index["positions"] == [8, 14, 23]
    # Distillation data: 4 frames x 2 tiles x (as is, mirrored) + 4 still crops; val and
    # test untouched.
    assert index["frames"] == {"train": 20, "val": 4, "test": 4}
    assert train["distillation_frames"] == {
        "frames": 20,
        "per_clip": {"carphone": 16, "stills": 4},
        "flip": True,
        "balanced": True,
        "stills": 4,
    }
    # Partition points: only block boundaries (after a block), each smaller than the input.
    manifest = json.loads((workdir / "bundle/manifest.json").read_text())
    kinds = [layer["kind"] for layer in manifest["net"]["layers"]]
    cuts = manifest["partitions"]["cut_points"]
    assert cuts[0] == 0 and cuts[-1] == len(kinds)
    assert all(kinds[p - 1] == "mbconv" for p in cuts[1:-1]) and len(cuts) > 3
    acts = report["bundle"]["activation_bytes"]
    assert all(acts[str(p)] < acts["0"] for p in cuts[1:])
    # The regressions know lite0's kinds and compared the block as a unit and as parts.
    for target in ("device", "edge"):
        assert {"conv", "dwconv", "mbconv", "dense"} <= set(report["fit"]["kinds"][target])
    assert report["fit"]["mbconv"]["kept"] in ("unit", "parts")
    assert report["fit"]["paths"]["count"] > 0
    assert report["emulation"]["slowdown"] == 8.0
    assert len(report["bench"]["bandwidth"]) == 2 and report["bench"]["trace"]["frames"] == 8
    assert (workdir / "frames_test.npz").exists()


@pytest.mark.parametrize(
    "flag, words",
    [
        ("--config.distill.backbone=resnet", "distill.backbone 'resnet' is not a pretrained model"),
        ("--config.distill.positions=(8,99)", "position 99 does not exist"),
        ("--config.distill.head=mlp", "distill.head must be one of pool_dense, conv_pool_dense"),
        ("--config.distill.clips.test=()", "distill.clips.test names no clip"),
        ("--config.distill.clips.val=('tree','nope')", "unknown clip 'nope'"),
        ("--config.distill.image_size=8", "distill.image_size"),
        ("--config.distill.train_fps=-0.5", "distill.train_fps must be -1"),
        ("--config.distill.train_tiles=(1.5,0.5,0.5)", "distill.train_tiles"),
        ("--config.distill.train_tiles=(0.5,0.5)", "distill.train_tiles must be (scale, y, x)"),
        ("--config.distill.train_tiles=(0.0,0.5,0.5)", "ClipConfig.tiles entry"),
        ("--config.distill.stills=-1", "distill.stills"),
    ],
)
def test_edgent_lite0_bad_distill_value_is_one_line_and_writes_nothing(tmp_path, flag, words):
    workdir = tmp_path / "bad"
    proc = _job(workdir, flag)
    assert proc.returncode == 1, proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and words in last, proc.stderr[-1000:]
    assert not workdir.exists()
