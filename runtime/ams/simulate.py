"""Serving a day of requests with a policy, and the day's summary."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime import traces as traces_lib
from runtime.ams.state import Decision, Policy, Request


def simulate(policy: Policy, trace: traces_lib.Trace) -> list[Decision]:
    """Runs `policy` over every request of `trace`; never raises on a request."""
    state = policy.init()
    out = []
    for t, a in zip(trace.t.tolist(), trace.app.tolist()):
        decision, state = policy.step(state, Request(t, trace.apps[a]))
        out.append(decision)
    return out


def summarize(decisions: Sequence[Decision], day_s: float, bins: int = 10) -> dict:
    """Served fraction, energy per request, accuracy, reasons; and the same per time bin."""
    n = len(decisions)
    served = [d for d in decisions if d.served]
    energy = sum(d.energy_j for d in decisions)
    reasons: dict[str, int] = {}
    for d in decisions:
        if not d.served:
            key = d.reason.split(" (")[0]
            reasons[key] = reasons.get(key, 0) + 1
    usage: dict[str, int] = {}
    for d in served:
        k = f"{d.app}/{d.variant}@{d.location}"
        usage[k] = usage.get(k, 0) + 1
    timeline = []
    edges = np.linspace(0.0, day_s, bins + 1)
    ts = np.array([d.t for d in decisions])
    for i in range(bins):
        sel = [
            d
            for d, t in zip(decisions, ts)
            if edges[i] <= t < edges[i + 1] or (i == bins - 1 and t == day_s)
        ]
        s = [d for d in sel if d.served]
        timeline.append(
            {
                "t0_s": float(edges[i]),
                "requests": len(sel),
                "served_fraction": len(s) / len(sel) if sel else None,
                "accuracy": float(np.mean([d.accuracy for d in s])) if s else None,
                "energy_per_request_j": float(np.mean([d.energy_j for d in s])) if s else None,
            }
        )
    return {
        "requests": n,
        "served": len(served),
        "served_fraction": len(served) / n if n else 0.0,
        "expected_correct": float(sum(d.accuracy for d in served)),
        "accuracy_served": float(np.mean([d.accuracy for d in served])) if served else None,
        "energy_j": energy,
        "energy_per_served_j": energy / len(served) if served else None,
        "money": float(sum(d.money for d in decisions)),
        "loads": int(sum(len(d.loaded) for d in decisions)),
        "evictions": int(sum(len(d.evicted) for d in decisions)),
        "latency_ms_mean": float(np.mean([d.latency_ms for d in served])) if served else None,
        "not_served": reasons,
        "usage": dict(sorted(usage.items(), key=lambda kv: -kv[1])),
        "timeline": timeline,
    }
