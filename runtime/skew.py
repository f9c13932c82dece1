"""MCDNN's skew detector: is the recent stream (n, p)-dominated? (numpy-free, pure).

A context is **(n, p)-dominated** when the n most frequent classes among the
last `window` results cover at least a fraction p of them (Han et al.,
MobiSys'16; n in {7, 14, 21} for faces there, 2-3 for 10-class MNIST here).
When it is, a model specialized to those n classes plus "other" is worth
retargeting (`flexjax.specialize`); when it stops being, the cascade falls
back to the general model.

The detector is a pure ``update(state, label) -> (state, dominant)``:
`dominant` is the sorted tuple of the n classes, or None.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple


class SkewState(NamedTuple):
    window: int
    n: int
    p: float
    recent: tuple[int, ...] = ()
    counts: tuple[tuple[int, int], ...] = ()  # (class, count), only classes with count > 0


def skew_init(window: int, n: int, p: float) -> SkewState:
    """An empty detector.

    Raises:
      ValueError: window < 1, n < 1 or p not in (0, 1].
    """
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"skew window must be a positive int, got {window!r}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"skew n (number of dominant classes) must be >= 1, got {n!r}")
    if not 0.0 < p <= 1.0:
        raise ValueError(f"skew p (covered fraction) must be in (0, 1], got {p!r}")
    return SkewState(window, n, float(p))


def dominant(state: SkewState) -> tuple[int, ...] | None:
    """The n dominant classes if the window is full and (n, p)-dominated, else None."""
    if len(state.recent) < state.window:
        return None
    top = sorted(state.counts, key=lambda kv: (-kv[1], kv[0]))[: state.n]
    covered = sum(c for _, c in top)
    if covered >= state.p * len(state.recent):
        return tuple(sorted(k for k, _ in top))
    return None


def skew_update(state: SkewState, label: int) -> tuple[SkewState, tuple[int, ...] | None]:
    """Adds one result to the sliding window; returns the new state and `dominant(state)`."""
    counts = dict(state.counts)
    recent = (*state.recent, int(label))
    counts[int(label)] = counts.get(int(label), 0) + 1
    if len(recent) > state.window:
        old = recent[0]
        recent = recent[1:]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
    new = state._replace(recent=recent, counts=tuple(sorted(counts.items())))
    return new, dominant(new)


def scan(state: SkewState, labels: Iterable[int]) -> tuple[SkewState, list[tuple[int, ...] | None]]:
    """`skew_update` over a sequence; returns the final state and the verdict after each label."""
    out = []
    for y in labels:
        state, d = skew_update(state, y)
        out.append(d)
    return state, out
