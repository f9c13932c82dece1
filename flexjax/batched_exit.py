"""Batched early exit in JAX: a batch runs stage by stage and exited frames stop costing.

For serving many frames at once on an accelerator (or CPU). Each stage is the backbone
segment up to an exit plus that exit's head, one jitted function; after it, every frame's
exit rule is evaluated with the calibrated thresholds, and the frames still running are
gathered (on the device) into the smallest bucket that holds them. Buckets are a fixed
ladder of sizes (`buckets`: powers of two, optionally with 1.5x steps between them), so
every shape a stage ever sees is compiled once (`BatchedExitExecutor.compile`) and a batch
never triggers a recompilation, whatever its exit pattern. Predictions are scattered back to
the frames' original order on the host.

The exit rule is `runtime.criteria.score` (the one definition, float64 on the host) on each
stage's head logits: the same decision the per-frame LiteRT executor
(`runtime.executor.EarlyExitExecutor.run`) makes. The host needs the survivors' count to
pick the next bucket anyway, so only the [bucket, num_classes] logits travel to it per stage
and only the survivors' indices travel back; activations stay on the device.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flexjax import costs as costs_lib
from flexjax import models
from flexjax.spec import FINAL, Net
from runtime import criteria

MAX_BUCKETS = 32  # a ladder longer than this is a configuration error


def buckets(max_batch: int, *, min_bucket: int = 1, half_steps: bool = False) -> tuple[int, ...]:
    """The bucket sizes for batches of up to `max_batch` frames.

    Powers of two from `min_bucket` up to the first one >= `max_batch`; with `half_steps`
    also ``3 * 2**k`` between them (padding at most 1/3 of a bucket instead of 1/2).

    Raises:
      ValueError: `max_batch` or `min_bucket` < 1, or more than `MAX_BUCKETS` sizes.
    """
    if max_batch < 1 or min_bucket < 1:
        raise ValueError(f"max_batch and min_bucket must be >= 1; got {max_batch}, {min_bucket}")
    sizes, p = set(), 1
    while True:
        if p >= min_bucket:
            sizes.add(p)
        if half_steps and p >= 2 and 3 * p // 2 >= min_bucket and 3 * p // 2 < max_batch:
            sizes.add(3 * p // 2)
        if p >= max_batch:
            break
        p *= 2
    out = tuple(sorted(s for s in sizes if s >= min_bucket))
    if len(out) > MAX_BUCKETS:
        raise ValueError(f"{len(out)} buckets for max_batch={max_batch}; at most {MAX_BUCKETS}")
    return out


def bucket_for(n: int, sizes: Sequence[int]) -> int:
    """The smallest bucket >= `n` (`sizes` ascending)."""
    for s in sizes:
        if s >= n:
            return s
    raise ValueError(f"{n} frames do not fit the largest bucket ({sizes[-1]})")


@dataclasses.dataclass(frozen=True)
class BatchedResult:
    """Where each frame of a batch left, in the batch's order.

    Attributes:
      logits: [N, C] logits of the exit each frame left at.
      exit_index: [N] position of that exit in execution order (last = final).
      stage_batches: per stage, the bucket size it ran at (0: no frame reached it).
    """

    logits: np.ndarray
    exit_index: np.ndarray
    stage_batches: tuple[int, ...]

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(-1)


class _StageSpec:
    __slots__ = ("name", "start", "stop", "head", "score_threshold")

    def __init__(self, name, start, stop, head, score_threshold):
        self.name = name
        self.start = start
        self.stop = stop
        self.head = head  # side exit: run its head after the segment
        self.score_threshold = score_threshold


class BatchedExitExecutor:
    """Runs `(net, variables)` on batches with early exits between stages (module docstring).

    Args:
      net: the multi-exit net.
      variables: its variables (kept on the default device).
      thresholds: side exit name -> calibrated threshold in natural units (missing or None:
        the exit never fires), e.g. a bundle's ``calibration.thresholds``.
      criterion: the exit criterion (`runtime.criteria.CRITERIA`).
      max_batch: the largest batch `run` accepts.
      min_bucket, half_steps: the bucket ladder (`buckets`).
    """

    def __init__(
        self,
        net: Net,
        variables: Mapping[str, Any],
        thresholds: Mapping[str, float | None],
        criterion: str,
        *,
        max_batch: int = 256,
        min_bucket: int = 1,
        half_steps: bool = False,
    ):
        self.net = net
        self.criterion = criteria.check(criterion)
        unknown = set(thresholds) - {e.name for e in net.exits}
        if unknown:
            raise ValueError(
                f"thresholds for unknown exits {sorted(unknown)}; side exits: "
                f"{[e.name for e in net.exits]}"
            )
        self.thresholds = {e.name: thresholds.get(e.name) for e in net.exits}
        self.max_batch = max_batch
        self.buckets = buckets(max_batch, min_bucket=min_bucket, half_steps=half_steps)
        self.variables = jax.device_put(dict(variables))
        specs, start = [], 0
        for e in net.exits:
            thr = criteria.score_threshold(self.thresholds[e.name], self.criterion)
            specs.append(_StageSpec(e.name, start, e.after + 1, True, thr))
            start = e.after + 1
        specs.append(_StageSpec(FINAL, start, len(net.layers), False, criteria.NEVER))
        self.stages = tuple(specs)
        self.exit_names = tuple(s.name for s in specs)
        model = models.build(net)

        def make(spec):
            def stage(variables, h):
                out = model.apply(
                    variables, h, False, start=spec.start, stop=spec.stop, heads=False
                )
                if not spec.head:
                    return out[FINAL]
                act = out["activation"]
                return act, models.head_apply(net, variables, spec.name, act)

            return stage

        self._fns = [jax.jit(make(s)) for s in specs]
        self._full_fn = jax.jit(lambda v, x: model.apply(v, x, False, heads=False)[FINAL])
        self._gather = jax.jit(lambda h, idx: jnp.take(h, idx, axis=0))
        self._compiled: dict[tuple, Any] = {}
        shapes = net.shapes()
        self._in_shapes = [
            tuple(net.input_shape) if s.start == 0 else tuple(shapes[s.start - 1][1]) for s in specs
        ]

    # -- compilation -------------------------------------------------------------------------

    def _spec(self, b: int, shape: Sequence[int]) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((b, *shape), jnp.float32)

    def _stage_fn(self, i: int, b: int):
        key = ("stage", i, b)
        if key not in self._compiled:
            arg = self._spec(b, self._in_shapes[i])
            self._compiled[key] = self._fns[i].lower(self.variables, arg).compile()
        return self._compiled[key]

    def _gather_fn(self, i: int, b_in: int, b_out: int):
        """Gathers rows of stage `i`'s input-shaped array: [b_in, ...] -> [b_out, ...]."""
        key = ("gather", i, b_in, b_out)
        if key not in self._compiled:
            idx = jax.ShapeDtypeStruct((b_out,), jnp.int32)
            self._compiled[key] = self._gather.lower(
                self._spec(b_in, self._in_shapes[i]), idx
            ).compile()
        return self._compiled[key]

    def _full(self, b: int):
        key = ("full", b)
        if key not in self._compiled:
            arg = self._spec(b, self.net.input_shape)
            self._compiled[key] = self._full_fn.lower(self.variables, arg).compile()
        return self._compiled[key]

    def compile(self, batch_sizes: Sequence[int] = ()) -> dict:
        """Compiles every shape `run` can meet (and `run_full` at `batch_sizes`), timed.

        Every stage at every bucket, and every gather between buckets (from a bucket into
        one no larger; at the input, from each of `batch_sizes` into its bucket, for device
        arrays of that size). After this no call of `run` compiles. Returns ``{"seconds",
        "executables", "buckets"}``.
        """
        t0 = time.perf_counter()
        before = len(self._compiled)
        for i in range(len(self.stages)):
            for b in self.buckets:
                self._stage_fn(i, b)
                if i > 0:
                    for b_in in self.buckets:
                        if b_in >= b:
                            self._gather_fn(i, b_in, b)
        for n in batch_sizes:
            self._full(n)
            b = bucket_for(n, self.buckets)
            if b != n:
                self._gather_fn(0, n, b)
        return {
            "seconds": time.perf_counter() - t0,
            "executables": len(self._compiled) - before,
            "buckets": list(self.buckets),
        }

    @property
    def executables(self) -> int:
        """How many executables are compiled so far (constant once `compile` ran)."""
        return len(self._compiled)

    # -- running -----------------------------------------------------------------------------

    def run_full(self, x: jax.Array | np.ndarray) -> jax.Array:
        """The whole backbone on the batch (no exits): the baseline; waits for the result."""
        out = self._full(len(x))(self.variables, x)
        return out.block_until_ready()

    def run(self, x: jax.Array | np.ndarray) -> BatchedResult:
        """Classifies a batch [N, H, W, C] (N <= `max_batch`) with early exits.

        A batch whose size is not a bucket is padded to one: a numpy batch on the host
        (nothing to compile), a device array on the device (`compile` with its size first).

        Raises:
          ValueError: a batch of the wrong shape or larger than `max_batch`.
        """
        n = len(x)
        if tuple(x.shape[1:]) != tuple(self.net.input_shape) or not 0 < n <= self.max_batch:
            raise ValueError(
                f"batch of shape {tuple(x.shape)} does not fit [1..{self.max_batch}, "
                f"{', '.join(map(str, self.net.input_shape))}]"
            )
        c = self.net.num_classes
        out = np.zeros((n, c), np.float32)
        where = np.zeros(n, np.int32)
        ran = [0] * len(self.stages)
        alive = np.arange(n)
        b = bucket_for(n, self.buckets)
        if b == n:
            h = x
        elif isinstance(x, np.ndarray):  # pad on the host: no executable per batch size
            h = np.concatenate([x, np.repeat(x[:1], b - n, axis=0)]).astype(np.float32)
        else:  # a device array: gather on the device (one executable per such size)
            h = self._gather_fn(0, n, b)(x, _padded(alive, b))
        last = len(self.stages) - 1
        for i, spec in enumerate(self.stages):
            ran[i] = b
            k = len(alive)
            if i == last:
                out[alive] = np.asarray(self._stage_fn(i, b)(self.variables, h))[:k]
                where[alive] = i
                break
            act, logits = self._stage_fn(i, b)(self.variables, h)
            lg = np.asarray(logits)[:k]
            leave = criteria.score(lg, self.criterion) >= spec.score_threshold
            if not leave.any():
                h = act
                continue
            out[alive[leave]] = lg[leave]
            where[alive[leave]] = i
            keep = np.flatnonzero(~leave)
            alive = alive[keep]
            if not len(alive):
                break
            nb = bucket_for(len(alive), self.buckets)
            h = self._gather_fn(i + 1, b, nb)(act, _padded(keep, nb))
            b = nb
        return BatchedResult(out, where, tuple(ran))

    def stage_inputs(self, x: jax.Array | np.ndarray) -> list[jax.Array]:
        """What each stage takes when no frame leaves: the batch, then each activation.

        For timing every stage at the full batch (`run_stage`); `len(x)` must be a bucket.
        """
        out, h = [], x
        for i in range(len(self.stages)):
            out.append(h)
            if i < len(self.stages) - 1:
                h, _ = self._stage_fn(i, len(x))(self.variables, h)
        return out

    def run_stage(self, i: int, h: jax.Array) -> Any:
        """Stage `i` alone on `h` (a bucket's worth of its input); waits for the result."""
        return jax.block_until_ready(self._stage_fn(i, len(h))(self.variables, h))

    def run_per_frame(self, x: np.ndarray) -> BatchedResult:
        """The reference: every frame alone (batch 1), leaving at its first passing exit.

        The per-frame executor's semantics (`runtime.executor.EarlyExitExecutor.run`) on
        the same JAX stages: what `run` must reproduce for every frame.
        """
        n, c = len(x), self.net.num_classes
        out = np.zeros((n, c), np.float32)
        where = np.zeros(n, np.int32)
        last = len(self.stages) - 1
        for j in range(n):
            h = jnp.asarray(x[j : j + 1])
            for i, spec in enumerate(self.stages):
                if i == last:
                    out[j], where[j] = np.asarray(self._stage_fn(i, 1)(self.variables, h))[0], i
                    break
                h, logits = self._stage_fn(i, 1)(self.variables, h)
                lg = np.asarray(logits)
                if criteria.score_one(lg, self.criterion) >= spec.score_threshold:
                    out[j], where[j] = lg[0], i
                    break
        return BatchedResult(out, where, ())

    # -- costs -------------------------------------------------------------------------------

    def flop_speedup(self, exit_index: np.ndarray) -> dict:
        """The speedup FLOPs predict for frames leaving at `exit_index` (vs the backbone).

        Leaving at exit k costs every segment and every side head up to k
        (`flexjax.costs.NetCosts.exit_flops`); no padding, no overhead.
        """
        nc = costs_lib.of(self.net)
        leave = np.array([nc.exit_flops[n] for n in self.exit_names], np.float64)
        expected = float(leave[np.asarray(exit_index)].mean())
        rates = np.bincount(np.asarray(exit_index), minlength=len(self.exit_names))
        return {
            "backbone_flops": nc.backbone_flops,
            "expected_flops": expected,
            "speedup": nc.backbone_flops / expected,
            "exit_rates": {n: float(r) / len(exit_index) for n, r in zip(self.exit_names, rates)},
        }


def _padded(idx: np.ndarray, size: int) -> np.ndarray:
    """`idx` as int32, padded to `size` by repeating its first entry (rows that are dropped)."""
    out = np.full(size, idx[0] if len(idx) else 0, np.int32)
    out[: len(idx)] = idx
    return out
