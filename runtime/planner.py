"""Edgent's online optimizer: choose the exit, the partition point and the cut's encoding.

  python -m runtime.planner --bundle=BUNDLE --deadline-ms=T [--bandwidths=0.05,0.1,...] \
      [--policy=edgent] [--encodings=float32,float16,int8]

`options` turns a bundle's partitions and latency models into every
candidate (exit, partition, encoding) with its predicted device time, edge
time, the bytes that cross the network and its accuracy. Partition ``0`` is
edge-only (the input is sent) and ``None`` is device-only (no transfer, the
whole path runs on the device, nothing is encoded). A remote option's cut
tensor travels as float32, float16 or int8 (`runtime.encoding`): its bytes
are the encoded tensor's, and its accuracy is the exit's validation accuracy
adjusted by the effect of that encoding at that cut measured at export
(``min(0, accuracy(encoding) - accuracy(float32))`` on the same validation
frames, stored per cut in the manifest's ``partitions.activations[cut].encodings``:
rounding the cut tensor cannot add information, so a measured gain, a frame
or two that happened to flip right, counts as no effect).
Bundles exported before encodings have float32 only.

`plan` is Edgent's search (TWC Algorithm 1) extended to encodings: among the
options whose predicted latency ``device_ms + edge_ms + bytes * 8 /
bandwidth + rtt_ms`` (+ loading when the models are cold) meets the
deadline, it takes the one with the highest accuracy; equal accuracy goes to
the higher agreement with the float32 path (the less lossy encoding), then to
the lowest latency. Without measured accuracies (old bundles, hand-made
options) the exit's depth stands for its accuracy (Edgent's assumption: the
deepest exit that meets the deadline, at its fastest partition). If nothing
meets the deadline the plan is the fastest option overall, flagged
``feasible=False`` (best effort).

Baselines restrict the candidates (``POLICIES``) and keep float32 interior cuts, but
send the input as a real client would, in its smallest lossless encoding
(`baseline_encodings`: uint8 pixels, not a float32 tensor 4x the size):
device-only and edge-only run the final exit on one side; ``neurosurgeon``
(partition-only) keeps the final exit and picks the partition;
``right-sizing`` (exit-only) keeps the whole path on the device and picks
the exit. Only ``edgent`` compresses interior cuts.

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
from runtime.encoding import ENCODINGS, Encoding, EncodingError
from runtime.names import FINAL

ENCODING_SEP = "+"  # plan label + encoding: ``final@p=4+int8`` (float32 is not written)

POLICIES = ("edgent", "device-only", "edge-only", "neurosurgeon", "right-sizing")


class PlannerError(ValueError):
    """A bundle without what the planner needs, or a bad argument."""


@dataclasses.dataclass(frozen=True)
class Option:
    """One candidate: run exit `exit` split at `partition`, the cut tensor sent as `encoding`.

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
      encoding: how the cut tensor travels (float32 for device-only).
      accuracy: the exit's validation accuracy adjusted by the encoding's
        measured effect at this cut (None: not measured).
      agreement: top-1 agreement with the float32 path at this cut (1.0 for float32).
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
    encoding: Encoding = Encoding()
    accuracy: float | None = None
    agreement: float = 1.0

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
        """``exit@where`` (`runtime.names.plan_label`), ``+encoding`` unless float32."""
        base = names.plan_label(self.exit, self.partition)
        if self.remote and self.encoding.name != "float32":
            return f"{base}{ENCODING_SEP}{self.encoding.name}"
        return base


def split_label(label: str) -> tuple[str, str]:
    """``(plan label, encoding name)`` of an `Option.label` (float32 when none is written)."""
    base, sep, enc = label.partition(ENCODING_SEP)
    return base, (enc if sep else "float32")


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


def cut_encodings(part: Mapping, cut: str) -> list[tuple[Encoding, dict]]:
    """``(encoding, {exit: {accuracy, agreement}})`` measured at `cut`; float32 alone if none.

    Raises:
      PlannerError: a malformed entry (a verified bundle never has one).
    """
    entries = part["activations"][cut].get("encodings")
    if not entries:
        return [(Encoding(), {})]
    try:
        return [(Encoding.from_json({k: e[k] for k in ("name", "scale", "zero_point") if k in e}),
                 dict(e["exits"])) for e in entries]  # fmt: skip
    except (EncodingError, KeyError, TypeError) as e:
        raise PlannerError(f"partitions cut {cut}: bad encodings entry ({e})") from None


def options(manifest: Mapping) -> list[Option]:
    """Every (exit, partition, encoding) candidate of a bundle, with predicted times.

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
    base_acc = {e.get("name"): e.get("val_accuracy") for e in manifest.get("exits", ())}
    out = []
    for i, e in enumerate(part["exits"]):
        name, stop = e["name"], e["stop"]
        base = base_acc.get(name)
        for p, edge_sig in e["edge"].items():
            start = names.cut_point(p)
            dev_sig = part["device"].get(p)
            shape = part["activations"][p]["shape"]
            encodings = cut_encodings(part, p)
            ref = encodings[0][1].get(name) if encodings[0][0].name == "float32" else None
            for enc, effects in encodings:
                effect = effects.get(name)
                acc, agree = base, 1.0
                if effect is not None:
                    agree = float(effect["agreement"])
                    if base is None:
                        acc = float(effect["accuracy"])
                    elif ref is not None:  # a lossy encoding never adds accuracy: a gain is luck
                        acc = base + min(0.0, float(effect["accuracy"]) - float(ref["accuracy"]))
                nbytes = enc.nbytes(shape) if "encodings" in part["activations"][p] else int(
                    part["activations"][p]["bytes"])  # fmt: skip
                out.append(
                    Option(
                        name, i, start, dev_sig, edge_sig,
                        lm.signature_ms(dev, lm.path_rows(part, FINAL, 0, start)) if dev_sig
                        else 0.0,
                        lm.signature_ms(edge, lm.path_rows(part, name, start, stop)),
                        nbytes, down, loading, enc, acc, agree,
                    )
                )  # fmt: skip
        whole = e["edge"]["0"]
        out.append(
            Option(name, i, None, whole, None,
                   lm.signature_ms(dev, lm.path_rows(part, name, 0, stop)), 0.0, 0, 0,
                   lm.loading_ms(dev, model_bytes), Encoding(), base, 1.0)
        )  # fmt: skip
    return out


def with_encodings(opts: Sequence[Option], allowed_names: Sequence[str]) -> list[Option]:
    """The options whose cut travels in one of `allowed_names` (device-only always stays).

    Raises:
      PlannerError: an unknown encoding name.
    """
    bad = [n for n in allowed_names if n not in ENCODINGS]
    if bad:
        raise PlannerError(f"unknown encoding {bad[0]!r}; valid: {', '.join(ENCODINGS)}")
    return [o for o in opts if not o.remote or o.encoding.name in allowed_names]


def baseline_encodings(opts: Sequence[Option]) -> list[Option]:
    """The options a baseline may send: interior cuts as float32; the input losslessly.

    A real client sends its camera frame as the pixels it has (uint8), not as the float32
    tensor the network reads: at partition 0 a baseline takes, per exit, the smallest
    encoding whose measured effect there is nil (agreement with float32 1.0 and no accuracy
    lost; for an input in [0, 1] calibrated on frames that reach both ends, int8 with scale
    1/255 *is* the uint8 frame: the same pixels, to float32 rounding). Without measured
    encodings: float32.
    Interior cuts stay float32 (compressing them is Edgent's extension, not the baselines').
    """
    out = [o for o in opts if o.encoding.name == "float32" and o.partition != 0]
    by_exit: dict[str, list[Option]] = {}
    for o in opts:
        if o.partition == 0:
            by_exit.setdefault(o.exit, []).append(o)
    for group in by_exit.values():
        ref = next((o for o in group if o.encoding.name == "float32"), None)
        lossless = [o for o in group if o.agreement >= 1.0
                    and (ref is None or o.accuracy == ref.accuracy)]  # fmt: skip
        if lossless:
            out.append(min(lossless, key=lambda o: (o.up_bytes, o.encoding.name != "float32")))
    order = {id(o): i for i, o in enumerate(opts)}
    return sorted(out, key=lambda o: order[id(o)])


def allowed(opts: Sequence[Option], policy: str) -> list[Option]:
    """The candidates a policy may choose from."""
    if policy not in POLICIES:
        raise PlannerError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
    last = max(o.exit_index for o in opts)
    if policy != "edgent":  # the baselines send float32 cut tensors, the input as a client would
        opts = baseline_encodings(opts)
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
    Among those, the highest accuracy wins, then the highest agreement with
    float32, then the lowest latency (options without a measured accuracy
    rank by exit depth instead); among equals, the first in `opts`.

    Raises:
      PlannerError: no options, or a bandwidth / deadline that is not > 0 (NaN included).
    """
    if not opts:
        raise PlannerError("no candidate (exit, partition) to plan with")
    if not bandwidth_bps > 0 or not deadline_ms > 0:
        raise PlannerError(
            f"bandwidth and deadline must be > 0; got {bandwidth_bps}, {deadline_ms}"
        )
    measured = all(o.accuracy is not None for o in opts)
    lats = [o.latency_ms(bandwidth_bps, rtt_ms, cold) for o in opts]
    best: tuple[tuple, float, Option] | None = None
    fastest: tuple[float, Option] | None = None
    for lat, o in zip(lats, opts):
        if fastest is None or lat < fastest[0]:
            fastest = (lat, o)
        if lat * (1.0 + margin) <= deadline_ms:
            key = (o.accuracy if measured else o.exit_index, o.agreement, -lat)
            if best is None or key > best[0]:
                best = (key, lat, o)
    if best is not None:
        return Plan(best[2], best[1], True, deadline_ms, bandwidth_bps)
    lat, opt = fastest
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


@dataclasses.dataclass(frozen=True)
class ComputeDrift:
    """How much slower (or faster) than profiled the device and the edge compute, learned online.

    The latency models are fitted on a profile taken once; a device that
    heats up and throttles, or an edge box or host that other work loads, then
    computes slower than the profile says, and a planner trusting the profile
    misses deadlines it planned to meet. Like the bandwidth, which the client
    learns from its own transfers, the compute speed of each side is learned
    from its own calls: every frame's measured device time (and the edge's
    reported compute time) over what the models predicted for that call is a
    sample; each side keeps an EWMA of its samples (`alpha`), clamped to
    [`lo`, `hi`], and `scaled` multiplies the options' predicted compute by it.
    Calls predicted under `min_ms` are not samples (their ratio is timer noise).

    Attributes:
      device, edge: the current factors (1.0: as profiled).
      samples: ``(device samples, edge samples)`` so far.
    """

    device: float = 1.0
    edge: float = 1.0
    alpha: float = 0.3
    lo: float = 0.25
    hi: float = 8.0
    min_ms: float = 0.05
    samples: tuple[int, int] = (0, 0)

    def observe(self, side: str, predicted_ms: float, measured_ms: float) -> ComputeDrift:
        """Adds one call of `side` (``device`` / ``edge``); returns the new state.

        A non-finite, non-positive or tiny prediction, or a non-finite or
        negative measurement, is not a sample (the state is returned as is).

        Raises:
          ValueError: `side` is neither ``device`` nor ``edge``.
        """
        if side not in ("device", "edge"):
            raise ValueError(f"side must be 'device' or 'edge'; got {side!r}")
        if not (math.isfinite(predicted_ms) and predicted_ms >= self.min_ms):
            return self
        if not (math.isfinite(measured_ms) and measured_ms >= 0):
            return self
        ratio = min(max(measured_ms / predicted_ms, self.lo), self.hi)
        i = 0 if side == "device" else 1
        old = self.device if i == 0 else self.edge
        value = (1 - self.alpha) * old + self.alpha * ratio  # the profile is the prior
        counts = (self.samples[0] + (i == 0), self.samples[1] + (i == 1))
        return dataclasses.replace(self, samples=counts, **{side: value})

    def scaled(self, opts: Sequence[Option]) -> list[Option]:
        """`opts` with device and edge compute times multiplied by the current factors."""
        return [dataclasses.replace(o, device_ms=o.device_ms * self.device,
                                    edge_ms=o.edge_ms * self.edge) for o in opts]  # fmt: skip


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
    p.add_argument("--encodings", default=",".join(ENCODINGS),
                   help="comma-separated, of float32, float16, int8")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    wanted = [t.strip() for t in args.encodings.split(",")]
    opts = options(Bundle.from_dir(args.bundle).manifest)
    opts = allowed(with_encodings(opts, wanted), args.policy)
    print(f"{'Mbps':>8}  {'plan':<26}{'encoding':<10}{'bytes up':>9}{'predicted ms':>13}"
          f"{'accuracy':>10}  feasible")  # fmt: skip
    for b in (mbps * 1e6 for mbps in args.bandwidths):
        pl = plan(opts, b, args.deadline_ms, rtt_ms=args.rtt_ms, margin=args.margin)
        o = pl.option
        enc = o.encoding.name if o.remote else "-"
        acc = "-" if o.accuracy is None else f"{o.accuracy:.4f}"
        print(f"{b / 1e6:>8.3f}  {o.label():<26}{enc:<10}{o.up_bytes:>9}{pl.predicted_ms:>13.2f}"
              f"{acc:>10}  {pl.feasible}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
