"""The early-exit executor: run segments and heads until an exit is confident enough.

Per frame (batch 1): run ``segment_k``, then ``exit_k``; leave with that
exit's prediction if its confidence passes its threshold, otherwise feed the
segment's activation to the next segment. The last segment ends in the
backbone's own logits. Where the bundle has stage signatures (``stage_k``:
the segment and its head in one graph, outputs activation and logits), each
side exit is ONE interpreter call instead of two; bundles without them run
segment then head. `run_batch` executes many frames stage by stage and
drops the frames that exited before the next segment runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from runtime import criteria
from runtime.bundle import Bundle, BundleError
from runtime.names import FULL, STAGE_OUTPUTS


@dataclasses.dataclass(frozen=True)
class ExitResult:
    """Where one frame left and what it predicted."""

    exit: str
    index: int  # position of the exit in execution order (last = final)
    prediction: int
    logits: np.ndarray


class _Stage:
    __slots__ = ("name", "segment", "head", "fused", "threshold", "score_threshold")

    def __init__(self, name, segment, head, fused, threshold, criterion):
        self.name = name
        self.segment = segment
        self.head = head
        self.fused = fused  # x -> (activation, logits) in one call, or None
        self.threshold = threshold
        self.score_threshold = criteria.score_threshold(threshold, criterion)

    def run(self, h):
        """(activation, logits or None): the segment and, if the stage has one, its head."""
        if self.fused is not None:
            return self.fused(h)
        h = self.segment(h)
        return h, (self.head(h) if self.head is not None else None)


class EarlyExitExecutor:
    """Runs a bundle with real early exits.

    Args:
      bundle: a verified `Bundle`.
      num_threads: LiteRT CPU threads.
      thresholds: exit name -> threshold (natural units; None = never) that
        overrides the bundle's calibration; missing names keep the bundle's.
      heads: if False, never run side heads: every frame goes through all
        segments to the final exit (measures pure split overhead).
      model: an already loaded `runtime.lite.Model` to share.
      stage_signatures: run each side exit's segment and head as its one ``stage``
        signature where the bundle has one; False: two calls (segment, then head), as
        bundles without stage signatures always run.
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        num_threads: int = 1,
        thresholds: Mapping[str, float | None] | None = None,
        heads: bool = True,
        model=None,
        stage_signatures: bool = True,
    ):
        self.bundle = bundle
        self.criterion = criteria.check(bundle.criterion)
        self.model = model if model is not None else bundle.load(num_threads)
        chosen = {e.name: e.threshold for e in bundle.exits}
        if thresholds:
            unknown = set(thresholds) - set(chosen)
            if unknown:
                raise BundleError(
                    f"thresholds for unknown exits {sorted(unknown)}; exits: {list(chosen)}"
                )
            chosen.update(thresholds)
        self.thresholds = chosen
        self.stages = [
            _Stage(
                e.name,
                self.model.signature(e.segment),
                self.model.signature(e.head) if (e.head and heads) else None,
                (
                    self.model.signature(e.stage, STAGE_OUTPUTS)
                    if (e.stage and e.head and heads and stage_signatures)
                    else None
                ),
                chosen[e.name] if e.head else None,
                self.criterion,
            )
            for e in bundle.exits
        ]
        self.exit_names = tuple(s.name for s in self.stages)
        self.calls_per_stage = tuple(
            1 if (s.fused is not None or s.head is None) else 2 for s in self.stages
        )
        self._full = None
        self.input_shape = self.stages[0].segment.input_shape
        self.input_dtype = self.stages[0].segment.input_dtype

    @classmethod
    def never_exit(cls, bundle: Bundle, **kw) -> EarlyExitExecutor:
        """Every frame runs to the final exit (heads still run and are checked)."""
        return cls(bundle, thresholds={e.name: None for e in bundle.exits}, **kw)

    def frame(self, x: np.ndarray) -> np.ndarray:
        """Validates one frame ([H, W, C] or [1, H, W, C]) into the model's input layout."""
        x = np.asarray(x)
        if x.shape == self.input_shape[1:]:
            x = x[None]
        if x.shape != self.input_shape:
            raise ValueError(f"frame shape {x.shape} does not fit the bundle's {self.input_shape}")
        return np.ascontiguousarray(x, dtype=self.input_dtype)

    def run(self, x: np.ndarray) -> ExitResult:
        """Classifies one frame, leaving at the first confident exit."""
        h = self.frame(x)
        crit = self.criterion
        last = len(self.stages) - 1
        for i, st in enumerate(self.stages):
            if st.fused is not None:
                h, logits = st.fused(h)
            else:
                h = st.segment(h)
                if i == last:
                    return ExitResult(st.name, i, int(h.argmax()), h)
                if st.head is None:
                    continue
                logits = st.head(h)
            if criteria.score_one(logits, crit) >= st.score_threshold:
                return ExitResult(st.name, i, int(logits.argmax()), logits)
        raise AssertionError("unreachable")  # pragma: no cover

    def run_full(self, x: np.ndarray) -> np.ndarray:
        """Logits of the ``full`` signature (the whole backbone as one graph)."""
        if self._full is None:
            self._full = self.model.signature(FULL)
        return self._full(self.frame(x))

    def all_logits(self, xs: np.ndarray) -> dict[str, np.ndarray]:
        """Logits of every exit for every frame (no early exit: every segment and head runs).

        What calibration and parity checks need: ``{exit name: [N, C]}``.
        """
        out = {n: np.zeros((len(xs), self.bundle.num_classes), np.float32) for n in self.exit_names}
        last = len(self.stages) - 1
        for j, x in enumerate(xs):
            h = self.frame(x)
            for i, st in enumerate(self.stages):
                h, logits = st.run(h)
                out[st.name][j] = h[0] if i == last else logits[0]
        return out

    def run_batch(self, xs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classifies many frames stage by stage, dropping exited frames between segments.

        Returns:
          (logits [N, C] of the exit each frame left at, exit index [N]).
        """
        xs = np.asarray(xs)
        if xs.ndim != len(self.input_shape) or xs.shape[1:] != self.input_shape[1:]:
            raise ValueError(
                f"frames of shape {xs.shape} do not fit the bundle's {self.input_shape} "
                "(expected [N, H, W, C])"
            )
        xs = xs.astype(self.input_dtype, copy=False)
        n = len(xs)
        out = np.zeros((n, self.bundle.num_classes), np.float32)
        where = np.zeros(n, np.int32)
        alive = np.arange(n)
        acts = [np.ascontiguousarray(xs[i : i + 1]) for i in range(n)]
        last = len(self.stages) - 1
        for i, st in enumerate(self.stages):
            if not len(alive):
                break
            ran = [st.run(a) for a in acts]
            acts = [a for a, _ in ran]
            if i == last:
                out[alive] = np.concatenate(acts)
                where[alive] = i
                break
            if st.head is None:
                continue
            logits = np.concatenate([lg for _, lg in ran])
            ok = criteria.passes(logits, self.criterion, st.threshold)
            out[alive[ok]] = logits[ok]
            where[alive[ok]] = i
            alive = alive[~ok]
            acts = [a for a, leave in zip(acts, ok) if not leave]
        return out, where
