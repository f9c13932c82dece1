"""Exit criteria, offline simulation and threshold calibration (hand-made logits)."""

import numpy as np
import pytest

from flexjax import exits
from runtime import criteria

CONFIDENT = [10.0, 0.0, 0.0]
UNSURE = [0.0, 0.1, 0.0]  # wrong, but not confident


def _logits():
    # 4 inputs, label 0 for all. Exit A is confident (and right) on inputs 0, 1,
    # confident but WRONG on input 2; final is right everywhere.
    a = np.array([CONFIDENT, CONFIDENT, [0.0, 10.0, 0.0], UNSURE])
    final = np.array([CONFIDENT] * 4)
    return {"a": a, "final": final}, np.zeros(4, int)


def test_score_max_softmax_and_entropy_by_hand():
    p = exits.softmax(np.array([[0.0, 0.0]]))
    np.testing.assert_allclose(p, [[0.5, 0.5]])
    assert exits.score(np.array([[0.0, 0.0]]), "max_softmax")[0] == pytest.approx(0.5)
    assert exits.score(np.array([[0.0, 0.0]]), "entropy")[0] == pytest.approx(-np.log(2))


def test_simulate_hand_computed_rates_accuracy_cost():
    logits, y = _logits()
    st = exits.simulate(logits, y, {"a": 0.9}, "max_softmax", {"a": 1.0, "final": 10.0})
    assert st.exit_index.tolist() == [0, 0, 0, 1]
    assert st.rates == {"a": 0.75, "final": 0.25}
    assert st.accuracies["a"] == pytest.approx(2 / 3)
    assert st.accuracy == pytest.approx(0.75)  # inputs 0, 1 at a; 3 at final
    assert st.expected_cost == pytest.approx(0.75 * 1 + 0.25 * 10)


def test_simulate_none_threshold_never_exits():
    logits, y = _logits()
    st = exits.simulate(logits, y, {"a": None}, "entropy", {"a": 1.0, "final": 10.0})
    assert st.rates["final"] == 1.0 and st.accuracy == 1.0


def test_calibrate_epsilon_zero_never_loses_accuracy():
    logits, y = _logits()
    cal = exits.calibrate(
        logits, y, {"a": 1.0, "final": 10.0}, criterion="max_softmax", epsilon=0.0
    )
    assert cal.val.accuracy >= cal.final_accuracy
    assert cal.val.rates["a"] == 0.0  # any threshold that lets input 2 out costs accuracy


def test_calibrate_large_epsilon_buys_cheaper_exits():
    logits, y = _logits()
    cal = exits.calibrate(logits, y, {"a": 1.0, "final": 10.0}, criterion="entropy", epsilon=0.3)
    assert cal.val.accuracy >= 0.7 - 1e-9
    assert cal.val.rates["a"] == pytest.approx(0.75)
    assert cal.val.expected_cost < 10.0


def test_calibrate_random_logits_respects_constraint_and_saves_cost():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 500)
    final = np.eye(5)[y] * 4 + rng.normal(size=(500, 5))
    early = np.eye(5)[y] * rng.uniform(0, 6, (500, 1)) + rng.normal(size=(500, 5))
    logits = {"e": early, "final": final}
    cal = exits.calibrate(logits, y, {"e": 1.0, "final": 5.0}, epsilon=0.01)
    assert cal.val.accuracy >= cal.final_accuracy - 0.01
    assert cal.val.expected_cost < 5.0


def test_calibrate_bad_epsilon_and_criterion_raise():
    logits, y = _logits()
    with pytest.raises(ValueError, match=r"epsilon must be a fraction in \[0, 1\)"):
        exits.calibrate(logits, y, {"a": 1, "final": 2}, epsilon=1.5)
    with pytest.raises(ValueError, match="unknown exit criterion 'margin'"):
        exits.calibrate(logits, y, {"a": 1, "final": 2}, criterion="margin")


def test_leave_costs_sum_segments_and_side_heads_up_to_each_exit():
    assert criteria.leave_costs([1, 2, 4], [10, 20, None]) == [11, 33, 37]
    assert criteria.leave_costs([1.5], [0.0]) == [1.5]
    with pytest.raises(ValueError, match="one head cost per segment"):
        criteria.leave_costs([1, 2], [3])


def test_exit_rule_is_the_runtime_rule():
    assert exits.score is criteria.score and exits.CRITERIA == criteria.CRITERIA
