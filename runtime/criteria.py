"""Exit confidence rules, in numpy (the same rule `flexjax.exits` calibrates).

Thresholds are in natural units: ``entropy`` exits when the softmax entropy
(nats) is at most the threshold; ``max_softmax`` exits when the top
probability is at least the threshold. ``None`` means the exit never fires.
"""

from __future__ import annotations

import math

import numpy as np

CRITERIA = ("entropy", "max_softmax")


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


def score_threshold(threshold: float | None, criterion: str) -> float:
    """A natural-unit threshold as a bound on `score` (inf: never exits)."""
    if threshold is None or not np.isfinite(threshold):
        return float("inf")
    return float(threshold) if check(criterion) == "max_softmax" else -float(threshold)


def passes(logits: np.ndarray, criterion: str, threshold: float | None) -> np.ndarray:
    """Whether each row may leave at an exit with this threshold."""
    return score(logits, criterion) >= score_threshold(threshold, criterion)
