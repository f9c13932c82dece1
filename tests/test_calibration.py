"""Calibration that holds on new frames: the loss bound, the methods, the config, the study."""

import json
import math
import os

import ml_collections
import numpy as np
import pytest

from flexjax import config as config_lib
from flexjax import exits
from train import calibration_study

from conftest import SMOKE, run_job

# --- the bound's math --------------------------------------------------------------------------


def _binom_cdf(k: int, n: int, p: float) -> float:
    return math.fsum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k + 1))


@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (9, 10), (5, 200), (0, 300)])
@pytest.mark.parametrize("delta", [0.05, 0.1, 0.5])
def test_clopper_pearson_upper_is_where_the_binomial_cdf_reaches_delta(k, n, delta):
    ub = float(exits.clopper_pearson_upper(k, n, delta))
    assert k / n < ub < 1
    # The definition, by hand: P(Binomial(n, ub) <= k) = delta, and it falls as p grows.
    assert _binom_cdf(k, n, ub) == pytest.approx(delta, rel=1e-6)
    assert _binom_cdf(k, n, ub * 0.99) > delta


def test_clopper_pearson_upper_all_successes_is_one():
    assert exits.clopper_pearson_upper(7, 7, 0.1) == 1.0


def _count_cases(seed: int = 0, size: int = 300):
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 5000, size)
    lost = rng.binomial(n, rng.uniform(0, 0.2, size))
    gained = rng.binomial(n - lost, rng.uniform(0, 0.2, size))
    return zip(lost.tolist(), gained.tolist(), n.tolist())


def test_accuracy_loss_ucb_is_at_least_the_empirical_loss():
    for lost, gained, n in _count_cases():
        for delta in (0.01, 0.1, 0.5):
            assert exits.accuracy_loss_ucb(lost, gained, n, delta) >= (lost - gained) / n


def test_accuracy_loss_ucb_shrinks_with_more_frames_and_a_larger_delta():
    for lost, gained, n in _count_cases(seed=1, size=60):
        by_n = [exits.accuracy_loss_ucb(k * lost, k * gained, k * n, 0.1) for k in (1, 2, 4, 8)]
        assert all(a >= b for a, b in zip(by_n, by_n[1:])), (lost, gained, n, by_n)
        by_d = [exits.accuracy_loss_ucb(lost, gained, n, d) for d in (0.01, 0.05, 0.1, 0.3)]
        assert all(a >= b for a, b in zip(by_d, by_d[1:])), (lost, gained, n, by_d)


def test_accuracy_loss_ucb_covers_the_true_loss_at_least_one_minus_delta():
    # Fixed thresholds (no selection): frames are lost w.p. a, gained w.p. b, i.i.d.
    rng = np.random.default_rng(3)
    delta, reps = 0.1, 2000
    for a, b, n in ((0.03, 0.02, 400), (0.01, 0.0, 1000), (0.05, 0.05, 300)):
        counts = rng.multinomial(n, [a, b, 1 - a - b], size=reps)
        miss = sum(exits.accuracy_loss_ucb(c[0], c[1], n, delta) < a - b for c in counts)
        assert miss / reps <= delta + 3 * math.sqrt(delta * (1 - delta) / reps), (a, b, miss)


def test_accuracy_loss_ucb_refuses_bad_counts_and_delta():
    for args in ((5, 6, 10), (-1, 0, 10), (0, 0, 0)):
        with pytest.raises(ValueError, match="need 0 <= lost"):
            exits.accuracy_loss_ucb(*args, 0.1)
    for delta in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="delta"):
            exits.accuracy_loss_ucb(1, 0, 10, delta)


# --- a synthetic early-exit problem whose loss is known in closed form -------------------------
#
# One side exit and the final exit, 10 classes, max_softmax. A frame has a latent s ~ U(0, 1);
# the side exit is right w.p. 0.5 + 0.5 s with top logit 1 + 5 s (so its score is monotone in
# s), the final exit right w.p. 0.9, independently. Exiting where s >= u loses
# L(u) = integral_u^1 (0.9 - 0.5 - 0.5 s) ds = 0.15 - 0.4 u + 0.25 u^2 of accuracy.

C = 10
COSTS = {"side": 1.0, "final": 10.0}


def _synthetic(n: int, rng: np.random.Generator):
    s = rng.uniform(0, 1, n)
    y = rng.integers(0, C, n)
    side_right = rng.uniform(0, 1, n) < 0.5 + 0.5 * s
    final_right = rng.uniform(0, 1, n) < 0.9

    def logits(right, top):
        z = np.zeros((n, C))
        z[np.arange(n), np.where(right, y, (y + 1) % C)] = top
        return z

    return {"side": logits(side_right, 1 + 5 * s), "final": logits(final_right, 5.0)}, y


def _true_loss(threshold: float | None) -> float:
    if threshold is None:
        return 0.0
    z = math.log((C - 1) * threshold / (1 - threshold))  # p_max of top logit z -> z
    u = min(max((z - 1) / 5, 0.0), 1.0)
    return 0.15 - 0.4 * u + 0.25 * u * u


def test_synthetic_ucb_holds_the_bound_in_nine_of_ten_draws_where_empirical_fails():
    rng = np.random.default_rng(0)
    eps, delta, draws = 0.01, 0.1, 40
    over = {m: 0 for m in ("empirical", "ucb", "ltt")}
    rates = {m: [] for m in over}
    for d in range(draws):
        logits, y = _synthetic(1000, rng)
        for m in over:
            if m == "ltt" and d >= draws // 2:  # the slowest: half the draws
                continue
            cal = exits.calibrate(
                logits, y, COSTS, criterion="max_softmax", epsilon=eps, method=m, delta=delta,
                seed=d,
            )  # fmt: skip
            over[m] += _true_loss(cal.thresholds["side"]) > eps
            rates[m].append(cal.val.rates["side"])
    assert over["ucb"] <= 0.1 * draws, over
    assert over["ltt"] <= 0.1 * draws // 2, over
    assert over["empirical"] >= 2 * max(over["ucb"], 1), over
    # The guarantee is paid in exits: fewer frames leave early, but some still do.
    assert 0 < np.mean(rates["ucb"]) < np.mean(rates["empirical"])


def test_margin_method_calibrates_at_epsilon_minus_margin():
    logits, y = _synthetic(800, np.random.default_rng(5))
    kw = dict(criterion="max_softmax", names=["side", "final"])
    m = exits.calibrate(logits, y, COSTS, epsilon=0.03, method="margin", margin=0.02, **kw)
    e = exits.calibrate(logits, y, COSTS, epsilon=0.01, **kw)
    assert m.thresholds == e.thresholds and m.epsilon == 0.03
    assert m.to_dict()["method"] == "margin" and m.to_dict()["margin"] == 0.02


def test_default_method_is_the_empirical_rule_unchanged():
    logits, y = _synthetic(500, np.random.default_rng(6))
    a = exits.calibrate(logits, y, COSTS, criterion="max_softmax", epsilon=0.02)
    b = exits.calibrate(logits, y, COSTS, criterion="max_softmax", epsilon=0.02, method="empirical")
    assert a.method == "empirical" and a.thresholds == b.thresholds
    assert a.val.accuracy >= a.final_accuracy - 0.02 - 1e-12


def test_ucb_calibration_records_a_bound_within_epsilon():
    logits, y = _synthetic(1000, np.random.default_rng(7))
    cal = exits.calibrate(logits, y, COSTS, criterion="max_softmax", epsilon=0.02, method="ucb")
    info = cal.to_dict()["ucb"]
    assert cal.thresholds["side"] is not None
    assert (info["lost"] - info["gained"]) / 1000 <= info["ucb"] <= 0.02
    lost, gained = exits.loss_outcomes(logits, y, cal.thresholds, "max_softmax")
    assert (lost.sum(), gained.sum()) == (info["lost"], info["gained"])


def test_ucb_on_too_few_frames_never_exits():
    # 50 frames cannot bound a loss by 1 point: the only safe choice is the final exit.
    logits, y = _synthetic(50, np.random.default_rng(8))
    for m in ("ucb", "ltt"):
        cal = exits.calibrate(logits, y, COSTS, criterion="max_softmax", epsilon=0.01, method=m)
        assert cal.thresholds == {"side": None} and cal.val.rates["final"] == 1.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"method": "bayes"}, "unknown calibration method 'bayes'"),
        ({"method": "ucb", "delta": 0.0}, r"delta must be a fraction in \(0, 1\)"),
        ({"method": "ucb", "delta": 1.0}, r"delta must be a fraction in \(0, 1\)"),
        ({"method": "ltt", "delta": float("nan")}, "delta must be"),
        ({"method": "margin", "margin": 1.0}, r"margin must be a fraction in \[0, 1\)"),
        ({"method": "margin", "margin": -0.01}, "margin must be"),
        ({"epsilon": 1.0}, r"epsilon must be a fraction in \[0, 1\)"),
        ({"epsilon": -0.01, "method": "ucb"}, "epsilon must be"),
    ],
)
def test_calibrate_refuses_bad_options(kwargs, match):
    logits, y = _synthetic(20, np.random.default_rng(9))
    with pytest.raises(ValueError, match=match):
        exits.calibrate(logits, y, COSTS, criterion="max_softmax", **kwargs)


# --- the config --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("method", "bayes", "unknown calibration.method 'bayes'; valid: empirical"),
        ("delta", 0.0, "'calibration.delta' must be"),
        ("delta", 1.0, "'calibration.delta' must be"),
        ("delta", float("inf"), "'calibration.delta' must be a finite number"),
        ("margin", 1.5, "'calibration.margin' must be"),
        ("margin", "0.1", "'calibration.margin' must be a float"),
        ("bound", "cp", "unknown config key 'calibration.bound'; valid keys here: "),
    ],
)
def test_config_calibration_bad_values_are_refused(key, value, match):
    for schema in (config_lib.defaults, config_lib.flexdnn_defaults):
        c = ml_collections.ConfigDict({"calibration": {key: value}})
        with pytest.raises(ValueError, match=match):
            config_lib.validate(c, schema)


def test_config_calibration_default_is_the_same_for_flexdnn_and_branchynet():
    for schema in (config_lib.defaults, config_lib.flexdnn_defaults):
        opts = config_lib.calibration_options(config_lib.validate(schema()))
        assert opts == {"method": "empirical", "delta": 0.05, "margin": 0.005}
    # A workdir config saved before the section existed gets the same defaults.
    old = config_lib.calibration_options({"exits": {"epsilon": 0.01}})
    assert old["method"] == "empirical"
    given = config_lib.calibration_options({"calibration": {"method": "ucb"}})
    assert given == {"method": "ucb", "delta": 0.05, "margin": 0.005}


def test_bad_calibration_override_is_one_error_line_before_training(tmp_path):
    proc = run_job(
        "train.multi_exit", f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}",
        "--config.calibration.method=bayes", timeout=120,
    )  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: unknown calibration.method 'bayes'")
    assert not os.path.exists(tmp_path / "w")


# --- the study ---------------------------------------------------------------------------------


def test_resplit_study_on_synthetic_frames_counts_exceedances():
    logits, y = _synthetic(2000, np.random.default_rng(10))
    rep = calibration_study.resplit_study(
        logits, y, COSTS, 10.0, criterion="max_softmax", epsilon=0.01, delta=0.1, margin=0.005,
        methods=("empirical", "ucb"), resplits=20, seed=0,
    )  # fmt: skip
    assert rep["val_frames"] == rep["test_frames"] == 1000
    for s in rep["methods"].values():
        loss = np.array(s["per_split"]["test_loss"])
        assert len(loss) == 20
        assert s["exceed_count"] == int(np.sum(loss > 0.01 + 1e-12))
        assert s["mean_test_loss"] == pytest.approx(loss.mean())
        assert 0 <= s["mean_exit_rate"] <= 1 and 0.1 <= s["mean_cost_ratio"] <= 1.0
    emp, ucb = rep["methods"]["empirical"], rep["methods"]["ucb"]
    assert ucb["exceed_count"] <= 2 < emp["exceed_count"]
    assert ucb["mean_cost_ratio"] > emp["mean_cost_ratio"]  # what the guarantee costs


def test_resplit_study_refuses_a_split_that_leaves_test_empty():
    logits, y = _synthetic(10, np.random.default_rng(11))
    with pytest.raises(ValueError, match="leave test empty"):
        calibration_study.resplit_study(
            logits, y, COSTS, 10.0, criterion="max_softmax", epsilon=0.01, delta=0.1,
            margin=0.0, val_fraction=0.99,
        )  # fmt: skip


def test_study_command_on_the_smoke_workdir_caches_logits(smoke_workdir, tmp_path):
    out = str(tmp_path / "study.json")
    args = (
        f"--workdir={smoke_workdir}", "--resplits=20", f"--cache-dir={tmp_path}", f"--json={out}",
    )  # fmt: skip
    proc = run_job("train.calibration_study", *args, check=True)
    assert "computing held-out logits" in proc.stderr
    with open(out) as f:
        rep = json.load(f)
    (name,) = rep["systems"]
    sysrep = rep["systems"][name]
    with open(os.path.join(smoke_workdir, "config.json")) as f:
        data = json.load(f)["data"]
    frames = sysrep["frames"]
    assert frames == sysrep["val_frames"] + sysrep["test_frames"]
    assert frames == round(data["limit"] * (data["val_fraction"] + data["test_fraction"]))
    assert set(sysrep["methods"]) == set(exits.METHODS)
    for s in sysrep["methods"].values():
        assert len(s["per_split"]["test_loss"]) == 20
    for line in ("method", *exits.METHODS):
        assert line in proc.stdout
    # The second run reads the cache and reproduces the study exactly.
    again = run_job("train.calibration_study", *args[:-1], check=True)
    assert "held-out logits from" in again.stderr
    assert again.stdout == proc.stdout


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--methods=empirical,bayes"], "--methods must list distinct names"),
        (["--val-fraction=0.001"], "leave validation empty"),
    ],
)
def test_study_command_bad_input_is_one_error_line_and_writes_nothing(
    smoke_workdir, tmp_path, extra, match
):
    out = tmp_path / "study.json"
    proc = run_job(
        "train.calibration_study", f"--workdir={smoke_workdir}", f"--cache-dir={tmp_path}",
        f"--json={out}", *extra,
    )  # fmt: skip
    lines = [x for x in proc.stderr.splitlines() if x.strip() and "held-out logits" not in x]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: ") and match in lines[0]
    assert not out.exists()


def test_study_command_refuses_a_directory_that_holds_no_model(tmp_path):
    proc = run_job("train.calibration_study", f"--workdir={tmp_path}")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr[-2000:]
    assert "neither a trained multi-exit workdir" in lines[0]


def test_flexdnn_plan_passes_the_calibration_method_through():
    # Exit "a" is right on every frame and confident on 60%: empirically free. On 200 frames
    # the ucb method cannot certify 1 point even so (no disagreement seen still bounds the
    # rate by 1.5%), so the exit never fires and the plan removes it; 2 points it certifies.
    from flexjax import flexdnn  # noqa: PLC0415 (JAX; only this test)

    n = 200
    y = np.random.default_rng(12).integers(0, 2, n)
    a = np.zeros((n, 2))
    a[np.arange(n), y] = np.where(np.arange(n) < 120, 8.0, 0.0)
    final = np.zeros((n, 2))
    final[np.arange(n), y] = 8.0
    logits = {"a": a, "final": final}

    def plan(epsilon, method):
        return flexdnn.plan_exits(
            logits, y, ["a"], [0.1], [1.0, 1.0], criterion="entropy", epsilon=epsilon,
            calibration={"method": method, "delta": 0.1, "margin": 0.0},
        )  # fmt: skip

    assert plan(0.01, "empirical").kept == ("a",)
    strict = plan(0.01, "ucb")
    assert strict.kept == () and strict.calibration.method == "ucb"
    loose = plan(0.02, "ucb")
    assert loose.kept == ("a",) and loose.rounds[-1]["exit_rates"]["a"] == pytest.approx(0.6)
