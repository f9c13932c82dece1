"""MCDNN on the lite catalog (train.lite_mcdnn): the smoke job end to end, and its refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from flexjax import config as config_lib
from pipelines import lite_mcdnn
from runtime import ams
from runtime import traces as traces_lib
from runtime.mcdnn import SharedStem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/clips_lite_mcdnn.py"


def _cli(*args, timeout=1800):
    return subprocess.run(
        [sys.executable, "-m", "train.lite_mcdnn", *args], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT},
    )  # fmt: skip


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[str, dict]:
    """The smoke job, run once by the real command line; ``(workdir, report)``."""
    workdir = str(tmp_path_factory.mktemp("lite_mcdnn"))
    proc = _cli(f"--config={CONFIG}:smoke", f"--workdir={workdir}", "--threads=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "== AMS" in proc.stdout
    with open(os.path.join(workdir, lite_mcdnn.REPORT)) as f:
        return workdir, json.load(f)


def _smoke_config():
    return config_lib.validate(config_lib.load(f"{CONFIG}:smoke"), config_lib.lite_mcdnn_defaults)


def test_smoke_shared_stem_runs_one_head_per_task_and_matches_the_separate_models(smoke):
    workdir, rep = smoke
    sh = rep["sharing"]
    assert list(sh["accuracy"]) == ["imagenet", "coarse", "dog"]
    shared = SharedStem(os.path.join(workdir, "shared"))
    x = np.zeros(shared.stem.input_shape, np.float32)
    out = shared.run(x)
    assert {t: o.shape[-1] for t, o in out.items()} == {"imagenet": 1000, "coarse": 4, "dog": 2}
    for a in sh["accuracy"].values():
        assert 0.0 <= a["shared"] <= 1.0 and a["shared_vs_separate_top1"] >= 0.75
    assert sh["bytes"]["shared"] < sh["bytes"]["separate"]
    assert sh["time_per_frame_ms"]["shared"] > 0 and sh["time_per_frame_ms"]["separate"] > 0


def test_smoke_ams_catalog_accuracy_is_the_catalog_top1_mapped_to_each_task(smoke):
    workdir, rep = smoke
    with open(os.path.join(workdir, "ams_catalog.json")) as f:
        acat = json.load(f)
    with open(os.path.join(rep["catalog_dir"], "catalog.json")) as f:
        rows = {r["name"]: r for r in json.load(f)["tasks"]["imagenet"]["variants"]}
    c = _smoke_config()
    cat = config_lib.validate(config_lib.load(c.catalog_config), config_lib.lite_catalog_defaults)
    from pipelines import lite_catalog

    labels = lite_catalog.load_frames(cat, [64], False)["labels"]
    groups = lite_mcdnn.check_tasks(c.tasks)
    for task, entry in acat["tasks"].items():
        lut = lite_mcdnn.task_lut(groups.get(task))
        for v in entry["variants"]:
            top1 = np.asarray(rows[v["name"]]["top1"])
            assert v["accuracy"] == pytest.approx(np.mean(lut[top1] == lut[labels]))
            if task == "imagenet":
                assert v["accuracy"] == pytest.approx(rows[v["name"]]["accuracy"])


def test_smoke_specialization_and_ams_report(smoke):
    workdir, rep = smoke
    sp = rep["specialization"]
    if sp["detected"]:
        ss = sp["specialize_seconds"]
        assert ss["total_s"] == pytest.approx(ss["forward_seen_frames_s"] + ss["fit_s"])
        assert 0.0 <= sp["stream"]["fallback_rate"] <= 1.0
        assert sp["target_met"] == (ss["total_s"] <= 1.0)
    s = rep["ams"]["summary"]
    assert set(s["budgets"]) == {"0.3x", "0x"}
    assert s["default_policy"] in ("mcdnn", "pace")
    for row in s["budgets"]["0x"]["seeds"]:  # nothing can be paid for: nothing is served
        assert all(row[p]["served"] == 0 for p in ams.POLICIES)
    for name in ("ams.json", "fig11.png", "fig11_budgets.png", "trace.json"):
        assert os.path.isfile(os.path.join(workdir, name)), name
    # The Pareto plots per task, one per app AMS schedules.
    assert rep["ams"]["pareto"] == {t: f"pareto_{t}.png" for t in rep["ams"]["apps"]}
    for name in rep["ams"]["pareto"].values():
        assert os.path.getsize(os.path.join(workdir, name)) > 1000, name


def _day_cases():
    """Budgets that are valid but starve the day, and ones that must be refused."""
    ok = [("0", 20.0, 1000.0), ("0x", 20.0, 1000.0), ("1e-9", 20.0, 1000.0),
          ("0.3x", 0.0, 1000.0), ("0.3x", 20.0, 1e-3), ("0.3x", 1e-6, 1000.0)]  # fmt: skip
    bad = [("nan", 20.0, 1000.0), ("-1", 20.0, 1000.0), ("inf", 20.0, 1000.0),
           ("nanx", 20.0, 1000.0), ("-0.1x", 20.0, 1000.0), ("1e400", 20.0, 1000.0),
           ("0.3x", math.nan, 1000.0), ("0.3x", -1.0, 1000.0), ("0.3x", math.inf, 1000.0),
           ("0.3x", 20.0, 0.0), ("0.3x", 20.0, -5.0), ("0.3x", 20.0, math.nan),
           ("0.3x", 20.0, math.inf), ("abc", 20.0, 1000.0)]  # fmt: skip
    return ok, bad


def test_ams_on_the_lite_catalog_starved_budgets_are_not_served_with_a_reason(smoke):
    workdir, _ = smoke
    cat = ams.load_catalog(os.path.join(workdir, "ams_catalog.json"), cloud=False)
    tr = traces_lib.make_day(list(cat.apps), hours=0.1, mean_rate=0.2, bursts=1, seed=3)
    ok, bad = _day_cases()
    for energy, mem, lat in ok:
        b = ams.resolve_budgets(cat, tr, energy=energy, memory_mb=mem, money=0.0, latency_ms=lat)
        rep, decisions = ams.run(cat, tr, b, list(ams.POLICIES))
        for ds in decisions.values():
            assert all(d.served or d.reason for d in ds)
        if energy in ("0", "0x") or mem == 0.0:
            assert all(not d.served for ds in decisions.values() for d in ds)
    for energy, mem, lat in bad:
        with pytest.raises(ams.AmsError, match="budgets"):
            ams.resolve_budgets(cat, tr, energy=energy, memory_mb=mem, money=0.0, latency_ms=lat)


def _bad_id_cases():
    return [
        ({"name": "t", "groups": {"g": [1000]}}, "out of range"),
        ({"name": "t", "groups": {"g": [-1]}}, "out of range"),
        ({"name": "t", "groups": {"g": ["990-1005"]}}, "out of range"),
        ({"name": "t", "groups": {"g": [10**20]}}, "out of range"),
        ({"name": "t", "groups": {"g": ["5-2"]}}, "empty"),
        ({"name": "t", "groups": {"g": ["abc"]}}, "not a class id"),
        ({"name": "t", "groups": {"g": [True]}}, "not an int"),
        ({"name": "t", "groups": {"g": [1.5]}}, "not an int"),
        ({"name": "t", "groups": {"g": []}}, "no class ids"),
        ({"name": "t", "groups": {}}, "non-empty"),
        ({"name": "t", "groups": {"a": [1, 2], "b": ["2-3"]}}, "in groups"),
        ({"name": "t", "groups": {"other": [1]}}, "implicit"),
        ({"name": "t", "groups": {"g": ["0-999"]}}, "every class"),
        ({"name": "imagenet", "groups": {"g": [1]}}, "identifier other than"),
        ({"name": "9x", "groups": {"g": [1]}}, "identifier"),
        ({"name": "t"}, "must be"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_id_cases())))
def test_bad_task_groups_are_one_clear_error(case):
    task, match = _bad_id_cases()[case]
    with pytest.raises(ValueError, match=match) as e:
        lite_mcdnn.check_tasks([task])
    assert "\n" not in str(e.value)


def test_task_lut_maps_groups_and_other():
    groups = lite_mcdnn.check_tasks([{"name": "t", "groups": {"a": ["0-2", 7], "b": "5,6"}}])["t"]
    lut = lite_mcdnn.task_lut(groups)
    assert lut[[0, 1, 2, 7, 5, 6, 3, 999]].tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    assert lite_mcdnn.task_classes(groups) == ["a", "b", "other"]


@pytest.mark.parametrize(
    "override",
    [
        "c.tasks = [{'name': 'coarse', 'groups': {'animal': ['0-1200']}}]",
        "c.ams.energy = ('nanx',)",  # the other bad budgets: in-process, below
        "c.specialize.resolution = 96",
        "c.specialize.min_other = -1",
        "c.specialize.max_wait = float('nan')",
    ],
)
def test_cli_bad_config_is_one_error_line_and_writes_nothing(override, tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text(
        "from configs.clips_lite_mcdnn import get_config as _g\n"
        f"def get_config(arg=None):\n    c = _g('smoke')\n    {override}\n    return c\n"
    )
    workdir = tmp_path / "w"
    proc = _cli(f"--config={cfg}", f"--workdir={workdir}", timeout=300)
    noise = ("W0000", "I0000", "WARNING")  # absl / TF start-up lines, not the job's
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith(noise)]
    assert proc.returncode != 0
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr[-2000:]
    assert not workdir.exists() or not os.listdir(workdir)


@pytest.mark.parametrize("energy", ["nanx", "-0.5x", "inf", "-1", "1e400x", "x", "0.3y"])
def test_bad_energy_budgets_are_refused_by_validate_before_any_work(energy):
    """What the CLI case above shows for one budget (one `error:` line, nothing written) holds
    for every bad budget: the job calls `validate` first and prints its ValueError."""
    c = _smoke_config()
    c.ams.energy = (energy,)
    with pytest.raises(ValueError, match="ams.energy") as e:
        lite_mcdnn.validate(c)
    assert "\n" not in str(e.value)


def _report(wins: int, of: int = 5) -> list[dict]:
    """Synthetic `ams.run` reports: pace ahead of mcdnn in `wins` of `of` seeds."""
    runs = []
    for seed in range(of):
        pace = 10.0 if seed < wins else 5.0
        pol = {n: {"served": 4, "served_fraction": 0.4, "expected_correct": 6.0}
               for n in ("best_model", "original")}  # fmt: skip
        pol["mcdnn"] = {"served": 8, "served_fraction": 0.8, "expected_correct": 8.0}
        pol["pace"] = {"served": 9, "served_fraction": 0.9, "expected_correct": pace}
        rep = {"requests": 10, "policies": pol,
               "offline_optimum": {"expected_correct": 10.0, "served": 10}}  # fmt: skip
        runs.append({"energy": "0.3x", "seed": seed, "report": rep})
    return runs


@pytest.mark.parametrize("wins,default", [(5, "pace"), (4, "pace"), (3, "mcdnn"), (0, "mcdnn")])
def test_our_policy_is_the_default_only_if_it_beats_algorithm_1_in_4_of_5_seeds(wins, default):
    s = lite_mcdnn.summarize_ams(_report(wins), "0.3x")
    assert s["default_policy"] == default
    b = s["budgets"]["0.3x"]
    assert b["pace_beats_mcdnn"] == wins
    t = b["targets"]["mcdnn"]  # 8 / 4 = 2x Best-Model, regret 20%: missed
    assert t["served_x_best_model_min"] == pytest.approx(2.0) and not t["met"]
    assert t["regret_fraction_max"] == pytest.approx(0.2)


def test_specialized_head_rows_keep_the_whole_clip_and_fill_other_from_the_pool():
    clip_y = np.array([0, 0, 1, 2, 0, 2])  # classes 0, 1; "other" = 2
    pool_y = np.array([2, 2, 2, 2, 2, 2, 2, 2, 1, 2])
    rows = lite_mcdnn.training_rows(clip_y, pool_y, 2, 0.5, seed=0)
    assert set(range(6)) <= set(rows.tolist()) and 6 + 8 in rows  # the clip, pool in-class
    y = np.concatenate([clip_y, pool_y])[rows]
    assert (y == 2).sum() == (y != 2).sum() == 5  # "other" is half the rows
    assert len(set(rows.tolist())) == len(rows)


def test_specialization_waits_for_the_clips_own_negatives():
    # classes (5, 6); the general model says something else at frames 4, 9, 10, 15
    top1 = np.array([5, 6, 5, 5, 1, 5, 5, 6, 5, 2, 3, 5, 5, 5, 5, 9, 5, 5])
    cls = [5, 6]
    point = lite_mcdnn.specialization_point
    assert point(top1, cls, first=3, min_other=0, max_wait=0) == 3  # the previous rule
    assert point(top1, cls, first=3, min_other=1, max_wait=0) == 4
    assert point(top1, cls, first=3, min_other=3, max_wait=0) == 10
    assert point(top1, cls, first=3, min_other=3, max_wait=4) == 7  # waits at most 4 frames
    assert point(top1, cls, first=3, min_other=99, max_wait=0) == len(top1) - 2  # never: end
    assert point(top1, cls, first=12, min_other=2, max_wait=0) == 12  # already seen enough
    rows = lite_mcdnn.seen_rows(top1, cls, ready=10, window=3)
    assert rows.tolist() == [4, 8, 9, 10]  # the last 3 frames + every earlier "other" one
    assert lite_mcdnn.seen_rows(top1, cls, ready=3, window=60).tolist() == [0, 1, 2, 3]


def test_drift_stream_spot_checks_drop_a_stale_specialization_and_respecialize():
    # The general model: class 5 for 20 frames, then the scene changes to class 7.
    gen = np.array([5] * 20 + [7] * 30)
    stale = lambda i: 5  # noqa: E731  (the specialized head keeps saying 5)
    calls = []

    def respecialize(i, classes):
        calls.append((i, classes))
        return lambda j: 7

    d = lite_mcdnn.drift_stream(gen, 10, stale, respecialize, (4, 1, 0.75), 2, 2, 2)
    assert len(d["pred"]) == 40
    # spot checks at frames 21 and 23 (every 2nd specialized frame after the change) disagree:
    # from frame 24 the general model serves and feeds a fresh detector (window 4), which
    # fires on class 7 at frame 27; the new head serves from frame 28.
    assert [e["frame"] for e in d["events"]] == [23, 27] and calls == [(27, (7,))]
    assert d["pred"][: 24 - 10].tolist() == [5] * 14  # stale answers until the drift is seen
    assert (d["pred"][24 - 10 :] == 7).all()
    # runs: 14 + 22 frames on the cheap head; on the general model 7 spot checks (frames 11,
    # 13, ..., 23) + 4 detector frames + 11 spot checks (every 2nd of the 22 frames after)
    assert d["cheap_runs"] == 14 + 22 and d["general_runs"] == 7 + 4 + 11
    # without spot checks the stale head serves the whole rest of the clip
    none = lite_mcdnn.drift_stream(gen, 10, stale, respecialize, (4, 1, 0.75), 0, 2, 2)
    assert none["events"] == [] and (none["pred"] == 5).all() and none["general_runs"] == 0
