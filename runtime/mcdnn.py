"""MCDNN runtime pieces: timing catalog variants, and a shared stem for several tasks.

* `time_interleaved` times several single-input callables (catalog variants)
  frame by frame, round-robin (`runtime.timing`), so drift hits all of them alike; a
  variant's speed is then a ratio to the original measured in the same run.
* `time_load` measures what loading a variant into the model cache costs
  (interpreter creation + tensor allocation), the "load latency" AMS pays on
  a cache miss.
* `SharedStem` runs the conv stem shared by several relabeled tasks once per
  frame and each task's upper layers on its output (MCDNN's sharing). Its
  directory holds ``stem.tflite``, ``head_<task>.tflite`` and a
  ``shared.json`` manifest with every file's sha256.

numpy + ai_edge_litert only.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from flexjax.io import sha256_file
from runtime import timing
from runtime.bundle import BundleError
from runtime.lite import Model
from runtime.names import SHARED_MANIFEST
from runtime.timing import time_stats


def time_interleaved(
    fns: Mapping[str, Callable[[np.ndarray], object]],
    xs: Sequence[np.ndarray],
    *,
    rounds: int = 5,
    warmup: int = 20,
) -> dict[str, dict]:
    """Per-frame wall time of each callable on the same inputs, interleaved by round.

    Returns ``{name: time_stats}`` (mean / p50 / p95 ms). The order alternates
    (forward, backward) so no callable is always first.
    """
    if rounds < 1 or not xs:
        raise ValueError("time_interleaved needs rounds >= 1 and at least one input")
    t = timing.interleaved(
        fns, xs, rounds=rounds, warmup=min(warmup, len(xs)), order="alternate", keep_outputs=False
    )
    return t.stats()


def time_load(model_path: str, signature: str = "full", repeats: int = 5, threads: int = 1) -> dict:
    """Median/mean ms to create the interpreter and allocate `signature` (a cache miss)."""
    ts = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter_ns()
        Model(model_path, num_threads=threads).signature(signature)
        ts.append(time.perf_counter_ns() - t0)
    return time_stats(ts)


class SharedStem:
    """Runs the stem once per frame and every task's head on its output."""

    def __init__(self, directory: str, num_threads: int = 1, verify: bool = True):
        path = os.path.join(directory, SHARED_MANIFEST)
        if not os.path.isfile(path):
            raise BundleError(f"{directory} has no {SHARED_MANIFEST} (not a shared-stem bundle)")
        with open(path) as f:
            self.manifest = json.load(f)
        m = self.manifest
        files = m.get("files", {})
        if verify:
            for name, digest in files.items():
                p = os.path.join(directory, name)
                if not os.path.isfile(p) or sha256_file(p) != digest:
                    raise BundleError(f"{p} is missing or does not match its sha256")
        self.tasks = tuple(m["heads"])
        self.stem = Model(os.path.join(directory, m["stem"]), num_threads).signature("stem")
        self.heads = {
            t: Model(os.path.join(directory, f), num_threads).signature("head")
            for t, f in m["heads"].items()
        }

    def frame(self, x: np.ndarray) -> np.ndarray:
        """One image [H, W, C] or [1, H, W, C] as the stem's contiguous input."""
        x = np.asarray(x)
        if x.shape == self.stem.input_shape[1:]:
            x = x[None]
        if x.shape != self.stem.input_shape:
            raise ValueError(
                f"frame shape {x.shape} does not fit the stem's {self.stem.input_shape}"
            )
        return np.ascontiguousarray(x, dtype=self.stem.input_dtype)

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Logits of every task for one frame (the stem runs once)."""
        h = self.stem(x)
        return {t: head(h) for t, head in self.heads.items()}

    def run_batch(self, xs: np.ndarray) -> dict[str, np.ndarray]:
        """Per-task predictions for many frames."""
        out: dict[str, list[int]] = {t: [] for t in self.tasks}
        for x in xs:
            for t, logits in self.run(self.frame(x)).items():
                out[t].append(int(np.argmax(logits)))
        return {t: np.asarray(v) for t, v in out.items()}
