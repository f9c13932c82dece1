"""The one interleaved timer: every benchmark in the project measures through it.

Systems under comparison are timed in the same run, round by round, so drift
(thermal, other processes) hits all of them alike; the order of the systems
changes every round so none is always first. numpy only: shared by the
runtime's benchmarks and the offline jobs that measure exported models.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

ORDERS = ("rotate", "alternate", "fixed")


def time_stats(ns: Sequence[int]) -> dict:
    """Mean / p50 / p95 in ms of per-frame times given in ns."""
    ms = np.asarray(ns, np.float64) / 1e6
    return {
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "frames": int(ms.size),
    }


def round_order(names: Sequence[str], r: int, order: str = "rotate") -> list[str]:
    """The order the systems run in during round `r`.

    ``rotate``: shift by one each round; ``alternate``: forward, then
    backward; ``fixed``: always as given.
    """
    names = list(names)
    if order == "rotate":
        k = r % len(names) if names else 0
        return names[k:] + names[:k]
    if order == "alternate":
        return names if r % 2 == 0 else names[::-1]
    if order == "fixed":
        return names
    raise ValueError(f"unknown order {order!r}; valid: {', '.join(ORDERS)}")


@dataclasses.dataclass(frozen=True)
class Timings:
    """What `interleaved` measured.

    Attributes:
      ns: per system, wall time (ns) of every timed call (or block of `calls`
        calls, divided by `calls`), in round-major order.
      outputs: per system, what it returned for each input in round 0.
    """

    ns: dict[str, list[float]]
    outputs: dict[str, list[Any]]
    rounds: int

    def stats(self) -> dict[str, dict]:
        """`time_stats` per system."""
        return {n: time_stats(v) for n, v in self.ns.items()}

    def median_round_ms(self) -> dict[str, float]:
        """Per system, the median over rounds of the mean ms per call."""
        return {
            n: float(np.median(np.asarray(v, np.float64).reshape(self.rounds, -1).mean(1) / 1e6))
            for n, v in self.ns.items()
        }


def interleaved(
    fns: Mapping[str, Callable[[Any], Any]],
    inputs: Sequence[Any] | Mapping[str, Sequence[Any]],
    *,
    rounds: int = 3,
    warmup: int = 20,
    calls: int = 1,
    order: str = "rotate",
    keep_outputs: bool = True,
) -> Timings:
    """Times ``fn(x)`` of every system on every input, interleaved round by round.

    Args:
      fns: system name -> a function of one input.
      inputs: the inputs every system runs on, or per system its own inputs
        (e.g. each signature's own input shape).
      rounds: how many times each system runs over its inputs.
      warmup: calls of each system on its first inputs before timing.
      calls: calls timed together per input (for functions too fast for one
        clock reading each); the recorded time is per call.
      order: how the systems' order changes between rounds (`round_order`).
      keep_outputs: keep what each system returned for each input in round 0.

    Raises:
      ValueError: no rounds, no inputs or an unknown order.
    """
    names = list(fns)
    per = {n: inputs[n] if isinstance(inputs, Mapping) else inputs for n in names}
    if rounds < 1 or calls < 1 or any(len(per[n]) == 0 for n in names):
        raise ValueError("interleaved timing needs rounds >= 1, calls >= 1 and inputs")
    round_order(names, 0, order)  # validates `order`
    for n in names:
        fn, xs = fns[n], per[n]
        for j in range(warmup):
            fn(xs[j % len(xs)])
    ns: dict[str, list[float]] = {n: [] for n in names}
    outputs: dict[str, list[Any]] = {n: [] for n in names}
    clock = time.perf_counter_ns
    for r in range(rounds):
        for n in round_order(names, r, order):
            fn, ts, xs = fns[n], ns[n], per[n]
            keep = outputs[n] if (r == 0) else None
            for x in xs:
                if calls == 1:
                    t0 = clock()
                    y = fn(x)
                    ts.append(clock() - t0)
                else:
                    t0 = clock()
                    for _ in range(calls):
                        y = fn(x)
                    ts.append((clock() - t0) / calls)
                if keep is not None:
                    keep.append(y if keep_outputs else None)
    return Timings(ns, outputs, rounds)
