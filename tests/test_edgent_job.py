"""The Edgent job end to end on its smoke config: stages, report, resume, refusal."""

from __future__ import annotations

import json
import os

from conftest import ROOT, run_job

SMOKE = os.path.join(ROOT, "configs", "mnist_edgent.py") + ":smoke"
REPORT_KEYS = {"model_config", "train", "bundle", "fit", "emulation", "bench", "seconds", "figures"}


def _job(workdir, *extra):
    return run_job("train.edgent", f"--config={SMOKE}", f"--workdir={workdir}", *extra, timeout=900)


def test_edgent_job_smoke_runs_every_stage_resumes_and_refuses_another_config(tmp_path):
    workdir = tmp_path / "edgent"
    proc = _job(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, stage in enumerate(("train", "export", "sweep", "profile", "fit", "bench"), 1):
        assert f"[{i}/6] {stage} ..." in proc.stdout
    report = json.loads((workdir / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    assert set(report["seconds"]) == {"train", "export", "sweep", "profile", "fit", "bench"}
    assert report["bundle"]["exits"][-1] == "final" and report["bundle"]["options"] > 0
    # The export measured every cut encoding (bytes shrink float32 -> float16 -> int8).
    enc = report["bundle"]["encodings"]
    assert list(enc) == ["float32", "float16", "int8"] and enc["int8"]["cuts"] > 0
    assert enc["int8"]["bytes"][1] * 4 == enc["float32"]["bytes"][1]
    assert set(report["fit"]["kinds"]) == {"device", "edge"} and report["fit"]["paths"]["count"]
    assert report["emulation"]["slowdown"] == 5.0 and report["emulation"]["ratio_median"] > 1
    bench = report["bench"]
    assert len(bench["bandwidth"]) == 2 and len(bench["deadline"]) == 2 * 3
    assert bench["trace"]["frames"] == 20
    assert 0 <= bench["trace"]["deadline_met"] <= 1
    for name in ("edgent_bandwidth.png", "edgent_deadline.png", "edgent_trace.png"):
        assert name in report["figures"] and (workdir / name).stat().st_size > 0
    outputs = ("config.json", "bench/edgent_bench.json", "bench/edgent_bench.md", "fit.json",
               "bundle/manifest.json", "profiles/edge_parts.json", "train/report.json")  # fmt: skip
    for path in outputs:
        assert (workdir / path).exists(), path
    assert "latency_models" in json.loads((workdir / "bundle/manifest.json").read_text())

    # Finished: a second run does no work and says how to start over.
    stages = (workdir / "stages.json").read_text()
    again = _job(workdir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "is finished" in again.stdout and "to start over" in again.stdout
    assert "..." not in again.stdout  # no stage ran
    assert (workdir / "stages.json").read_text() == stages

    # Interrupted after the fit: re-running keeps the first five stages, redoes the bench.
    kept = json.loads(stages)
    del kept["bench"]
    (workdir / "stages.json").write_text(json.dumps(kept))
    (workdir / "report.json").unlink()
    resumed = _job(workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "[5/6] fit: finished before, kept" in resumed.stdout
    assert "[1/6] train ..." not in resumed.stdout and "[6/6] bench ..." in resumed.stdout
    assert (
        json.loads((workdir / "report.json").read_text())["seconds"]["train"]
        == json.loads(stages)["train"]
    )

    # Another config in the same workdir: one clear line, nothing changed.
    other = _job(workdir, "--config.bench.frames=9")
    assert other.returncode == 1
    lines = other.stderr.strip().splitlines()
    assert lines[-1].startswith("error:") and "another config" in lines[-1]
    assert "bench.frames" in lines[-1] and "--workdir" in lines[-1]
    assert json.loads((workdir / "config.json").read_text())["bench"]["frames"] == 8


def test_edgent_job_bad_config_value_is_one_line_and_writes_nothing(tmp_path):
    workdir = tmp_path / "bad"
    for flag, words in (
        ("--config.sweep.size=huge", "sweep.size must be one of full, smoke"),
        ("--config.device.target=phone", "device.target: unknown target 'phone'"),
        ("--config.model_config=configs/nope.py", "configs/nope.py does not exist"),
    ):
        proc = _job(workdir, flag)
        assert proc.returncode == 1, proc.stdout
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error:") and words in last, proc.stderr[-1000:]
    assert not workdir.exists()


def test_edgent_job_refuses_a_non_empty_workdir_of_something_else(tmp_path):
    (tmp_path / "bundle").mkdir()  # e.g. what the old nine-command chain left in runs/edgent
    proc = _job(tmp_path)
    assert proc.returncode == 1
    assert "holds no Edgent job" in proc.stderr.strip().splitlines()[-1]
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
