"""Replaying a policy's decisions for real: sampled requests run their chosen variant in LiteRT."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from runtime.ams.catalog import DEVICE, Catalog
from runtime.ams.state import Decision
from runtime.bundle import Bundle
from runtime.names import FULL


def execute_sampled(
    catalog: Catalog, decisions: Sequence[Decision], n: int, *, seed: int = 0, threads: int = 1
) -> dict:
    """Replays loads/evictions with LiteRT and runs `n` sampled served requests for real.

    Each sampled request runs its variant's ``full`` signature on a random test
    image of its app from the catalog's ``eval.npz`` (``x``, and ``y_<app>``).
    Returns measured vs catalog accuracy and latency, and real load times.
    """

    path = os.path.join(catalog.path, "eval.npz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing (written by train.catalog)")
    data = np.load(path)
    x = data["x"].astype(np.float32)
    rng = np.random.default_rng(seed)
    served_idx = [i for i, d in enumerate(decisions) if d.served and d.location == DEVICE]
    pick = (
        set(rng.choice(served_idx, size=min(n, len(served_idx)), replace=False).tolist())
        if served_idx
        else set()
    )
    bundles = {
        (a, v["name"]): os.path.join(catalog.path, v["bundle"])
        for a, task in catalog.raw["tasks"].items()
        for v in task["variants"]
    }
    loaded: dict[tuple[str, str], Any] = {}
    load_ms, run_ms, predicted_ms, correct, expected = [], [], [], [], []

    def load(app: str, variant: str) -> None:
        t0 = time.perf_counter()
        b = Bundle.from_dir(bundles[(app, variant)])
        m = b.load(threads)
        loaded[(app, variant)] = m.signature(FULL)
        load_ms.append((time.perf_counter() - t0) * 1e3)

    for i, d in enumerate(decisions):
        for ev in d.evicted:
            loaded.pop(ev, None)
        for v in d.loaded:
            load(d.app, v)
        if i not in pick:
            continue
        key = (d.app, d.variant)
        if key not in loaded:  # loaded before the replay window (never: replay is from t=0)
            load(*key)
        j = int(rng.integers(len(x)))
        sig = loaded[key]
        t0 = time.perf_counter_ns()
        logits = sig(np.ascontiguousarray(x[j : j + 1]))
        run_ms.append((time.perf_counter_ns() - t0) / 1e6)
        predicted_ms.append(d.latency_ms)
        correct.append(int(np.argmax(logits)) == int(data[f"y_{d.app}"][j]))
        expected.append(d.accuracy)
    k = len(run_ms)
    return {
        "executed": k,
        "measured_accuracy": float(np.mean(correct)) if k else None,
        "catalog_accuracy": float(np.mean(expected)) if k else None,
        "measured_latency_ms_mean": float(np.mean(run_ms)) if k else None,
        "catalog_latency_ms_mean": float(np.mean(predicted_ms)) if k else None,
        "loads": len(load_ms),
        "load_ms_mean": float(np.mean(load_ms)) if load_ms else None,
    }
