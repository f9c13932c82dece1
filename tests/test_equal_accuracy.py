"""runtime.equal_accuracy: Pareto fronts and readings by hand, a real LiteRT run, bad input."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flexjax import exits as exits_lib
from runtime import equal_accuracy as ea
from runtime.bundle import Bundle
from runtime.executor import EarlyExitExecutor

from conftest import ROOT, run_job

# ---------------------------------------------------------------------------
# Curves (every number worked out by hand).
# ---------------------------------------------------------------------------

# (ms, accuracy): (3, .65) is slower and worse than (2, .7); (2, .68) ties (2, .7) in time.
POINTS = [(1.0, 0.5), (2.0, 0.7), (1.5, 0.6), (3.0, 0.65), (2.0, 0.68), (4.0, 0.9)]
FRONT = [(1.0, 0.5), (1.5, 0.6), (2.0, 0.7), (4.0, 0.9)]


def test_pareto_drops_dominated_points_fastest_first():
    assert ea.pareto(POINTS) == [0, 2, 1, 5]
    assert ea.pareto([(1.0, 0.8)]) == [0]
    # Equal accuracy at a higher time is not an improvement; equal points keep the first.
    assert ea.pareto([(1.0, 0.8), (2.0, 0.8), (1.0, 0.8)]) == [0]
    # Non-monotone input (accuracy falls as time rises): only the fastest survives.
    assert ea.pareto([(3.0, 0.1), (2.0, 0.5), (1.0, 0.9)]) == [2]


@pytest.mark.parametrize(
    "target,ms,how",
    [
        (0.8, 3.0, "interpolated"),  # halfway between (2, .7) and (4, .9)
        (0.65, 1.75, "interpolated"),  # halfway between (1.5, .6) and (2, .7)
        (0.75, 2.5, "interpolated"),  # a quarter of the way from (2, .7) to (4, .9)
        (0.6, 1.5, "point"),
        (0.9, 4.0, "point"),
        (0.4, 1.0, "at fastest"),  # the fastest point is already better: an upper bound
        (0.5, 1.0, "point"),
    ],
)
def test_time_at_reads_the_front(target, ms, how):
    r = ea.time_at(FRONT, target)
    assert r["reached"] and r["how"] == how
    assert r["ms"] == pytest.approx(ms)


def test_time_at_never_extrapolates():
    r = ea.time_at(FRONT, 0.95)
    assert r == {"ms": None, "reached": False, "how": "not reached"}
    assert not ea.time_at([(1.0, 0.5)], 0.51)["reached"]


@pytest.mark.parametrize(
    "points",
    [[], [(float("nan"), 0.5)], [(-1.0, 0.5)], [(float("inf"), 0.5)], [(1.0, 1.5)],
     [(1.0, float("nan"))], [(1.0, -0.1)]],
)  # fmt: skip
def test_curves_refuse_bad_values(points):
    with pytest.raises(ValueError):
        ea.pareto(points)
    with pytest.raises(ValueError):
        ea.time_at(points, 0.5)


def test_time_at_needs_a_front_and_a_finite_target():
    with pytest.raises(ValueError, match="Pareto front"):
        ea.time_at([(2.0, 0.7), (1.0, 0.5)], 0.6)  # not sorted by time
    with pytest.raises(ValueError, match="Pareto front"):
        ea.time_at([(1.0, 0.7), (2.0, 0.6)], 0.65)  # accuracy falls
    with pytest.raises(ValueError, match="finite"):
        ea.time_at(FRONT, float("nan"))


def test_ratio_text_marks_bounds_and_misses():
    def r(ms, how="interpolated"):
        return {"ms": ms, "reached": ms is not None, "how": "not reached" if ms is None else how}

    assert ea._ratio(r(2.0), r(4.0)) == "0.50x"
    assert ea._ratio(r(2.0), r(4.0, "at fastest")) == ">=0.50x"  # 4.0 is an upper bound
    assert ea._ratio(r(2.0, "at fastest"), r(4.0)) == "<=0.50x"
    assert ea._ratio(r(2.0, "at fastest"), r(4.0, "at fastest")).startswith("n/a")
    assert ea._ratio(r(None), r(4.0), "a", "b") == "n/a (only b reached)"
    assert ea._ratio(r(None), r(None)) == "n/a (neither reached)"


def test_flexdnn_targets_verdicts_respect_bounds():
    from pipelines.flexdnn_bench import _meets

    def r(ms, how="interpolated"):
        return {"ms": ms, "reached": ms is not None, "how": "not reached" if ms is None else how}

    assert _meets(r(1.0), r(2.0), 0.6) == (0.5, True)
    assert _meets(r(1.5), r(2.0), 0.6) == (0.75, False)
    assert _meets(r(1.0), r(2.0, "at fastest"), 0.6) == (0.5, None)  # 2.0 may be less
    assert _meets(r(1.5), r(2.0, "at fastest"), 0.6) == (0.75, False)  # a lower bound > 0.6
    assert _meets(r(1.0, "at fastest"), r(2.0), 0.6) == (0.5, True)  # an upper bound <= 0.6
    assert _meets(r(1.5, "at fastest"), r(2.0), 0.6) == (0.75, None)
    assert _meets(r(None), r(2.0), 0.6) == (None, False)
    assert _meets(r(1.0), r(None), 0.6) == (None, True)


def test_parse_points():
    assert ea.parse_points("calibrated,uniform:6") == [("calibrated", 0), ("uniform", 6)]
    assert ea.parse_points("uniform:1") == [("uniform", 1)]
    for bad in ("", "uniform", "uniform:0", "uniform:nan", "uniform:-2", "calibrated:3",
                "bogus", "uniform:2,uniform:3", f"uniform:{ea.MAX_UNIFORM + 1}"):  # fmt: skip
        with pytest.raises(ValueError, match="--points"):
            ea.parse_points(bad)


# ---------------------------------------------------------------------------
# A real run: LiteRT on the smoke bundle (conftest), every point timed.
# ---------------------------------------------------------------------------

FRAMES = 40


@pytest.fixture(scope="module")
def run(smoke_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("ea")
    js, png = str(out / "ea.json"), str(out / "ea.png")
    proc = run_job(
        "runtime.equal_accuracy", f"--bundle=ee={smoke_bundle}", f"--full=backbone={smoke_bundle}",
        "--data=mnist5k:test", f"--limit={FRAMES}", "--rounds=2", "--points=calibrated,uniform:3",
        "--reference=backbone", f"--json={js}", f"--plot={png}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(js) as f:
        return json.load(f), png, proc


def test_every_point_is_timed_and_runs_its_thresholds(run, smoke_bundle):
    rep, png, proc = run
    assert rep["frames"] == FRAMES and rep["rounds"] == 2
    ee, bb = rep["systems"]["ee"], rep["systems"]["backbone"]
    assert bb["kind"] == "full" and len(bb["points"]) == 1 and ee["kind"] == "early_exit"
    assert rep["timed_points"] == len(ee["points"]) + 1
    families = {p["family"] for p in ee["points"]}
    assert families == {"calibrated", "uniform"}
    bundle = Bundle.from_dir(smoke_bundle)
    stored = {r["epsilon"] for r in bundle.manifest["calibrations"] if r["source"] == "val"}
    seen = {p["epsilon"] for p in ee["points"] if p["family"] == "calibrated"}
    seen |= {float(a[4:]) for p in ee["points"] for a in p["also"] if a.startswith("eps=")}
    assert seen == stored  # every stored epsilon, duplicates merged into one timed point
    assert any(p["label"] == "never" for p in ee["points"])
    # What each point ran is what its thresholds give offline on the same frames.
    ex = EarlyExitExecutor(bundle)
    from runtime import data as data_lib

    frames = data_lib.load("mnist5k:test", bundle.manifest, FRAMES)
    logits = ex.all_logits(frames.x)
    for p in ee["points"] + bb["points"]:
        t = p["time_per_frame"]
        assert t["frames"] == 2 * FRAMES
        assert 0 < t["min_of_rounds_ms"] == p["ms"] <= t["mean_ms"]
        assert 0 <= p["accuracy"]["labels"] <= 1
        if p["family"] == "full":
            continue
        sim = exits_lib.simulate(logits, frames.y, p["thresholds"], bundle.criterion,
                                 names=ex.exit_names)  # fmt: skip
        assert p["exit_rates"] == pytest.approx(sim.rates, abs=1e-12)
        assert p["accuracy"]["labels"] == pytest.approx(sim.accuracy, abs=1e-12)
    never = next(p for p in ee["points"] if p["label"] == "never")
    assert never["exit_rates"][ex.exit_names[-1]] == 1.0
    assert never["accuracy"]["backbone"] >= 0.95  # the segments compose to the full model
    assert bb["points"][0]["accuracy"]["backbone"] == 1.0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert "agreement with backbone's top-1" in proc.stdout


def test_headline_is_read_off_the_fronts(run):
    rep, _, _ = run
    assert set(rep["headline"]) == {"labels", "backbone"}
    for ref, h in rep["headline"].items():
        base = rep["systems"]["backbone"]["points"][0]
        assert h["baseline_accuracy"] == base["accuracy"][ref]
        assert [t["drop"] for t in h["targets"]] == [0.005, 0.01, 0.02]
        for name, sys_ in rep["systems"].items():
            front = rep["curves"][ref][name]
            xy = [(p["ms"], p["accuracy"][ref]) for p in sys_["points"]]
            assert [(c["ms"], c["accuracy"]) for c in front] == [xy[i] for i in ea.pareto(xy)]
            for t in h["targets"]:
                got = t["systems"][name]
                want = ea.time_at([(c["ms"], c["accuracy"]) for c in front], t["accuracy"])
                assert got["reached"] == want["reached"] and got["ms"] == want["ms"]
                if got["reached"]:
                    assert got["vs_baseline"] == pytest.approx(got["ms"] / h["baseline_ms"])
        assert rep["headline"]["backbone"]["baseline_accuracy"] == 1.0


_BLOCK = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('jax', 'jaxlib', 'tensorflow', 'flax', 'optax', 'matplotlib'):
            raise ImportError(f'{name} is blocked')
        return None
sys.meta_path.insert(0, _Block())
"""


def test_runs_without_jax_tensorflow_or_matplotlib(smoke_bundle, tmp_path):
    """The runtime side: numpy + LiteRT; --plot is refused in one line without matplotlib."""
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    code = _BLOCK + (
        "import runtime.equal_accuracy as e\n"
        f"args = ['--bundle=ee={smoke_bundle}', '--full=b={smoke_bundle}', "
        f"'--data=mnist5k:test', '--limit=12', '--rounds=1', '--points=uniform:2']\n"
        f"assert e.main(args + ['--json={out}']) == 0\n"
        f"assert e.main(args + ['--plot={png}']) == 1\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.load(open(out))["frames"] == 12 and not png.exists()
    assert "error: --plot needs matplotlib" in proc.stderr


# ---------------------------------------------------------------------------
# Bad input: one error line, non-zero exit, nothing written.
# ---------------------------------------------------------------------------


def _main(argv):
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = ea.main(argv)
        except SystemExit as e:
            code = e.code
    return code, err.getvalue()


def _one_error_line(code, err, match):
    lines = [line for line in err.splitlines() if line.strip() and "INFO:" not in line]
    assert code, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]


@pytest.mark.parametrize(
    "args,match",
    [
        (["--bundle=ee=/nonexistent/bundle"], "does not exist"),
        (["--bundle=/nonexistent/bundle"], "NAME=DIR"),
        (["--rounds=nan"], "--rounds"),
        (["--rounds=-1"], "--rounds"),
        (["--limit=0"], "--limit"),
        (["--drops=0.01,nan"], "--drops"),
        (["--drops=-0.01"], "--drops"),
        (["--drops=inf"], "--drops"),
    ],
)
def test_bad_arguments(args, match, tmp_path):
    out = str(tmp_path / "o.json")
    code, err = _main(["--data=mnist5k:test", f"--json={out}", *args])
    _one_error_line(code, err, match)
    assert not os.path.exists(out)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--points=uniform:0"], "uniform:N"),
        (["--points=bogus"], "unknown family"),
        (["--baseline=nope"], "'nope' is not a system"),
        (["--reference=ee"], "single-point"),
        (["--full=ee={b}"], "distinct"),
        ([], None),  # no --full: no baseline
        (["--data=npz:{empty}"], "--data=npz:"),
        (["--data=npz:{nan}"], "non-finite"),
        (["--data=mnist5k:nosuchsplit"], "unknown split"),
    ],
)
def test_bad_input_is_one_error_line_and_nothing_written(args, match, smoke_bundle, tmp_path):
    empty, nan = str(tmp_path / "empty.npz"), str(tmp_path / "nan.npz")
    np.savez(empty, x=np.zeros((0, 28, 28, 1), np.float32), y=np.zeros(0, np.int64))
    x = np.zeros((4, 28, 28, 1), np.float32)
    x[1, 3, 3, 0] = np.nan
    np.savez(nan, x=x, y=np.zeros(4, np.int64))
    out = str(tmp_path / "o.json")
    base = [f"--bundle=ee={smoke_bundle}", f"--json={out}", "--limit=8", "--rounds=1"]
    if args:
        base.append(f"--full=backbone={smoke_bundle}")
    if not any(a.startswith("--data") for a in args):
        base.append("--data=mnist5k:test")
    argv = base + [a.format(b=smoke_bundle, empty=empty, nan=nan) for a in args]
    code, err = _main(argv)
    _one_error_line(code, err, match or "no baseline")
    assert not os.path.exists(out)
