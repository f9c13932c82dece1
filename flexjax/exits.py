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

That empirical rule meets ``epsilon`` on the validation frames it was fitted
to, not on new ones: fitted to the limit, the loss on fresh frames exceeds
``epsilon`` about half the time. `calibrate` therefore has four methods
(`METHODS`):

* ``empirical``: the rule above.
* ``margin``: the same rule at ``epsilon - margin``.
* ``ucb``: the same search, but a candidate is feasible when an upper
  confidence bound (level ``1 - delta``) on its accuracy loss is at most
  ``epsilon`` (`accuracy_loss_ucb`: exact binomial bounds on the frames where
  the early-exit model and the final exit disagree in correctness), not its
  loss on these frames. It charges each candidate for the noise of its own
  estimate: thresholds whose exits disagree with the final exit on many frames
  need a lower measured loss. The bound holds for thresholds fixed in advance;
  the search picks among many on the same frames, so ``1 - delta`` is not a
  formal guarantee for the pick (``train.calibration_study`` measures how
  often it holds on fresh frames).
* ``ltt``: a Learn-then-Test risk-control bound with a formal guarantee. The validation frames are
  split in two (seeded). On the first part, the rule above with "bound <=
  target" for "loss <= epsilon" (the bound those counts would get on the second
  part), at targets ``epsilon * j / 8`` (j = 0, 1, 2, ...), traces a path of
  thresholds from conservative to permissive; on the second, each point in order is
  tested by an upper confidence bound (level ``1 - delta``) on its accuracy
  loss (`accuracy_loss_ucb`: exact binomial bounds on the frames where the
  early-exit model and the final exit disagree in correctness), and the last
  point before the first whose bound exceeds ``epsilon`` is kept
  (fixed-sequence testing). With probability at least ``1 - delta`` over the
  validation frames, the population loss is then at most ``epsilon``.
"""

from __future__ import annotations

import dataclasses
import functools
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

METHODS = ("empirical", "margin", "ucb", "ltt")
UCB_STEPS = 8  # the ltt path tries empirical targets epsilon * j / UCB_STEPS, j = 0, 1, ...
UCB_MAX_STEPS = 2 * UCB_STEPS  # ... up to 2 * epsilon (the fit half can be pessimistic)
UCB_FIT_FRACTION = 0.5  # validation frames that trace the path; the rest test it

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
    """Calibrated thresholds (natural units) and what they achieve on validation data.

    ``method`` is one of `METHODS`; ``ucb`` holds the bound of the chosen
    thresholds on the validation frames (``ucb``), or the fixed-sequence test
    (``ltt``): the path tried, each point's bound, where it stopped.
    """

    criterion: str
    epsilon: float
    thresholds: dict[str, float | None]  # None: the exit never fires
    target_accuracy: float
    final_accuracy: float
    val: ExitStats
    method: str = "empirical"
    delta: float | None = None
    margin: float | None = None
    ucb: dict | None = None

    def to_dict(self) -> dict:
        out = {
            "criterion": self.criterion,
            "epsilon": self.epsilon,
            "thresholds": self.thresholds,
            "target_accuracy": self.target_accuracy,
            "final_accuracy": self.final_accuracy,
            "val_accuracy": self.val.accuracy,
            "val_exit_rates": self.val.rates,
            "val_exit_accuracies": self.val.accuracies,
            "val_expected_cost": self.val.expected_cost,
            "method": self.method,
        }
        if self.method == "margin":
            out["margin"] = self.margin
        if self.method in ("ucb", "ltt"):
            out["delta"] = self.delta
            out["ucb"] = self.ucb
        return out


def check_options(method: str, epsilon: float, delta: float, margin: float) -> None:
    """Raises ValueError (one line) for an unknown method or an out-of-range number.

    ``epsilon`` in [0, 1) (a fraction: 0.01 = 1 point), ``delta`` in (0, 1),
    ``margin`` in [0, 1).
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; valid: {', '.join(METHODS)}")
    for name, v, ok, dom in (
        ("epsilon", epsilon, lambda x: 0.0 <= x < 1.0, "[0, 1) (0.01 = 1 point)"),
        ("delta", delta, lambda x: 0.0 < x < 1.0, "(0, 1)"),
        ("margin", margin, lambda x: 0.0 <= x < 1.0, "[0, 1) (0.005 = half a point)"),
    ):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(float(v)):
            raise ValueError(f"{name} must be a fraction in {dom}, got {v!r}")


def clopper_pearson_upper(k, n, delta: float):
    """One-sided Clopper-Pearson upper bound on a binomial rate at level ``1 - delta``.

    The smallest p with ``P(Binomial(n, p) <= k) <= delta``: with probability
    at least ``1 - delta`` the true rate is at most this. Vectorised over `k`
    and `n`; 1 where ``k >= n``; ``n = 0`` gives 1 (no evidence).
    """
    from scipy.special import betaincinv  # lazy: scipy loads only where a bound is asked

    k = np.asarray(k, float)
    n = np.asarray(n, float)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if np.any(k < 0) or np.any(k > n):
        raise ValueError("need 0 <= k <= n")
    with np.errstate(invalid="ignore", divide="ignore"):
        ub = betaincinv(k + 1.0, np.maximum(n - k, 1.0), 1.0 - delta)
    return np.where(k >= n, 1.0, ub)


def loss_outcomes(
    logits: Mapping[str, np.ndarray],
    labels: np.ndarray,
    thresholds: Mapping[str, float | None],
    criterion: str,
    names: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, ``(lost, gained)``: what early exit changes against the final exit.

    ``lost``: the final exit is right and the exit the frame leaves at is
    wrong; ``gained``: the reverse. The accuracy loss vs the final exit is
    ``lost.mean() - gained.mean()``.
    """
    names = tuple(names or logits)
    labels = np.asarray(labels)
    stats = simulate(logits, labels, thresholds, criterion, None, names)
    final_right = np.asarray(logits[names[-1]]).argmax(-1) == labels
    return final_right & ~stats.correct, ~final_right & stats.correct


def accuracy_loss_ucb(lost: int, gained: int, n: int, delta: float) -> float:
    """Upper confidence bound (level ``1 - delta``) on the accuracy loss of early exit.

    Frames are i.i.d.; a frame is lost with probability ``a``, gained with ``b``;
    the loss is ``a - b = p (2 q - 1)`` with ``p = a + b`` (the rate of frames
    where the two disagree in correctness) and ``q = a / p``. Given the ``m =
    lost + gained`` discordant frames, ``lost ~ Binomial(m, q)`` exactly, and
    ``m ~ Binomial(n, p)``; Clopper-Pearson bounds on both at ``delta / 2``
    (union bound) give ``p_ub (2 q_ub - 1)`` when that is positive, else 0
    (then the loss is negative). Always ``>=`` the empirical loss
    ``(lost - gained) / n``; tighter than bounding ``a`` alone when early exits
    also fix frames the final exit gets wrong.

    Raises:
      ValueError: counts out of range, or delta outside (0, 1).
    """
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    lost, gained, n = int(lost), int(gained), int(n)
    if n < 1 or lost < 0 or gained < 0 or lost + gained > n:
        raise ValueError(f"need 0 <= lost + gained <= n, n >= 1; got {lost}, {gained}, {n}")
    m = lost + gained
    p_ub = float(clopper_pearson_upper(m, n, delta / 2))
    q_ub = float(clopper_pearson_upper(lost, m, delta / 2)) if m else 1.0
    return max(0.0, p_ub * (2.0 * q_ub - 1.0))


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
    method: str = "empirical",
    delta: float = 0.1,
    margin: float = 0.0,
    seed: int = 0,
) -> Calibration:
    """Chooses thresholds minimising expected cost within `epsilon` of final accuracy.

    Args:
      logits: exit name -> [N, C] validation logits (final exit last).
      labels: [N] validation labels.
      costs: exit name -> cost of an input that leaves there.
      criterion: one of `CRITERIA`.
      epsilon: allowed accuracy loss vs the final exit, as a fraction in [0, 1).
      num_candidates: quantiles of each exit's scores tried as thresholds.
      method: one of `METHODS` (module docstring): ``empirical`` meets `epsilon`
        on these frames; ``margin`` meets ``epsilon - margin`` on them; ``ucb``
        keeps the upper confidence bound of the loss within `epsilon`; ``ltt``
        bounds the population loss by `epsilon` with probability ``1 - delta``.
      delta: ``ucb``'s and ``ltt``'s error level, in (0, 1).
      margin: ``margin``'s safety margin, a fraction in [0, 1).
      seed: ``ltt``'s split of the frames into path-fitting and testing parts.

    Raises:
      ValueError: bad criterion, method, epsilon, delta or margin.
    """
    criteria.check(criterion)
    check_options(method, epsilon, delta, margin)
    names = tuple(names or logits)
    labels = np.asarray(labels)
    if method == "ltt":
        return _calibrate_ltt(
            logits, labels, costs, criterion, epsilon, names, num_candidates, max_rounds,
            delta, seed,
        )  # fmt: skip
    target_eps = max(0.0, epsilon - margin) if method == "margin" else epsilon
    n = len(labels)

    @functools.cache  # the search meets the same counts many times
    def bound(lost: int, gained: int) -> float:
        return accuracy_loss_ucb(lost, gained, n, delta)

    thresholds, target, final_acc = _fit(
        logits, labels, costs, criterion, target_eps, names, num_candidates, max_rounds,
        bound=bound if method == "ucb" else None,
    )  # fmt: skip
    stats = simulate(logits, labels, thresholds, criterion, costs, names)
    info = None
    if method == "ucb":
        lost, gained = loss_outcomes(logits, labels, thresholds, criterion, names)
        info = {
            "frames": int(n),
            "ucb": bound(int(lost.sum()), int(gained.sum())),
            "lost": int(lost.sum()),
            "gained": int(gained.sum()),
            "bound": "Clopper-Pearson on discordant frames (accuracy_loss_ucb)",
        }
    return Calibration(
        criterion, epsilon, thresholds, target, final_acc, stats, method,
        delta=float(delta) if method == "ucb" else None,
        margin=float(margin) if method == "margin" else None, ucb=info,
    )  # fmt: skip


def _fit(logits, labels, costs, criterion, epsilon, names, num_candidates, max_rounds, bound=None):
    """The empirical rule: ``(thresholds, target accuracy, final accuracy)``.

    With `bound` (``(lost, gained) -> loss bound``, counts on these frames),
    feasible means ``bound <= epsilon`` instead of ``loss <= epsilon``.
    """
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

    final_right = preds[-1] == labels

    def objective(t):
        _, correct, acc, c = _simulate_scores(scores, preds, labels, t, cost)
        if bound is None:
            infeasible = acc < target - 1e-12
        else:
            lost = int(np.sum(final_right & ~correct))
            gained = int(np.sum(~final_right & correct))
            infeasible = bound(lost, gained) > epsilon + 1e-12
        # Feasible first, then cheapest, then most accurate.
        return (infeasible, c, -acc)

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
    if best[0]:  # only with a bound: not even "never exit" meets it on these frames
        thr = np.full(k, NEVER)
    thresholds = {
        n: (from_score(float(t), criterion) if np.isfinite(t) else None)
        for n, t in zip(names[:-1], thr)
    }
    return thresholds, target, final_acc


def _calibrate_ltt(
    logits, labels, costs, criterion, epsilon, names, num_candidates, max_rounds, delta, seed
) -> Calibration:
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    n_fit = int(round(UCB_FIT_FRACTION * n))
    fit, test = np.sort(order[:n_fit]), np.sort(order[n_fit:])
    if len(fit) == 0 or len(test) == 0:
        raise ValueError(f"the ltt calibration needs at least 2 validation frames, got {n}")
    fit_logits = {m: np.asarray(logits[m])[fit] for m in names}
    test_logits = {m: np.asarray(logits[m])[test] for m in names}
    never = {m: None for m in names[:-1]}
    scale = len(test) / len(fit)

    @functools.cache
    def predicted(lost: int, gained: int) -> float:
        # The bound these rates would get on the testing part (its size, not the fit's).
        a = min(round(lost * scale), len(test))
        return accuracy_loss_ucb(a, min(round(gained * scale), len(test) - a), len(test), delta)

    chosen, path = never, []
    for j in range(UCB_MAX_STEPS + 1):
        eps_j = epsilon * j / UCB_STEPS
        if j == 0 or eps_j >= 1.0:
            thr = never if j == 0 else None
        else:
            thr, _, _ = _fit(
                fit_logits, labels[fit], costs, criterion, eps_j, names, num_candidates,
                max_rounds, bound=predicted,
            )  # fmt: skip
        if thr is None:
            break
        lost, gained = loss_outcomes(test_logits, labels[test], thr, criterion, names)
        ub = accuracy_loss_ucb(lost.sum(), gained.sum(), len(test), delta)
        loss = float(lost.mean() - gained.mean())
        path.append({"fit_epsilon": eps_j, "test_loss": loss, "ucb": ub})
        if ub > epsilon:
            break
        chosen = thr
        if epsilon == 0.0:
            break  # every later point is the same target
    stats = simulate(logits, labels, chosen, criterion, costs, names)
    final_acc = float((np.asarray(logits[names[-1]]).argmax(-1) == labels).mean())
    passed = [p for p in path if p["ucb"] <= epsilon]
    info = {
        "fit_frames": int(len(fit)),
        "test_frames": int(len(test)),
        "seed": int(seed),
        "path": path,
        "chosen_fit_epsilon": passed[-1]["fit_epsilon"] if passed else None,
        "chosen_ucb": passed[-1]["ucb"] if passed else None,
        "bound": "Clopper-Pearson on discordant frames (accuracy_loss_ucb), fixed-sequence",
    }
    return Calibration(
        criterion, epsilon, chosen, final_acc - epsilon, final_acc, stats, "ltt",
        delta=float(delta), ucb=info,
    )  # fmt: skip
