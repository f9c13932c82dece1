"""AMS: traces, MCDNN's Algorithm 1, our pacing policy, static baselines, the offline optimum.

Policies are unit-tested on a small hand-written catalog (the costs are data,
so no model is needed); `tests/test_catalog.py` runs AMS on a real catalog.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os

import numpy as np
import pytest

from runtime import ams, traces

from conftest import run_job

# name, accuracy, energy per run (J), latency (ms), bytes
_VARIANTS = [
    ("original", 0.97, 1.0e-3, 1.0, 1_700_000),
    ("lowrank", 0.965, 5e-4, 0.5, 800_000),
    ("width_1_2", 0.96, 3e-4, 0.3, 300_000),
    ("width_1_4", 0.94, 1.5e-4, 0.15, 120_000),
    ("tiny", 0.90, 8e-5, 0.08, 60_000),
]
APPS = ("digit", "parity", "ge5")


def write_catalog(directory: str, *, cloud: bool = True, cloud_energy_j: float = 4e-4) -> str:
    tasks = {}
    for k, app in enumerate(APPS):
        tasks[app] = {
            "original": "original",
            "variants": [
                {
                    "name": n, "accuracy": a - 0.01 * k, "energy_run_j": e, "latency_ms": lat,
                    "bytes": b, "load_ms": 2.0 * b / 1e6, "energy_load_j": 4 * e,
                    "flops": int(2e9 * e), "bundle": f"bundles/{app}/{n}",
                }
                for n, a, e, lat, b in _VARIANTS
            ],
        }  # fmt: skip
    cat = {
        "tasks": tasks,
        "cloud": {
            "enabled": cloud, "energy_per_request_j": cloud_energy_j, "rtt_ms": 60.0,
            "speedup": 4.0, "money_per_request": 1e-4,
        },
    }  # fmt: skip
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "catalog.json"), "w") as f:
        json.dump(cat, f)
    return directory


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> ams.Catalog:
    return ams.load_catalog(write_catalog(str(tmp_path_factory.mktemp("cat"))))


@pytest.fixture(scope="module")
def device_catalog(tmp_path_factory) -> ams.Catalog:
    return ams.load_catalog(write_catalog(str(tmp_path_factory.mktemp("dev"))), cloud=False)


@pytest.fixture(scope="module")
def day() -> traces.Trace:
    return traces.make_day(list(APPS), hours=2.0, mean_rate=1.0, bursts=4, seed=3)


def _budgets(day, **kw) -> ams.Budgets:
    base = dict(energy_j=0.5, memory_bytes=2_500_000, money=0.0, latency_ms=100.0, day_s=day.day_s)
    return ams.Budgets(**{**base, **kw})


# -- traces -------------------------------------------------------------------------------


def test_day_trace_is_reproducible_sorted_and_has_changing_rates_and_bursts():
    a = traces.make_day(list(APPS), hours=10, seed=0)
    b = traces.make_day(list(APPS), hours=10, seed=0)
    np.testing.assert_array_equal(a.t, b.t)
    assert np.all(np.diff(a.t) >= 0) and a.t.min() >= 0 and a.t.max() <= a.day_s
    assert 0.5 * 36000 < len(a) < 2.0 * 36000  # mean rate 1/s
    per_min = np.histogram(a.t, bins=600, range=(0, a.day_s))[0]
    assert per_min.max() > 4 * np.median(per_min)  # bursts
    hours = np.stack(
        [np.histogram(a.t[a.app == i], bins=10, range=(0, a.day_s))[0] for i in range(3)]
    )
    mix = hours / np.maximum(hours.sum(0), 1)
    assert (mix.max(1) - mix.min(1)).min() > 0.15  # the app mix changes over the day


@pytest.mark.parametrize(
    "d, match",
    [
        ({"day_s": 10, "t": [1.0, -2.0], "app": ["digit", "digit"]}, "negative time"),
        ({"day_s": 10, "t": [1.0], "app": ["cat"]}, r"unknown app\(s\) \['cat'\]"),
        ({"day_s": 10, "t": [1.0, 2.0], "app": ["digit"]}, "2 times but 1 app names"),
        ({"day_s": 10, "t": [11.0], "app": ["digit"]}, "past the end of the day"),
        ({"t": [1.0], "app": ["digit"]}, "missing field"),
        ({"day_s": 10, "t": ["x"], "app": ["digit"]}, "must be numbers"),
    ],
)
def test_bad_traces_are_clear_errors(d, match):
    with pytest.raises(traces.TraceError, match=match):
        traces.from_dict(d, APPS)


def test_trace_round_trips_through_json(tmp_path, day):
    path = str(tmp_path / "t.json")
    traces.save(day, path)
    back = traces.load(path, APPS)
    np.testing.assert_allclose(back.t, day.t, atol=1e-4)
    np.testing.assert_array_equal(back.app, day.app)


# -- Algorithm 1 ----------------------------------------------------------------------------


def test_mcdnn_per_request_budget_matches_the_formula_by_hand(day):
    b = _budgets(day)
    t = 3600.0
    # decayed counts set so that rates are exactly f_digit = 0.2, f_parity = 0.1 per s at t
    state = ams.State(
        t=t,
        energy_left=0.4,
        money_left=0.0,
        cache=(ams.CacheEntry("parity", "tiny", 60_000, t),),
        decayed={"digit": (0.2 * ams.RATE_TAU_S, t), "parity": (0.1 * ams.RATE_TAU_S, t)},
        first_seen={"digit": 600.0},
        load_energy={"digit": 0.002},
    )
    e_n, c_n = ams.mcdnn_budgets(state, "digit", b)
    T = day.day_s - t
    reload = 0.002 * T / (t - 600.0)
    assert e_n == pytest.approx((0.4 - reload) * 0.2 / (T * (0.2**2 + 0.1**2)))
    assert c_n == 0.0


def test_mcdnn_misses_load_and_evict_lru_and_hits_reuse_the_cache(catalog, day):
    b = _budgets(day, energy_j=100.0, memory_bytes=1_800_000)
    pol = ams.mcdnn_policy(catalog, b)
    s = pol.init()
    d1, s = pol.step(s, ams.Request(1.0, "digit"))
    assert d1.served and d1.loaded == ("original",)  # plenty of energy: most accurate
    d2, s = pol.step(s, ams.Request(2.0, "digit"))
    assert d2.served and d2.variant == "original" and not d2.loaded
    d3, s = pol.step(s, ams.Request(3.0, "parity"))  # 1.7 MB + 1.7 MB > 1.8 MB: evict digit
    assert d3.served and ("digit", "original") in d3.evicted
    assert [e.app for e in s.cache] == ["parity"]
    assert s.energy_left == pytest.approx(100.0 - sum(d.energy_j for d in (d1, d2, d3)))


def test_mcdnn_shrinks_the_variant_as_the_budget_tightens(catalog, day):
    b = _budgets(day, energy_j=0.05)
    ds = ams.simulate(ams.mcdnn_policy(catalog, b), day)
    served = [d for d in ds if d.served]
    assert served and sum(d.energy_j for d in ds) <= 0.05 + 1e-9
    late = {d.variant for d in served if d.t > day.day_s / 2}
    assert "original" not in late  # once frequencies are known the per-request budget rules it out
    assert any(d.loaded for d in served[1:])  # background re-picks load other variants


def test_policies_are_pure_functions(catalog, day):
    for name in ams.POLICIES:
        pol = ams.make_policy(name, catalog, _budgets(day))
        s0 = pol.init()
        snapshot = dataclasses.replace(s0)
        d1, s1 = pol.step(s0, ams.Request(5.0, "digit"))
        d2, s2 = pol.step(s0, ams.Request(5.0, "digit"))
        assert s0 == snapshot and d1 == d2 and s1 == s2


# -- infeasible budgets, bad input ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ams.POLICIES))
def test_infeasible_budgets_are_not_served_decisions_with_a_reason(device_catalog, day, name):
    for kw, why in (
        ({"latency_ms": 0.01}, "latency"),
        ({"memory_bytes": 1000}, "cache"),
        ({"energy_j": 0.0}, ""),
    ):
        pol = ams.make_policy(name, device_catalog, _budgets(day, **kw))
        ds = ams.simulate(pol, day)  # never raises mid-day
        assert not any(d.served for d in ds)
        assert all(d.reason for d in ds)
        if why:
            assert why in ds[0].reason, ds[0].reason


def test_unknown_app_request_is_refused_not_a_crash(catalog, day):
    pol = ams.mcdnn_policy(catalog, _budgets(day))
    d, s = pol.step(pol.init(), ams.Request(1.0, "faces"))
    assert not d.served and "unknown app" in d.reason


def test_bad_budgets_and_catalog_are_clear_errors(tmp_path, day, catalog):
    with pytest.raises(ams.AmsError, match="energy_j must be a finite number >= 0"):
        _budgets(day, energy_j=-1.0)
    with pytest.raises(ams.AmsError, match="joules or a multiple"):
        ams.resolve_budgets(catalog, day, energy="lots", memory_mb=1, money=0, latency_ms=10)
    (tmp_path / "catalog.json").write_text('{"tasks": {"a": {"variants": [{"name": "x"}]}}}')
    with pytest.raises(ams.AmsError, match="missing field"):
        ams.load_catalog(str(tmp_path))
    (tmp_path / "catalog.json").write_text('{"tasks": {"a": 3}}')
    with pytest.raises(ams.AmsError, match="task 'a' has no variants"):
        ams.load_catalog(str(tmp_path))
    (tmp_path / "catalog.json").write_text('{"tasks": {"a": {}}, "cloud": {"enabled": true}}')
    with pytest.raises(ams.AmsError, match="cloud section is missing"):
        ams.load_catalog(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train.catalog"):
        ams.load_catalog(str(tmp_path / "nope"))


# -- our policy, baselines, optimum ---------------------------------------------------------


def test_all_models_beat_static_models_and_stay_within_the_energy_budget(catalog, day):
    b = ams.resolve_budgets(catalog, day, energy="0.12x", memory_mb=2.5, money=0, latency_ms=100)
    rep, decisions = ams.run(catalog, day, b, list(ams.POLICIES))
    p = rep["policies"]
    for name, ds in decisions.items():
        assert sum(d.energy_j for d in ds) <= b.energy_j * (1 + 1e-9), name
    assert p["original"]["served_fraction"] < p["best_model"]["served_fraction"]
    for name in ("mcdnn", "pace"):
        assert p[name]["served"] >= 2 * p["best_model"]["served"], name
        assert 0 <= p[name]["regret"] <= rep["offline_optimum"]["expected_correct"]
    assert rep["best_model_variants"]["digit"] == ams.knee(catalog.options["digit"]).variant


@pytest.mark.parametrize("name", ["mcdnn", "pace"])
def test_all_models_use_the_cloud_money_budget_when_the_cloud_saves_battery(tmp_path, day, name):
    catalog = ams.load_catalog(write_catalog(str(tmp_path), cloud_energy_j=5e-5))
    b = _budgets(day, energy_j=0.05, money=0.2)
    ds = ams.simulate(ams.make_policy(name, catalog, b), day)
    cloud = [d for d in ds if d.served and d.location == ams.CLOUD]
    assert cloud and sum(d.money for d in ds) <= 0.2 + 1e-9


def test_knee_is_on_the_pareto_front_between_its_ends(catalog):
    front = ams.pareto(catalog.options["digit"])
    assert [o.variant for o in front] == ["tiny", "width_1_4", "width_1_2", "lowrank", "original"]
    assert ams.knee(catalog.options["digit"]) in front[1:-1]


def test_offline_optimum_matches_brute_force_on_a_tiny_day(tmp_path):
    cat = ams.load_catalog(write_catalog(str(tmp_path)), cloud=False)
    tr = traces.Trace(100.0, APPS, np.arange(7, dtype=float), np.array([0, 0, 0, 1, 1, 2, 0]))
    b = ams.Budgets(energy_j=2.2e-3, memory_bytes=1_000_000, money=0.0, latency_ms=100, day_s=100)
    opt = ams.offline_optimum(cat, b, tr)
    counts = tr.counts()
    best = 0.0
    per_app = {
        a: [None] + [o for o in cat.options[a] if o.mem_bytes <= b.memory_bytes] for a in APPS
    }
    for combo in itertools.product(*per_app.values()):  # one resident variant per app
        mem = sum(o.mem_bytes for o in combo if o)
        if mem > b.memory_bytes:
            continue
        # each app serves k of its requests (k = 0..N) with its variant
        for ks in itertools.product(*[range(counts[a] + 1) for a in APPS]):
            e = sum(k * o.energy_j + (o.load_energy_j if k else 0) for k, o in zip(ks, combo) if o)
            if e <= b.energy_j + 1e-12:
                best = max(best, sum(k * o.accuracy for k, o in zip(ks, combo) if o))
    assert opt["expected_correct"] == pytest.approx(best, abs=1e-6)


# -- CLI ---------------------------------------------------------------------------------------


def test_cli_simulates_a_day_and_reports_every_policy(tmp_path, day):
    cat = write_catalog(str(tmp_path / "cat"))
    tr = str(tmp_path / "trace.json")
    traces.save(day, tr)
    out = str(tmp_path / "ams.json")
    proc = run_job("runtime.ams", f"--bundle={cat}", f"--trace={tr}", f"--json={out}", "--no-cloud")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(open(out).read())
    assert set(rep["policies"]) == set(ams.POLICIES)
    assert rep["requests"] == len(day) and rep["offline_optimum"]["expected_correct"] > 0
    assert all(math.isfinite(p["simulate_s"]) for p in rep["policies"].values())
    assert "mcdnn" in proc.stdout and "optimum" in proc.stdout


def test_cli_bad_trace_is_one_error_line_and_writes_nothing(tmp_path):
    cat = write_catalog(str(tmp_path / "cat"))
    bad = tmp_path / "trace.json"
    bad.write_text(json.dumps({"day_s": 10, "t": [1, -1], "app": ["digit", "digit"]}))
    out = tmp_path / "ams.json"
    proc = run_job("runtime.ams", f"--bundle={cat}", f"--trace={bad}", f"--json={out}")
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: ") and "negative time" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists()
    bad.write_text(json.dumps({"day_s": 10, "t": [1], "app": ["faces"]}))
    proc = run_job("runtime.ams", f"--bundle={cat}", f"--trace={bad}")
    assert proc.returncode == 1 and "unknown app(s) ['faces']" in proc.stderr


def test_traces_cli_writes_a_valid_trace(tmp_path):
    out = str(tmp_path / "t.json")
    proc = run_job("runtime.traces", "--apps=a,b", f"--out={out}", "--hours=0.5", "--seed=1")
    assert proc.returncode == 0, proc.stderr
    assert len(traces.load(out, ["a", "b"])) > 100
    proc = run_job("runtime.traces", "--apps=a,a", f"--out={out}")
    assert proc.returncode == 1 and proc.stderr.startswith("error: apps must be distinct")


def test_mcdnn_falls_back_to_the_device_when_cloud_money_runs_out(catalog, day):
    pol = ams.mcdnn_policy(catalog, _budgets(day, energy_j=1.0, money=1.0))
    state = dataclasses.replace(
        pol.init(), money_left=0.0, choice={"digit": ("original", ams.CLOUD)}
    )  # the cloud was chosen earlier, and the money is now spent
    d, s = pol.step(state, ams.Request(10.0, "digit"))
    assert d.served and d.location == ams.DEVICE and d.loaded and d.money == 0.0
    assert s.choice["digit"][1] == ams.DEVICE


def _opt(variant: str, energy_j: float, accuracy: float) -> ams.Option:
    return ams.Option("a", variant, ams.DEVICE, accuracy, energy_j, 1.0, 0.0, 1000, 1.0, 1e-3)


def test_knee_is_the_point_farthest_above_the_chord_never_one_below_it():
    # The Lite catalog's 1000-way front (mJ, agreement; branch h-ams): the 96 px variant lies
    # far *below* the chord from the cheapest to the most accurate; the old |distance| rule
    # picked it as Best-Model. The knee is the point farthest above: 112 px.
    front = [_opt("ep50_96", 1.64, 0.0), _opt("r96", 3.36, 0.038), _opt("r112", 3.66, 0.143),
             _opt("r128", 5.13, 0.158), _opt("r160", 6.42, 0.256), _opt("r176", 7.90, 0.308),
             _opt("r192", 8.87, 0.368)]  # fmt: skip
    assert ams.knee(front).variant == "r112"
    # A front that only bends upwards (accuracy accelerates with energy) has no knee above its
    # chord: Best-Model is its most accurate end.
    convex = [_opt("a", 1.0, 0.0), _opt("b", 5.0, 0.1), _opt("c", 9.0, 0.5), _opt("d", 10.0, 1.0)]
    assert ams.knee(convex).variant == "d"


def test_pace_recent_weight_is_checked_and_changes_the_demand_estimate(device_catalog, day):
    b = _budgets(day, energy_j=0.05)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ams.AmsError, match="recent_weight"):
            ams.pace_policy(device_catalog, b, recent_weight=bad)
    with pytest.raises(ams.AmsError, match="rule"):
        ams.pace_policy(device_catalog, b, rule="median")
    runs = {w: ams.simulate(ams.pace_policy(device_catalog, b, recent_weight=w), day)
            for w in (0.0, 1.0)}  # fmt: skip
    runs["max"] = ams.simulate(ams.pace_policy(device_catalog, b, rule="max"), day)
    assert all(d.served or d.reason for ds in runs.values() for d in ds)
    assert [d.variant for d in runs[0.0]] != [d.variant for d in runs[1.0]]
