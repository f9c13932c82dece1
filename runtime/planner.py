"""Edgent's online optimizer: choose the exit and the partition point (pure functions).

  python -m runtime.planner --bundle=BUNDLE --deadline-ms=T [--bandwidths=0.05,0.1,...] [--json=OUT]

`options` turns a bundle's partitions and latency models into every
candidate (exit, partition) with its predicted device time, edge time and
the bytes that cross the network. `plan` is Edgent's search (TWC Algorithm 1):

* exits are scanned from the deepest (most accurate) to the shallowest;
* for an exit, the best partition minimises
  ``device_ms + edge_ms + bytes * 8 / bandwidth + rtt_ms`` (+ loading when
  the models are cold); partition ``0`` is edge-only (the input is sent) and
  ``None`` is device-only (no transfer, the whole path runs on the device);
* the first exit whose minimum meets the deadline wins; if none does the plan
  is the fastest option overall, flagged ``feasible=False`` (best effort).

Baselines restrict the candidates (``POLICIES``): device-only and edge-only
run the final exit on one side; ``neurosurgeon`` (partition-only) keeps the
final exit and picks the partition; ``right-sizing`` (exit-only) keeps the
whole path on the device and picks the exit.

Dynamic bandwidth (Edgent TWC): `BandwidthEstimator` keeps an EWMA of the
throughput of real transfers and detects change points (a sample off the
estimate by more than a factor `threshold`: a drop is trusted at once, a rise
after `confirm_rise` consecutive samples, so one lucky transfer never makes
the plan optimistic); `config_map` is the offline map from bandwidth state
(log-spaced bins) to the (exit, partition) planned at the bin's lower edge,
used right after a change point. Every function is `(state, observation) ->
(decision, state)` with frozen values, testable without a device.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from collections.abc import Mapping, Sequence

from runtime import args as args_lib
from runtime import latency_model as lm
from runtime import names
from runtime.bundle import Bundle
from runtime.names import FINAL

POLICIES = ("edgent", "device-only", "edge-only", "neurosurgeon", "right-sizing")


class PlannerError(ValueError):
    """A bundle without what the planner needs, or a bad argument."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One candidate: run exit `exit` split at `partition`.

    Attributes:
      exit, exit_index: the exit and its position in execution order.
      partition: backbone cut point (device runs ``[0, p)``), ``0`` = edge-only,
        ``None`` = device-only.
      device_sig, edge_sig: signatures each side runs (None: nothing to run);
        device-only runs ``edge_sig`` of partition 0 on the device, stored in
        `device_sig`.
      device_ms, edge_ms: predicted compute times.
      up_bytes, down_bytes: activation sent to the edge and logits returned.
      loading_ms: predicted cold-start model loading (device + edge).
    """

    exit: str
    exit_index: int
    partition: int | None
    device_sig: str | None
    edge_sig: str | None
    device_ms: float
    edge_ms: float
    up_bytes: int
    down_bytes: int
    loading_ms: float = 0.0

    @property
    def remote(self) -> bool:
        return self.partition is not None

    def latency_ms(self, bandwidth_bps: float, rtt_ms: float = 0.0, cold: bool = False) -> float:
        """Predicted end-to-end latency at `bandwidth_bps` (bits per second)."""
        t = self.device_ms + (self.loading_ms if cold else 0.0)
        if self.remote:
            t += self.edge_ms + rtt_ms + transfer_ms(self.up_bytes + self.down_bytes, bandwidth_bps)
        return t

    def label(self) -> str:
        return names.plan_label(self.exit, self.partition)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's decision for one frame."""

    option: Option
    predicted_ms: float
    feasible: bool
    deadline_ms: float
    bandwidth_bps: float


def transfer_ms(nbytes: int, bandwidth_bps: float) -> float:
    """Milliseconds to move `nbytes` at `bandwidth_bps`."""
    return 0.0 if nbytes == 0 else nbytes * 8.0 / max(bandwidth_bps, 1e-9) * 1e3


def options(manifest: Mapping) -> list[Option]:
    """Every (exit, partition) candidate of a bundle, with predicted times.

    Raises:
      PlannerError: the bundle has no partitions or no latency models.
    """
    part = manifest.get("partitions")
    models = manifest.get("latency_models")
    if part is None:
        raise PlannerError("the bundle has no partitions; export it with --partitions")
    if not models or not {"device", "edge"} <= set(models):
        raise PlannerError(
            "the bundle has no device/edge latency models; fit them with export.latency_fit"
        )
    dev, edge = models["device"], models["edge"]
    model_bytes = manifest["files"][part["model"]]["bytes"]
    loading = lm.loading_ms(dev, model_bytes) + lm.loading_ms(edge, model_bytes)
    down = int(part["logits_bytes"])
    out = []
    for i, e in enumerate(part["exits"]):
        name, stop = e["name"], e["stop"]
        for p, edge_sig in e["edge"].items():
            start = names.cut_point(p)
            dev_sig = part["device"].get(p)
            out.append(
                Option(
                    name, i, start, dev_sig, edge_sig,
                    lm.signature_ms(dev, lm.path_rows(part, FINAL, 0, start)) if dev_sig else 0.0,
                    lm.signature_ms(edge, lm.path_rows(part, name, start, stop)),
                    int(part["activations"][p]["bytes"]), down, loading,
                )
            )  # fmt: skip
        whole = e["edge"]["0"]
        out.append(
            Option(name, i, None, whole, None,
                   lm.signature_ms(dev, lm.path_rows(part, name, 0, stop)), 0.0, 0, 0,
                   lm.loading_ms(dev, model_bytes))
        )  # fmt: skip
    return out


def allowed(opts: Sequence[Option], policy: str) -> list[Option]:
    """The candidates a policy may choose from."""
    if policy not in POLICIES:
        raise PlannerError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    last = max(o.exit_index for o in opts)
    keep = {
        "edgent": lambda o: True,
        "device-only": lambda o: o.exit_index == last and o.partition is None,
        "edge-only": lambda o: o.exit_index == last and o.partition == 0,
        "neurosurgeon": lambda o: o.exit_index == last,
        "right-sizing": lambda o: o.partition is None,
    }[policy]
    return [o for o in opts if keep(o)]


def plan(
    opts: Sequence[Option],
    bandwidth_bps: float,
    deadline_ms: float,
    *,
    rtt_ms: float = 0.0,
    cold: bool = False,
    margin: float = 0.0,
) -> Plan:
    """Edgent's search over `opts` (see the module docstring).

    `margin` is headroom against timing noise: an option meets the deadline if
    ``latency * (1 + margin) <= deadline`` (Edgent itself plans with margin 0).

    Raises:
      PlannerError: no options, or a non-positive bandwidth / deadline.
    """
    if not opts:
        raise PlannerError("no candidate (exit, partition) to plan with")
    if not bandwidth_bps > 0 or not deadline_ms > 0:
        raise PlannerError(
            f"bandwidth and deadline must be > 0; got {bandwidth_bps}, {deadline_ms}"
        )
    by_exit: dict[int, list[Option]] = {}
    for o in opts:
        by_exit.setdefault(o.exit_index, []).append(o)
    best_overall: tuple[float, Option] | None = None
    for idx in sorted(by_exit, reverse=True):  # deepest exit first
        lat, opt = min(
            ((o.latency_ms(bandwidth_bps, rtt_ms, cold), o) for o in by_exit[idx]),
            key=lambda t: t[0],
        )
        if lat * (1.0 + margin) <= deadline_ms:
            return Plan(opt, lat, True, deadline_ms, bandwidth_bps)
        if best_overall is None or lat < best_overall[0]:
            best_overall = (lat, opt)
    lat, opt = best_overall
    return Plan(opt, lat, False, deadline_ms, bandwidth_bps)


# -- dynamic bandwidth ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BandwidthEstimator:
    """EWMA of observed throughput with change-point detection (`observe` returns a new one).

    Attributes:
      estimate_bps: current estimate (None before the first sample).
      alpha: EWMA weight of a new sample.
      threshold: a sample off the estimate by more than this factor is a change candidate.
      confirm_rise: consecutive high samples needed to accept a rise.
      pending: consecutive high samples seen so far.
      samples, changes: counters (for the per-frame log).
    """

    estimate_bps: float | None = None
    alpha: float = 0.3
    threshold: float = 1.5
    confirm_rise: int = 2
    pending: tuple[float, ...] = ()
    samples: int = 0
    changes: int = 0

    def observe(self, sample_bps: float) -> tuple[BandwidthEstimator, bool]:
        """Adds one throughput sample; returns ``(new estimator, change point detected)``."""
        if not sample_bps > 0 or not math.isfinite(sample_bps):
            return self, False
        n = self.samples + 1
        if self.estimate_bps is None:
            return dataclasses.replace(self, estimate_bps=sample_bps, samples=n), False
        ratio = sample_bps / self.estimate_bps
        if ratio < 1.0 / self.threshold:  # a drop: trust it at once
            return dataclasses.replace(
                self, estimate_bps=sample_bps, pending=(), samples=n, changes=self.changes + 1
            ), True
        if ratio > self.threshold:
            pending = (*self.pending, sample_bps)
            if len(pending) >= self.confirm_rise:
                return dataclasses.replace(
                    self, estimate_bps=min(pending), pending=(), samples=n,
                    changes=self.changes + 1,
                ), True  # fmt: skip
            return dataclasses.replace(self, pending=pending, samples=n), False
        est = self.alpha * sample_bps + (1 - self.alpha) * self.estimate_bps
        return dataclasses.replace(self, estimate_bps=est, pending=(), samples=n), False


def bandwidth_states(
    lo_bps: float = 25e3, hi_bps: float = 20e6, per_decade: int = 8
) -> list[float]:
    """Log-spaced lower edges of the bandwidth states of the configuration map."""
    n = int(math.ceil(math.log10(hi_bps / lo_bps) * per_decade))
    return [lo_bps * 10 ** (i / per_decade) for i in range(n + 1)]


def config_map(
    opts: Sequence[Option], deadline_ms: float, *, rtt_ms: float = 0.0, margin: float = 0.0,
    states: Sequence[float] | None = None,
) -> list[tuple[float, Option]]:  # fmt: skip
    """Offline map: for each bandwidth state (lower edge), the plan at that edge."""
    states = bandwidth_states() if states is None else states
    return [(b, plan(opts, b, deadline_ms, rtt_ms=rtt_ms, margin=margin).option) for b in states]


def lookup(cmap: Sequence[tuple[float, Option]], bandwidth_bps: float) -> Option:
    """The configuration of the state `bandwidth_bps` falls in (the lowest state below it)."""
    chosen = cmap[0][1]
    for lower, opt in cmap:
        if bandwidth_bps >= lower:
            chosen = opt
    return chosen


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.planner`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(
        prog="python -m runtime.planner", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--deadline-ms", type=args_lib.positive(), required=True)
    p.add_argument("--bandwidths", default="0.05,0.1,0.25,0.5,1,1.5,2,5,10", help="Mbps list",
                   type=args_lib.number_list(args_lib.positive()))  # fmt: skip
    p.add_argument("--policy", default="edgent", choices=POLICIES)
    p.add_argument("--rtt-ms", type=args_lib.real(0.0), default=0.0)
    p.add_argument("--margin", type=args_lib.real(0.0, 10.0), default=0.0,
                   help="relative headroom")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    opts = allowed(options(Bundle.from_dir(args.bundle).manifest), args.policy)
    print(f"{'Mbps':>8}  {'plan':<24}{'predicted ms':>13}  feasible")
    for b in (mbps * 1e6 for mbps in args.bandwidths):
        pl = plan(opts, b, args.deadline_ms, rtt_ms=args.rtt_ms, margin=args.margin)
        print(f"{b / 1e6:>8.3f}  {pl.option.label():<24}{pl.predicted_ms:>13.2f}  {pl.feasible}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
