"""The day solved with hindsight as an integer program (`scipy.optimize.milp`).

The baseline every policy's regret is measured against.
"""

from __future__ import annotations

import time

import numpy as np

from runtime import traces as traces_lib
from runtime.ams.catalog import CLOUD, DEVICE, Catalog
from runtime.ams.state import Budgets


def offline_optimum(catalog: Catalog, budgets: Budgets, trace: traces_lib.Trace) -> dict:
    """The day solved with hindsight (static resident set), by `scipy.optimize.milp`.

    Variables: ``x[a, o]`` requests of app a served by option o (integer),
    ``y[a, o]`` device variant resident (binary; loaded once). Constraints:
    ``sum_o x[a, o] <= N_a``; ``x <= N_a * y``; energy ``sum e*x + load*y <=
    E``; money; ``sum mem*y <= cache``; options over the latency limit
    removed. Objective: expected correct answers ``sum acc * x``.

    It upper-bounds policies that keep a variant resident once loaded; a
    policy that evicts and reloads pays loads it does not. Returns
    ``{"available": False}`` if scipy is not installed.
    """
    try:
        # lazy: SciPy is not a runtime dependency; only the MILP optimum needs it
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:  # pragma: no cover - scipy is optional for the runtime
        return {"available": False, "reason": "scipy is not installed"}
    counts = trace.counts()
    opts = [
        o
        for a in catalog.apps
        for o in catalog.options[a]
        if o.latency_ms + (o.load_ms if o.location == DEVICE else 0.0) <= budgets.latency_ms
        and (o.location == CLOUD or o.mem_bytes <= budgets.memory_bytes)
        and counts.get(a, 0) > 0
    ]
    if not opts:
        return {"available": True, "expected_correct": 0.0, "served": 0, "choice": {}}
    k = len(opts)
    nvar = 2 * k  # x then y
    c = np.zeros(nvar)
    c[:k] = [-o.accuracy for o in opts]
    rows, lo, hi = [], [], []
    for a in catalog.apps:
        r = np.zeros(nvar)
        r[:k] = [1.0 if o.app == a else 0.0 for o in opts]
        rows.append(r), lo.append(-np.inf), hi.append(counts.get(a, 0))
    for i, o in enumerate(opts):
        r = np.zeros(nvar)
        r[i] = 1.0
        r[k + i] = -float(counts.get(o.app, 0)) if o.location == DEVICE else 0.0
        if o.location == DEVICE:
            rows.append(r), lo.append(-np.inf), hi.append(0.0)
    r = np.zeros(nvar)
    r[:k] = [o.energy_j for o in opts]
    r[k:] = [o.load_energy_j for o in opts]
    rows.append(r), lo.append(-np.inf), hi.append(budgets.energy_j)
    r = np.zeros(nvar)
    r[:k] = [o.money for o in opts]
    rows.append(r), lo.append(-np.inf), hi.append(budgets.money)
    r = np.zeros(nvar)
    r[k:] = [o.mem_bytes for o in opts]
    rows.append(r), lo.append(-np.inf), hi.append(budgets.memory_bytes)
    ub = np.array([counts.get(o.app, 0) for o in opts] + [1.0] * k, np.float64)
    t0 = time.perf_counter()
    res = milp(
        c,
        constraints=LinearConstraint(np.array(rows), lo, hi),
        integrality=np.ones(nvar),
        bounds=Bounds(np.zeros(nvar), ub),
        options={"time_limit": 60.0},
    )
    if res.x is None:
        return {"available": True, "status": res.message, "expected_correct": None}
    x = np.round(res.x[:k]).astype(int)
    choice: dict[str, dict[str, int]] = {}
    for o, n in zip(opts, x):
        if n > 0:
            choice.setdefault(o.app, {})[f"{o.variant}@{o.location}"] = int(n)
    served = int(x.sum())
    return {
        "available": True,
        "status": res.message,
        "expected_correct": float(-res.fun),
        "served": served,
        "served_fraction": served / max(len(trace), 1),
        "energy_j": float(np.dot([o.energy_j for o in opts], x))
        + float(np.dot([o.load_energy_j for o in opts], np.round(res.x[k:]))),
        "choice": choice,
        "solve_s": time.perf_counter() - t0,
    }
