"""flexjax.checkpoint: damaged steps (kill -9, lost files) are skipped, then removed."""

from __future__ import annotations

import json
import os
import shutil
import sys
import types

import numpy as np
import pytest

from flexjax import checkpoint, models

from conftest import SMOKE, run_job

NET = models.get_model("lenet_branchy", input_shape=(28, 28, 1), num_classes=10, width=0.25)


def _state(step: int) -> dict:
    return {
        "step": np.int32(step),
        "params": {"w": np.full((3, 3), step, np.float32), "b": np.arange(5, dtype=np.float32)},
    }


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory) -> str:
    """A workdir whose checkpoints hold steps 1 and 2 of a tiny state (real orbax)."""
    workdir = str(tmp_path_factory.mktemp("ckpt") / "w")
    with checkpoint.manager(os.path.join(workdir, "checkpoints")) as mgr:
        checkpoint.save(mgr, 1, NET, _state(1))
        checkpoint.save(mgr, 2, NET, _state(2))
        mgr.wait_until_finished()
    return workdir


def _files(step_dir: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(r, f), step_dir) for r, _, fs in os.walk(step_dir) for f in fs
    )


def _damage(path: str, how: str) -> None:
    if how == "remove":
        os.remove(path)
    elif how == "truncate":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # empty
        os.truncate(path, 0)


def _check_resumes_from_a_step_that_restores(workdir: str, case: str) -> None:
    ckpt = os.path.join(workdir, "checkpoints")
    step = checkpoint.latest_step(ckpt)  # readers skip, never remove
    assert step in (1, 2), case
    net, variables = checkpoint.load(workdir)
    assert net == NET, case
    np.testing.assert_array_equal(variables["params"]["w"], _state(step)["params"]["w"], case)
    good, removed = checkpoint.repair(ckpt)
    assert good == step, case
    assert set(removed) == ({2} if step == 1 else set()), case
    assert sorted(os.listdir(ckpt)) == [str(s) for s in range(1, step + 1)], case


@pytest.mark.parametrize("how", ["remove", "truncate", "empty"])
def test_each_file_of_the_newest_step_damaged_resumes_from_a_step_that_restores(
    two_steps, tmp_path, how
):
    files = _files(os.path.join(two_steps, "checkpoints", "2"))
    assert len(files) >= 10
    fell_back = []
    for name in files:
        workdir = str(tmp_path / f"{how}-{len(fell_back)}-{name.replace('/', '_')}")
        shutil.copytree(two_steps, workdir)
        _damage(os.path.join(workdir, "checkpoints", "2", name), how)
        _check_resumes_from_a_step_that_restores(workdir, f"{how} {name}")
        if checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 1:
            fell_back.append(name)
        shutil.rmtree(workdir)
    # the files that hold the net, the state's metadata and its data are needed
    assert "net/metadata" in fell_back and "state/_METADATA" in fell_back, fell_back


@pytest.mark.parametrize("item", ["net", "state", "state/d"])
def test_partly_deleted_newest_step_is_removed_and_the_previous_one_used(two_steps, tmp_path, item):
    workdir = str(tmp_path / "w")
    shutil.copytree(two_steps, workdir)
    shutil.rmtree(os.path.join(workdir, "checkpoints", "2", item))  # orbax's delete, killed
    _check_resumes_from_a_step_that_restores(workdir, item)
    assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 1


def test_orbax_tmp_dir_of_a_killed_save_is_ignored_then_removed_by_repair(two_steps, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(two_steps, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    tmp = os.path.join(ckpt, "3.orbax-checkpoint-tmp-1700000000000000")
    shutil.copytree(os.path.join(ckpt, "2"), tmp)
    os.remove(os.path.join(tmp, "state", "_METADATA"))
    assert checkpoint.latest_step(ckpt) == 2
    assert os.path.isdir(tmp)  # a reader leaves it: it may be a live trainer's save
    assert checkpoint.repair(ckpt) == (2, {})
    assert sorted(os.listdir(ckpt)) == ["1", "2"]


def test_every_step_damaged_means_no_checkpoint_with_a_truthful_message(two_steps, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(two_steps, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    for step in ("1", "2"):
        os.truncate(os.path.join(ckpt, step, "state", "_METADATA"), 0)
    assert checkpoint.latest_step(ckpt) is None
    assert checkpoint.load_saved(workdir) is None
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        checkpoint.load(workdir)
    good, removed = checkpoint.repair(ckpt)
    assert good is None and sorted(removed) == [1, 2]
    assert os.listdir(ckpt) == []


def test_save_model_replaces_an_existing_model_atomically(tmp_path):
    d = str(tmp_path / "m")
    variables = {"params": _state(1)["params"]}
    checkpoint.save_model(d, NET, variables, json_files={"a.json": {"v": 1}})
    variables2 = {"params": _state(7)["params"]}
    checkpoint.save_model(d, NET, variables2, json_files={"a.json": {"v": 2}})
    net, got = checkpoint.load(d)
    np.testing.assert_array_equal(got["params"]["w"], variables2["params"]["w"])
    assert json.load(open(os.path.join(d, "a.json"))) == {"v": 2}
    assert sorted(os.listdir(tmp_path)) == ["m"]


# End to end: the train.multi_exit job restarted on a damaged workdir.


def _copy(smoke_workdir, tmp_path) -> tuple[str, list[int]]:
    workdir = str(tmp_path / "w")
    shutil.copytree(smoke_workdir, workdir)
    ckpt = os.path.join(workdir, "checkpoints")
    return workdir, sorted(int(d) for d in os.listdir(ckpt) if d.isdigit())


def _rerun(workdir):
    # one more epoch, so the rerun trains from wherever it resumes
    return run_job("train.multi_exit", f"--config={SMOKE}", f"--workdir={workdir}",
                   "--config.train.num_epochs=3")  # fmt: skip


def test_job_restarted_on_a_torn_newest_step_resumes_from_the_previous_one(smoke_workdir, tmp_path):
    workdir, steps = _copy(smoke_workdir, tmp_path)
    assert len(steps) == 2
    ckpt = os.path.join(workdir, "checkpoints")
    os.truncate(os.path.join(ckpt, str(steps[-1]), "state", "manifest.ocdbt"), 10)
    shutil.copytree(
        os.path.join(ckpt, str(steps[0])), os.path.join(ckpt, "999.orbax-checkpoint-tmp-1")
    )
    proc = _rerun(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"removed damaged checkpoint {ckpt}/{steps[-1]}" in proc.stderr
    assert f"resuming from step {steps[0]}" in proc.stderr
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["train"]["resumed_from"] == steps[0]
    assert not any("tmp" in d for d in os.listdir(ckpt))


def test_job_restarted_with_no_step_left_starts_fresh_and_says_so(smoke_workdir, tmp_path):
    workdir, steps = _copy(smoke_workdir, tmp_path)
    ckpt = os.path.join(workdir, "checkpoints")
    for s in steps:
        shutil.rmtree(os.path.join(ckpt, str(s), "net"))
    proc = _rerun(workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "no complete checkpoint is left: training starts from step 0" in proc.stderr
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["train"]["resumed_from"] == 0


def test_export_of_a_workdir_with_a_torn_newest_step_uses_the_previous_one(smoke_workdir, tmp_path):
    workdir, steps = _copy(smoke_workdir, tmp_path)
    ckpt = os.path.join(workdir, "checkpoints")
    os.remove(os.path.join(ckpt, str(steps[-1]), "net", "metadata"))
    net, _ = checkpoint.load(workdir)
    assert net == checkpoint.saved_net(ckpt)
    assert sorted(os.listdir(ckpt)) == [str(s) for s in steps]  # a reader removes nothing


def test_job_resumed_with_another_optimizer_is_one_line_and_keeps_checkpoints(
    smoke_workdir, tmp_path
):
    workdir, _ = _copy(smoke_workdir, tmp_path)
    ckpt = os.path.join(workdir, "checkpoints")
    before = {
        os.path.join(r, f): open(os.path.join(r, f), "rb").read()
        for r, _, fs in os.walk(ckpt)
        for f in fs
    }
    proc = run_job("train.multi_exit", f"--config={SMOKE}", f"--workdir={workdir}",
                   "--config.train.num_epochs=3", "--config.train.optimizer=sgd")  # fmt: skip
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: checkpoint ") and "does not fit this config" in last
    after = {
        os.path.join(r, f): open(os.path.join(r, f), "rb").read()
        for r, _, fs in os.walk(ckpt)
        for f in fs
    }
    assert after == before  # a mismatch is not damage: nothing is removed


def test_late_callbacks_of_an_abandoned_restore_are_dropped_and_nothing_else(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(u.exc_value))
    checkpoint._quiet_abandoned_reads()
    checkpoint._quiet_abandoned_reads()  # installed once, not stacked
    for exc in (RuntimeError("Event loop is closed"), RuntimeError("other"), ValueError("x")):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc))
    assert [str(e) for e in seen] == ["other", "x"]
