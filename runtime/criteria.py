"""The exit rule, in numpy: the one definition the runtime executes and `flexjax.exits` calibrates.

Thresholds are in natural units: ``entropy`` exits when the softmax entropy
(nats) is at most the threshold; ``max_softmax`` exits when the top
probability is at least the threshold. ``None`` (or a non-finite value) means
the exit never fires. Internally both map to a score where higher means
surer (``p_max`` or ``-entropy``), compared against `score_threshold`.

`leave_costs` is the cost of a frame that leaves at each exit, whatever the
unit (FLOPs, measured ms): every segment and every side head up to that exit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

CRITERIA = ("entropy", "max_softmax")


NEVER = float("inf")  # a score threshold no input passes


def check(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ValueError(f"unknown exit criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    return criterion


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def score(logits: np.ndarray, criterion: str) -> np.ndarray:
    """Signed confidence per row, higher = surer: top probability, or -entropy (nats).

    Bit for bit the formula `flexjax.exits` calibrates thresholds with.
    """
    p = softmax(logits)
    if check(criterion) == "max_softmax":
        return p.max(axis=-1)
    return (p * np.log(np.clip(p, 1e-30, None))).sum(axis=-1)


def score_one(logits: np.ndarray, criterion: str) -> float:
    """`score` of a single row in plain Python floats: ~4x faster than numpy at 10 classes.

    Agrees with `score` to ~1e-15 (tested); used on the per-frame path, where
    numpy's per-call overhead would cost more than a small exit head.
    """
    z = logits.ravel().tolist()
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = math.fsum(e)
    if criterion == "max_softmax":
        return 1.0 / s
    # -H = sum p log p = sum p (z - m) - log s
    return math.fsum([ei * (v - m) for ei, v in zip(e, z)]) / s - math.log(s)


def to_score(threshold: float, criterion: str) -> float:
    """Natural-unit threshold -> score-space threshold."""
    return threshold if check(criterion) == "max_softmax" else -threshold


def from_score(s: float, criterion: str) -> float:
    """Score-space threshold -> natural units (the inverse of `to_score`)."""
    return s if check(criterion) == "max_softmax" else -s


def score_threshold(threshold: float | None, criterion: str) -> float:
    """A natural-unit threshold as a bound on `score` (`NEVER`: the exit never fires)."""
    if threshold is None or not np.isfinite(threshold):
        check(criterion)
        return NEVER
    return float(to_score(float(threshold), criterion))


def passes(logits: np.ndarray, criterion: str, threshold: float | None) -> np.ndarray:
    """Whether each row may leave at an exit with this threshold."""
    return score(logits, criterion) >= score_threshold(threshold, criterion)


def leave_costs(segment_costs: Sequence[float], head_costs: Sequence[float | None]) -> list:
    """Cost of a frame that leaves at each exit, in execution order (last = final).

    Leaving at exit k ran segments ``0..k`` and side heads ``0..k`` (the heads
    before k did not pass; k's own head did). A frame reaching the final exit
    ran every segment and every side head.

    Args:
      segment_costs: per exit, the cost of the backbone segment that ends there.
      head_costs: per exit, the cost of its head (None or 0: no head, e.g. final).
    """
    if len(segment_costs) != len(head_costs):
        raise ValueError(
            f"need one head cost per segment; got {len(segment_costs)} and {len(head_costs)}"
        )
    out, spent = [], 0  # stays an int for integer costs (FLOPs)
    for seg, head in zip(segment_costs, head_costs):
        spent += seg + (head or 0)
        out.append(spent)
    return out
