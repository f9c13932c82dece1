"""Exit criteria, threshold calibration and early-exit statistics (numpy only).

An input walks the exits in execution order and leaves at the first side exit
whose confidence passes that exit's threshold; inputs that pass none leave at
`FINAL`. Two criteria:

* ``max_softmax``: leave when the top softmax probability is ``>= t``.
* ``entropy`` (BranchyNet): leave when the softmax entropy (nats) is ``<= t``.

Thresholds are stored in these natural units. Internally both map to a score
where higher means more confident (``p_max`` or ``-entropy``).

Calibration (`calibrate`) picks per-exit thresholds on validation data that
minimise expected cost while keeping the early-exit accuracy within
``epsilon`` (a fraction: 0.01 = 1 point) of the final exit's accuracy. It is
coordinate descent over candidate thresholds (quantiles of each exit's scores),
shallow exits first, repeated until no threshold changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from runtime import criteria

# The rule itself is defined once, numpy-only, where the runtime executes it.
CRITERIA = criteria.CRITERIA
NEVER = criteria.NEVER  # score threshold that no input passes
softmax = criteria.softmax
score = criteria.score
to_score = criteria.to_score
from_score = criteria.from_score

# The epsilons every calibration table and trade-off sweep uses (fractions: 0.01 = 1 point):
# the training report's sweep, the bundle's calibration rows and FlexDNN's benchmark sweep.
EPSILONS = (0.0, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class ExitStats:
    """What happens to a set of inputs under given thresholds.

    Attributes:
      names: exit names in execution order, ending with the final exit.
      exit_index: per input, the index (into `names`) of the exit it left at.
      correct: per input, whether the prediction where it left is right.
      rates: per exit, fraction of inputs leaving there.
      accuracies: per exit, accuracy of the inputs leaving there (nan if none).
      accuracy: overall accuracy of the early-exit model.
      expected_cost: mean cost per input (if costs were given, else nan).
    """

    names: tuple[str, ...]
    exit_index: np.ndarray
    correct: np.ndarray
    rates: dict[str, float]
    accuracies: dict[str, float]
    counts: dict[str, int]
    accuracy: float
    expected_cost: float


def _stack_scores(logits: Mapping[str, np.ndarray], names: Sequence[str], criterion: str):
    scores = (
        np.stack([score(logits[n], criterion) for n in names[:-1]])
        if len(names) > 1
        else np.zeros((0, len(next(iter(logits.values())))))
    )
    preds = np.stack([np.asarray(logits[n]).argmax(-1) for n in names])
    return scores, preds


def _simulate_scores(
    scores: np.ndarray, preds: np.ndarray, labels: np.ndarray, thr: np.ndarray, cost: np.ndarray
):
    k = preds.shape[0]
    n = preds.shape[1]
    passed = np.concatenate([scores >= thr[:, None], np.ones((1, n), bool)], axis=0)
    idx = passed.argmax(axis=0)
    correct = preds[idx, np.arange(n)] == labels
    return idx, correct, float(correct.mean()), float(cost[idx].mean()) if k else 0.0


def simulate(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    thresholds: Mapping[str, float],
    criterion: str,
    costs: Mapping[str, float] | None = None,
    names: Sequence[str] | None = None,
) -> ExitStats:
    """Runs the early-exit rule offline on precomputed logits.

    Args:
      logits: exit name -> [N, C] logits; must include every name in `names`.
      labels: [N] int labels.
      thresholds: side exit name -> threshold in natural units (missing or None =
        never).
      criterion: one of `CRITERIA`.
      costs: exit name -> cost of an input leaving there (e.g.
        `NetCosts.exit_flops`); enables `expected_cost`.
      names: exit order, last = final; defaults to the order of `logits`.
    """
    names = tuple(names or logits)
    labels = np.asarray(labels)
    scores, preds = _stack_scores(logits, names, criterion)
    thr = np.array([criteria.score_threshold(thresholds.get(n), criterion) for n in names[:-1]])
    cost = np.array([costs[n] for n in names], float) if costs else np.full(len(names), np.nan)
    idx, correct, acc, exp_cost = _simulate_scores(scores, preds, labels, thr, cost)
    counts = {n: int((idx == i).sum()) for i, n in enumerate(names)}
    rates = {n: counts[n] / len(labels) for n in names}
    accs = {
        n: float(correct[idx == i].mean()) if counts[n] else float("nan")
        for i, n in enumerate(names)
    }
    return ExitStats(
        names, idx, correct, rates, accs, counts, acc, exp_cost if costs else float("nan")
    )


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrated thresholds (natural units) and what they achieve on validation data."""

    criterion: str
    epsilon: float
    thresholds: dict[str, float | None]  # None: the exit never fires
    target_accuracy: float
    final_accuracy: float
    val: ExitStats

    def to_dict(self) -> dict:
        return {
            "criterion": self.criterion,
            "epsilon": self.epsilon,
            "thresholds": self.thresholds,
            "target_accuracy": self.target_accuracy,
            "final_accuracy": self.final_accuracy,
            "val_accuracy": self.val.accuracy,
            "val_exit_rates": self.val.rates,
            "val_exit_accuracies": self.val.accuracies,
            "val_expected_cost": self.val.expected_cost,
        }


def calibrate(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    costs: Mapping[str, float],
    *,
    criterion: str = "entropy",
    epsilon: float = 0.01,
    names: Sequence[str] | None = None,
    num_candidates: int = 64,
    max_rounds: int = 4,
) -> Calibration:
    """Chooses thresholds minimising expected cost within `epsilon` of final accuracy.

    Args:
      logits: exit name -> [N, C] validation logits (final exit last).
      labels: [N] validation labels.
      costs: exit name -> cost of an input that leaves there.
      criterion: one of `CRITERIA`.
      epsilon: allowed accuracy loss vs the final exit, as a fraction in [0, 1).
      num_candidates: quantiles of each exit's scores tried as thresholds.

    Raises:
      ValueError: bad criterion or epsilon.
    """
    criteria.check(criterion)
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be a fraction in [0, 1) (0.01 = 1 point), got {epsilon}")
    names = tuple(names or logits)
    labels = np.asarray(labels)
    scores, preds = _stack_scores(logits, names, criterion)
    cost = np.array([costs[n] for n in names], float)
    final_acc = float((preds[-1] == labels).mean())
    target = final_acc - epsilon
    k = len(names) - 1
    thr = np.full(k, NEVER)
    qs = np.linspace(0.0, 1.0, num_candidates)
    candidates = [
        np.unique(np.concatenate([np.quantile(scores[i], qs), [NEVER]])) for i in range(k)
    ]

    def objective(t):
        _, _, acc, c = _simulate_scores(scores, preds, labels, t, cost)
        # Feasible first, then cheapest, then most accurate.
        return (acc < target - 1e-12, c, -acc)

    best = objective(thr)
    for _ in range(max_rounds):
        changed = False
        for i in range(k):
            for cand in candidates[i]:
                trial = thr.copy()
                trial[i] = cand
                obj = objective(trial)
                if obj < best:
                    best, thr, changed = obj, trial, True
        if not changed:
            break
    thresholds = {
        n: (from_score(float(t), criterion) if np.isfinite(t) else None)
        for n, t in zip(names[:-1], thr)
    }
    stats = simulate(logits, labels, thresholds, criterion, costs, names)
    return Calibration(criterion, epsilon, thresholds, target, final_acc, stats)
