"""pace's demand forecast and dithering (issue 15, item 4): small synthetic days.

The catalog is `test_ams`'s hand-written one (costs are data, no model needed).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from test_ams import APPS, write_catalog

from runtime import ams, traces
from runtime.ams.policies import SKIP, count_window, demand_spread


@pytest.fixture(scope="module")
def device_catalog(tmp_path_factory) -> ams.Catalog:
    return ams.load_catalog(write_catalog(str(tmp_path_factory.mktemp("dev"))), cloud=False)


def _budgets(day_s: float, energy_j: float) -> ams.Budgets:
    return ams.Budgets(energy_j, 2_500_000, 0.0, 100.0, day_s)


def test_window_counts_include_empty_windows_and_give_the_sample_cv():
    w = (0, 0, 0, 0.0, 0.0)
    # windows of 10 s: 3 requests in [0, 10), none in [10, 20), 1 in [20, 30), then one at 35
    for t in (1.0, 2.0, 9.0, 21.0, 35.0):
        w = count_window(w, t, 10.0)
    assert w == (3, 1, 3, 4.0, 10.0)  # current window 3 (count 1); 3 complete: 3, 0, 1
    counts = np.array([3.0, 0.0, 1.0])
    cv = counts.std(ddof=1) / counts.mean()
    # at t = 35 of a 100-s day: sqrt(10/35) for the mean seen, sqrt(10/65) for the days left
    got = demand_spread(w, 35.0, 100.0, 10.0, prior_cv=9.0)
    assert got == pytest.approx(cv * math.sqrt(10 / 35 + 10 / 65))
    assert demand_spread(w, 35.0, 100.0, 10.0, 9.0, horizon=False) == pytest.approx(
        cv * math.sqrt(10 / 35)
    )
    # fewer than two complete windows: the prior cv
    one = count_window(count_window((0, 0, 0, 0.0, 0.0), 1.0, 10.0), 12.0, 10.0)
    assert demand_spread(one, 12.0, 100.0, 10.0, prior_cv=0.7) == pytest.approx(
        0.7 * math.sqrt(10 / 12 + 10 / 88)
    )


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"quantile_z": -1.0}, "quantile_z"),
        ({"quantile_z": math.nan}, "quantile_z"),
        ({"window_s": 0.0}, "window_s"),
        ({"window_s": math.inf}, "window_s"),
        ({"prior_cv": -0.5}, "prior_cv"),
        ({"prior_rate": math.nan}, "prior_rate"),
        ({"prior_rate": -1.0}, "prior_rate"),
        ({"prior_days": 0.0}, "prior_days"),
        ({"resolve_s": -60.0}, "resolve_s"),
        ({"dither": "some"}, "dither"),
    ],
)
def test_bad_pace_parameters_are_one_clear_error(device_catalog, kw, name):
    with pytest.raises(ams.AmsError, match=name) as e:
        ams.pace_policy(device_catalog, _budgets(3600.0, 0.1), **kw)
    assert "\n" not in str(e.value) and str(e.value).startswith("pace: ")


def test_mixed_dithering_follows_the_mix_fraction_of_the_mixed_app_only(device_catalog):
    """A rare app on the price boundary: `mix` of ITS requests follow `alt`, not all of them."""
    b = _budgets(3600.0, 10.0)
    plan = {a: ("width_1_2", ams.DEVICE) for a in APPS}
    plan["ge5"] = ("", SKIP)
    alt = {**plan, "ge5": ("tiny", ams.DEVICE)}
    served = {}
    for dither in ("mixed", "all"):
        pol = ams.pace_policy(device_catalog, b, resolve_s=1e9, dither=dither)
        state = dataclasses.replace(pol.init(), plan_at=0.0, plan=plan, alt=alt, mix=0.3)
        n = 0
        for i in range(1000):  # ge5 is one request in ten
            app = "ge5" if i % 10 == 9 else "digit"
            d, state = pol.step(state, ams.Request(1.0 + i, app))
            n += app == "ge5" and d.served
        served[dither] = n
    assert 29 <= served["mixed"] <= 30  # 0.3 of the 100 ge5 requests (float rounding)
    assert served["all"] == 100  # the old credit, earned by every request, served them all


def _day(rates: list[float], seg_s: float, seed: int = 0) -> traces.Trace:
    """A day of segments of `seg_s` seconds with the given total rates, apps drawn uniformly."""
    rng = np.random.default_rng(seed)
    ts, apps = [], []
    for k, r in enumerate(rates):
        n = rng.poisson(r * seg_s)
        ts.append(np.sort(rng.uniform(k * seg_s, (k + 1) * seg_s, n)))
        apps.append(rng.integers(0, len(APPS), n))
    return traces.Trace(seg_s * len(rates), APPS, np.concatenate(ts), np.concatenate(apps))


def _run(catalog, tr, energy_j, **kw):
    b = _budgets(tr.day_s, energy_j)
    ds = ams.simulate(ams.pace_policy(catalog, b, **kw), tr)
    first_half = sum(d.energy_j for d in ds if d.t < tr.day_s / 2) / energy_j
    return first_half, ams.summarize(ds, tr.day_s), ams.offline_optimum(catalog, b, tr)


def test_prior_rate_does_not_overspend_the_morning_of_a_day_that_rises_late(device_catalog):
    tr = _day([0.1, 0.9], 3600.0)  # 10% of the requests in the first hour
    share = float((tr.t < 3600.0).mean())
    old_half, old, opt = _run(device_catalog, tr, 0.5)
    new_half, new, _ = _run(device_catalog, tr, 0.5, prior_rate=0.5)
    # the day's average so far says "quiet day": half the battery goes on a tenth of the day
    assert old_half > 0.4
    # with yesterday's rate as the prior the first hour spends about its share of the demand
    assert new_half < 2 * share
    best = opt["expected_correct"]
    assert (best - new["expected_correct"]) / best < 0.1 < (best - old["expected_correct"]) / best


def test_a_burst_leaves_little_energy_unspent(device_catalog):
    tr = _day([0.3] * 10 + [3.0] + [0.3] * 49, 120.0)  # 2 minutes at 10x, 20 minutes in
    _, s, opt = _run(device_catalog, tr, 0.25, prior_rate=0.3)
    assert s["energy_j"] > 0.99 * 0.25  # the burst did not make it save for a busier day
    assert s["expected_correct"] > 0.98 * opt["expected_correct"]
    # the quantile rule plans for more than the mean: it saves, and must not crash or overspend
    _, q, _ = _run(device_catalog, tr, 0.25, quantile_z=1.0)
    assert q["energy_j"] <= 0.25 + 1e-9 and q["served"] > 0


def test_the_lite_mcdnn_job_gives_pace_the_past_days_rate_never_a_reported_day():
    from pipelines import lite_mcdnn  # lazy: imports JAX

    kw = {"hours": 0.2, "mean_rate": 0.2, "bursts": 1}
    past = [s for s in lite_mcdnn.PACE_HISTORY_SEEDS if s != 101]
    want = np.mean([len(d) / d.day_s for d in (traces.make_day(APPS, seed=s, **kw) for s in past)])
    assert lite_mcdnn.history_rate(APPS, [0, 101], kw) == pytest.approx(want)
    assert lite_mcdnn.history_rate(APPS, lite_mcdnn.PACE_HISTORY_SEEDS, kw) == 0.0  # no prior
