"""The device side of Edgent co-inference: plan, run ``[0, p)``, send, receive, log.

  python -m runtime.coinfer --bundle=BUNDLE --edge=HOST:PORT[,HOST:PORT...] \\
      --deadline-ms=T --bandwidth=MBPS|TRACE.csv --frames=N --json=OUT \\
      [--policy=edgent|device-only|edge-only|neurosurgeon|right-sizing] [--margin=0.1] \\
      [--device=local:threads=1:slowdown=S] [--data=mnist5k:test] [--token=...] [--tls-ca=PEM]
      [--exit=NAME]

Per frame: the planner (`runtime.planner`) picks the exit and partition for
the current bandwidth estimate; the device runs ``dev_pNN`` on its (slowed,
`runtime.profile.Target`) interpreter, sends the activation to an edge server
(`runtime.edge_server`, over the Open Inference Protocol: `runtime.oip`; the
cut tensor travels in the plan's encoding, float32 / float16 / int8) and
receives the exit's logits. The per-frame log
records the plan, predicted and measured latency, their parts, the exit, the
prediction and whether it was correct.

**Device time is virtual** (`runtime.profile`, ``clock=virtual``): a device
call's time is S x the CPU time it consumed here, and the frame is timed on a
`runtime.profile.Timeline` that device calls advance by that virtual time.
A frame's measured latency (and its deadline accounting, and the bandwidth
trace's clock) is therefore virtual device time + real (emulated-link)
transfer time + real edge time.

**Emulated bandwidth** (shaping in the transport). Client and servers talk
over real gRPC on this machine, whose own transfer time is near zero, so the
client's `Link` stretches every message: before a request of ``n`` bytes
goes out it waits ``n * 8 / B(t)`` seconds, and the same for the response
when it arrives, where ``B(t)`` is ``--bandwidth`` (a constant in Mbps) or a
trace (CSV rows ``t_s,mbps``: from second ``t_s`` on, the link runs at
``mbps``; the last row holds). Each device has its own link (as devices on
separate radio links do). The planner never reads ``B(t)``: it sees only the
throughput of real transfers: ``bytes * 8 / (network time - base RTT)``,
where network time is the RPC's wall time minus the server's reported compute
time and the base RTT is the smallest round trip of the start-up pings (their
median is what the planner adds to a remote plan; a reply whose
reported compute time exceeds the call's wall time is used, but its timing
is not). A transfer that would outlast its call's timeout (a tiny bandwidth)
waits out the timeout and falls back; every RPC timeout is clamped to
[1 ms, `MAX_CALL_S`], so no deadline or bandwidth can hang the client. When frames run on
the device only, a probe is sent every ``--probe-every`` frames, between
frames, so a rising bandwidth is noticed; a probe is sized to last ~20 ms at
the current estimate (at least ``--probe-bytes``, at most 64 kB:
`probe_size`), and six of them measure the link at start-up.

**Compute drift** (`runtime.planner.ComputeDrift`; ``--static-compute`` turns it
off). The latency models come from one profile; a device that throttles, or a
host that other work loads (shared caches and memory bandwidth slow even the
CPU time of a call), computes slower than profiled. The client learns each
side's factor from its own calls, as it learns the bandwidth from its own
transfers: measured device time (and the edge's reported compute time) over
the profile's prediction for that call, an EWMA clamped to [0.25, 8]; the
planner's options (and the configuration map) are rescaled once a factor
moves by more than 5%. Each frame's log has the factors it was planned with
(``device_factor``, ``edge_factor``); the report the final ones
(``compute_drift``).

**Fallback.** A dead or unreachable server, an RPC exceeding its timeout
(the deadline's remaining budget, at least twice the predicted edge time), a
reply that fails validation (another model or request id, shape, datatype,
non-finite values, a bad server time, garbage bytes) or a server that runs
another bundle: the frame's remaining path runs locally on the device, the
frame still gets an answer and the log says why. The failing server is
skipped for ``--cooldown-s``; one that runs another bundle (every request
carries the expected bundle digest and every reply is checked against it, so
a server restarted with another bundle is caught on its first reply) is
skipped for the rest of the run. With several
``--edge`` servers, frames are spread round-robin over the healthy ones.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence

import grpc
import numpy as np

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import data as data_lib
from runtime import latency_model as lm
from runtime import oip, planner
from runtime.bundle import Bundle
from runtime.encoding import Encoding
from runtime.profile import Target, Timeline

DEFAULT_MAX_MESSAGE = 4 * 1024 * 1024


class EdgeFailure(RuntimeError):
    """One edge call failed; the message says why (used as the fallback reason)."""


MAX_CALL_S = 60.0  # no RPC waits longer, whatever a deadline or a bandwidth says


def clamp_timeout(seconds: float) -> float:
    """An RPC timeout from any float: NaN, negative, tiny or infinite are clamped."""
    return min(max(seconds, 1e-3), MAX_CALL_S) if seconds == seconds else 1e-3


# -- emulated link ------------------------------------------------------------------------------


class Link:
    """The link a client's messages cross: emulated (constant or a ``t_s,mbps`` trace, see the
    module doc) or ``real``: the kernel carries them (`runtime.netlink`: namespaces, tc)."""

    def __init__(self, times: Sequence[float], mbps: Sequence[float], source: str,
                 real: bool = False):  # fmt: skip
        self.times = np.asarray(times, np.float64)
        self.bps = np.asarray(mbps, np.float64) * 1e6
        self.source = source
        self.real = real
        # On a real link t_s is the machine's monotonic clock (time.perf_counter, shared by
        # every process), so the shaper's log of rates can be matched with the frames. An
        # emulated link is read on the co-inference client's clock (it sets `now` to its
        # Timeline: device calls advance it by their virtual device time).
        self.now = time.perf_counter
        self.t0 = 0.0 if real else self.now()

    @staticmethod
    def parse(spec: str) -> Link:
        """``--bandwidth``: a positive number of Mbps, a CSV trace path, or ``real``.

        ``real``: no emulation at all (the rate is the network's, unknown here: NaN).

        Raises:
          ValueError / FileNotFoundError: one line naming the problem.
        """
        if spec == "real":
            return Link([0.0], [math.nan], "real link (not emulated)", real=True)
        try:
            value = float(spec)
        except ValueError:
            return Link._trace(spec)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--bandwidth must be > 0 Mbps or a trace file; got {spec!r}")
        return Link([0.0], [value], f"{value} Mbps")

    @staticmethod
    def _trace(path: str) -> Link:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"bandwidth trace {path} does not exist (or give Mbps)")
        times, mbps = [], []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#") or (n == 1 and line[0].isalpha()):
                    continue
                parts = line.split(",")
                try:
                    t, b = float(parts[0]), float(parts[1])
                    if len(parts) != 2:
                        raise ValueError
                except (ValueError, IndexError):
                    raise ValueError(
                        f"{path} line {n}: expected 't_s,mbps', got {line!r}"
                    ) from None
                if not (math.isfinite(t) and math.isfinite(b) and t >= 0 and b > 0):
                    raise ValueError(f"{path} line {n}: need t_s >= 0 and mbps > 0, got {line!r}")
                if times and t <= times[-1]:
                    raise ValueError(
                        f"{path} line {n}: times must increase ({t} after {times[-1]})"
                    )
                times.append(t)
                mbps.append(b)
        if not times or times[0] != 0:
            raise ValueError(f"bandwidth trace {path} must start at t_s = 0")
        return Link(times, mbps, path)

    def restart(self) -> None:
        if not self.real:
            self.t0 = self.now()

    def bandwidth_bps(self) -> float:
        """The link's bandwidth now (for shaping and for the log, never for planning)."""
        if self.real:
            return math.nan
        t = self.now() - self.t0
        return float(self.bps[max(0, int(np.searchsorted(self.times, t, side="right")) - 1)])

    def transmit(self, nbytes: int, limit_s: float = MAX_CALL_S) -> None:
        """Holds a message of `nbytes` for as long as the link needs to carry it.

        A real link (``--bandwidth=real``) is not emulated: nothing is held.

        Raises:
          EdgeFailure: it would take longer than `limit_s` (the call's timeout, at most
            `MAX_CALL_S`): the link is held that long, as a real one would time out.
        """
        if self.real:
            return
        need = nbytes * 8.0 / self.bandwidth_bps()
        limit = clamp_timeout(limit_s)
        if not need <= limit:
            time.sleep(limit)
            raise EdgeFailure(f"link: {nbytes} bytes need {need:.3g} s at "
                              f"{self.bandwidth_bps() / 1e6:.3g} Mbps, over the {limit:.3g} s "
                              "timeout")  # fmt: skip
        time.sleep(need)


# -- edge servers ---------------------------------------------------------------------------------


@dataclasses.dataclass
class _Edge:
    address: str
    channel: grpc.Channel
    stub: oip.Stub
    down_until: float = 0.0
    calls: int = 0
    failures: int = 0
    compatible: bool = True


@dataclasses.dataclass(frozen=True)
class Ping:
    """One probe's outcome: bytes the server received, bytes of its reply, wall seconds."""

    received: int
    reply_bytes: int
    wall_s: float


class EdgePool:
    """Open Inference Protocol channels to edge servers, used round-robin over the healthy ones.

    Every request carries the expected bundle `digest`; every reply is checked
    against it (and against its request): a server that runs another bundle is
    marked incompatible on its first reply and never used again in this run.
    """

    def __init__(
        self,
        addresses: Sequence[str],
        *,
        token: str | None = None,
        tls_ca: bytes | None = None,
        tls_server_name: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE,
        cooldown_s: float = 2.0,
        digest: str | None = None,
    ):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        self.metadata = oip.bearer(token) if token else ()
        self.cooldown_s = cooldown_s
        self.digest = digest
        self.min_rtt_s = 0.0  # the smallest start-up round trip (`connect`)
        self.edges: list[_Edge] = []
        for addr in addresses:
            if tls_ca is not None:
                ch = grpc.secure_channel(addr, grpc.ssl_channel_credentials(tls_ca), options)
            else:
                ch = grpc.insecure_channel(addr, options)
            self.edges.append(_Edge(addr, ch, oip.Stub(ch)))
        self._next = 0
        self._ids = itertools.count()

    def close(self) -> None:
        for e in self.edges:
            e.channel.close()

    def request(self, model: str, x: np.ndarray, encoding: Encoding | None = None,
                request_id: int | None = None):  # fmt: skip
        """A ModelInfer request for `model` carrying `x` in `encoding` and the digest."""
        rid = str(next(self._ids) if request_id is None else request_id)
        return oip.infer_request(model, x, encoding or Encoding(), request_id=rid,
                                 digest=self.digest)  # fmt: skip

    def probe_request(self, nbytes: int = 0):
        return oip.probe_request(nbytes, request_id=f"p{next(self._ids)}", digest=self.digest)

    def _call(self, edge: _Edge, request, out_shape, timeout_s: float):
        """One ModelInfer: ``(tensor, server_ms, reply bytes)``. Raises EdgeFailure."""
        try:
            reply = edge.stub.ModelInfer(request, timeout=clamp_timeout(timeout_s),
                                         metadata=self.metadata)  # fmt: skip
            y, server_ms = oip.read_output(
                reply, model=request.model_name, request_id=request.id, digest=self.digest,
                shape=out_shape, output=oip.PROBE_OUTPUT if out_shape is None else oip.OUTPUT,
            )  # fmt: skip
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION:  # it named another bundle
                edge.compatible = False
                raise EdgeFailure(f"{edge.address} serves another bundle: {e.details()}") from None
            raise EdgeFailure(f"{edge.address}: {e.code().name}: {e.details()}") from None
        except oip.ProtocolError as e:
            if str(e).startswith("serves another bundle"):
                edge.compatible = False
            raise EdgeFailure(f"{edge.address}: bad reply: {e}") from None
        except (ValueError, TypeError, IndexError, KeyError, OverflowError) as e:
            # Whatever else a reply can make the checks trip on: still this frame's problem,
            # never the run's.
            raise EdgeFailure(f"{edge.address}: bad reply: {type(e).__name__}: {e}") from None
        return y, server_ms, reply.ByteSize()

    def ping(self, edge: _Edge, request=None, timeout_s: float = 2.0) -> Ping:
        """One probe (`request`: from `probe_request`, default empty). Raises EdgeFailure."""
        request = request if request is not None else self.probe_request()
        t0 = time.perf_counter()
        y, _, nbytes = self._call(edge, request, None, timeout_s)
        return Ping(int(y[0]), nbytes, time.perf_counter() - t0)

    def connect(self, bundle_digest: str, pings: int = 5) -> tuple[float, list[str]]:
        """Probes every server: same bundle? Returns (median base RTT s, problems).

        The smallest round trip is kept too (``min_rtt_s``): what a transfer's time is
        corrected by (a median taken at a busy moment would leave a frame's transfer
        too short and its throughput sample too high).
        """
        self.digest = bundle_digest
        rtts, problems = [], []
        for e in self.edges:
            try:
                for _ in range(pings):
                    rtts.append(self.ping(e).wall_s)
            except EdgeFailure as f:
                if e.compatible:
                    e.down_until = time.perf_counter() + self.cooldown_s
                problems.append(str(f))
        self.min_rtt_s = float(min(rtts)) if rtts else 0.0
        return (float(np.median(rtts)) if rtts else 0.0), problems

    def pick(self) -> _Edge | None:
        """The next healthy server (round-robin), or None when none is."""
        now = time.perf_counter()
        for k in range(len(self.edges)):
            e = self.edges[(self._next + k) % len(self.edges)]
            if e.compatible and e.down_until <= now:
                self._next = (self._next + k + 1) % len(self.edges)
                return e
        return None

    def infer(self, edge: _Edge, request, out_shape, timeout_s: float):
        """One inference: ``(logits, server_ms, reply bytes)``. Raises EdgeFailure."""
        edge.calls += 1
        try:
            return self._call(edge, request, tuple(out_shape), timeout_s)
        except EdgeFailure:
            self._fail(edge)
            raise

    def _fail(self, edge: _Edge) -> None:
        edge.failures += 1
        edge.down_until = time.perf_counter() + self.cooldown_s


# -- the co-inference loop ----------------------------------------------------------------------


def _encoding(opt: planner.Option) -> Encoding:
    """The cut tensor's encoding the plan chose (float32 for plans without one)."""
    enc = getattr(opt, "encoding", None)
    if enc is None:
        return Encoding()
    return enc if isinstance(enc, Encoding) else Encoding.from_json(enc)


def _exact_sizes(
    opts: Sequence[planner.Option], part: Mapping, digest: str = "0" * 64
) -> list[planner.Option]:
    """Options whose byte counts are the real request / reply sizes on the wire."""
    out = []
    for o in opts:
        if not o.remote:
            out.append(o)
            continue
        shape = part["activations"][str(o.partition)]["shape"]
        req = oip.infer_request(o.edge_sig, np.zeros(shape, np.float32), _encoding(o),
                                request_id="999999", digest=digest)  # fmt: skip
        y = np.zeros((1, part["logits_bytes"] // 4), np.float32)
        resp = oip.infer_response(req, y, digest=digest, server_ms=0.12345678901234)
        out.append(dataclasses.replace(o, up_bytes=req.ByteSize(), down_bytes=resp.ByteSize()))
    return out


PROBE_S = 0.02  # a probe lasts about this long at the current bandwidth estimate
MAX_PROBE_BYTES = 64 * 1024
START_PROBES = 6  # at start-up, before the first frame
MIN_SAMPLE_S = 0.005  # a frame's transfer shorter than this (at the estimate) is no sample


def probe_size(estimate_bps: float | None, floor: int, target_s: float = PROBE_S,
               cap: int = MAX_PROBE_BYTES) -> int:  # fmt: skip
    """Bytes of the next probe: ``target_s`` of transfer at the estimate, in [floor, cap].

    A probe must outlast the RTT's jitter to measure a fast link (1 kB at 20 Mbps is
    0.4 ms, less than the jitter of a loaded machine's RPC), but must stay short on a
    slow one; sizing it by the current estimate does both, and a rise is followed up
    probe by probe (the estimator confirms it before the next one grows).
    """
    if not estimate_bps or not math.isfinite(estimate_bps) or estimate_bps <= 0:
        return int(floor)
    return int(min(max(floor, estimate_bps * target_s / 8.0), max(cap, floor)))


class CoInference:
    """The device client: planner state, device interpreter, edge pool and link."""

    def __init__(self, bundle: Bundle, pool: EdgePool, link: Link, *, deadline_ms: float,
                 policy: str = "edgent", margin: float = 0.1, device: Target | None = None,
                 probe_every: int = 10, probe_bytes: int = 1024,
                 exit_name: str | None = None, adapt: bool = True):  # fmt: skip
        m = bundle.manifest
        self.part = m.get("partitions")
        every = planner.options(m)
        if exit_name:  # the policy restricted to one exit (its baselines "at the same exit")
            every = [o for o in every if o.exit == exit_name]
            if not every:
                names_ = sorted({e["name"] for e in self.part["exits"]})
                raise ValueError(f"--exit {exit_name!r} is not an exit; valid: {names_}")
        self.opts = planner.allowed(every, policy)
        self.opts = _exact_sizes(self.opts, self.part, bundle.digest)
        spec = m["latency_models"]["device"]["target"]
        self.device = device or Target(
            spec["kind"], spec["threads"], spec["slowdown"], spec=spec["spec"],
            clock=spec.get("clock", "virtual"),
        )  # fmt: skip
        # Frames are timed on the emulated clock: device calls advance it by their
        # (virtual) device time, transfers and the edge by real time (runtime.profile).
        self.clock = Timeline()
        if not link.real:  # a real link's schedule runs on the machine's clock
            link.now = self.clock.now

        # Model loading on the device, measured as runtime.profile does: interpreter
        # creation + allocation + first run of one signature, on the device's clock.
        def load():
            model = bundle.load_partitions(self.device.threads)
            first = model.signature(self.opts[0].device_sig or self.opts[0].edge_sig)
            first(np.zeros(first.input_shape, np.float32))
            return model

        self.model, loading_s = self.clock.measure(self.device, load)
        self.loading_ms = loading_s * 1e3
        for o in self.opts:  # then warm every signature this policy can use
            for name in (o.device_sig, o.edge_sig):
                if name:
                    sig = self.model.signature(name)
                    sig(np.zeros(sig.input_shape, np.float32))
        self.pool, self.link = pool, link
        self.deadline_ms, self.margin, self.policy = deadline_ms, margin, policy
        self.out_shape = (1, bundle.num_classes)
        self.estimator = planner.BandwidthEstimator()
        # Compute drift (planner.ComputeDrift): the options as profiled, and as now believed.
        self.drift = planner.ComputeDrift() if adapt else None
        self.profiled = self.opts
        self._believed = (1.0, 1.0)  # the factors self.opts and self.cmap were built with
        self.rtt_s = self.min_rtt_s = 0.0
        self.cmap: list = []
        self.probe_every, self.probe_bytes = probe_every, probe_bytes
        self._since_sample = 0

    def start(self, rtt_s: float, min_rtt_s: float | None = None) -> None:
        """Builds the configuration map for base RTT `rtt_s` and probes the link.

        `min_rtt_s` (default `rtt_s`): the smallest round trip seen, which throughput
        samples are corrected by.

        `START_PROBES` probes, each sized by the estimate so far (`probe_size`), so a
        fast link is seen as fast before the first frame (a 1 kB probe alone reads
        mostly RTT jitter: at 20 Mbps its transfer is 0.4 ms).
        """
        self.rtt_s = rtt_s
        self.min_rtt_s = rtt_s if min_rtt_s is None else min(min_rtt_s, rtt_s)
        self.cmap = planner.config_map(self.opts, self.deadline_ms, rtt_ms=self.rtt_s * 1e3,
                                       margin=self.margin)  # fmt: skip
        self.link.restart()
        for _ in range(START_PROBES):
            self.probe()

    def probe(self) -> None:
        """Sends a probe (`probe_size` at the current estimate) to measure the link's throughput."""
        edge = self.pool.pick()
        if edge is None:
            return
        nbytes = probe_size(self.estimator.estimate_bps, self.probe_bytes)
        request = self.pool.probe_request(nbytes)
        t0 = time.perf_counter()
        try:
            self.link.transmit(request.ByteSize(), 2.0)
            ping = self.pool.ping(edge, request)
            self.link.transmit(ping.reply_bytes, 2.0)
        except EdgeFailure:
            self.pool._fail(edge)
            return
        self._observe(request.ByteSize() + ping.reply_bytes, time.perf_counter() - t0)

    def _observe(self, nbytes: int, network_s: float) -> bool:
        sample = nbytes * 8.0 / max(network_s - self.min_rtt_s, 1e-5)
        self.estimator, changed = self.estimator.observe(sample)
        self._since_sample = 0
        return changed

    def _follow_drift(self) -> None:
        """Rescales the options (and rebuilds the map) once a factor moved by more than 5%."""
        if self.drift is None:
            return
        now = (self.drift.device, self.drift.edge)
        if all(abs(a / b - 1.0) <= 0.05 for a, b in zip(now, self._believed)):
            return
        self._believed = now
        self.opts = self.drift.scaled(self.profiled)
        self.cmap = planner.config_map(self.opts, self.deadline_ms, rtt_ms=self.rtt_s * 1e3,
                                       margin=self.margin)  # fmt: skip

    def choose(self, changed: bool) -> tuple[planner.Option, float, bool, str]:
        """(option, predicted ms, feasible, how) for the current estimate."""
        self._follow_drift()
        bw = self.estimator.estimate_bps or 1e3
        rtt_ms = self.rtt_s * 1e3
        if changed and self.policy == "edgent":  # sharp change: the offline configuration map
            o = planner.lookup(self.cmap, bw)
            lat = o.latency_ms(bw, rtt_ms)
            return o, lat, lat * (1 + self.margin) <= self.deadline_ms, "map"
        pl = planner.plan(self.opts, bw, self.deadline_ms, rtt_ms=rtt_ms, margin=self.margin)
        return pl.option, pl.predicted_ms, pl.feasible, "regression"

    def frame(self, i: int, x: np.ndarray, label: int, changed: bool) -> tuple[dict, bool]:
        """Runs one frame; returns its log row and whether a bandwidth change was detected."""
        true_bw = self.link.bandwidth_bps()
        est = self.estimator.estimate_bps
        opt, predicted, feasible, how = self.choose(changed)
        rtt_ms = self.rtt_s * 1e3
        transfer = planner.transfer_ms(opt.up_bytes + opt.down_bytes, est or 1e3) + rtt_ms
        row = {"frame": i, "true_mbps": true_bw / 1e6, "est_mbps": (est or 0) / 1e6,
               "exit": opt.exit, "partition": opt.partition, "plan": opt.label(), "how": how,
               "feasible": feasible, "predicted_ms": predicted,
               "predicted_transfer_ms": transfer if opt.remote else 0.0,
               "fallback": None, "edge": None}  # fmt: skip
        # The factors this plan was made with, and what the profile alone predicts for the
        # option's compute (the drift samples): the options are the profile's x the factors.
        device_factor, edge_factor = self._believed
        if self.drift is not None:
            row.update(device_factor=device_factor, edge_factor=edge_factor)
        now = self.clock.now
        t0 = now()
        h = np.ascontiguousarray(x[None], np.float32)
        new_change = False
        if not opt.remote:
            logits, _ = self.clock.run(self.device, self.model.signature(opt.device_sig), h)
            row.update(device_ms=(now() - t0) * 1e3, edge_ms=0.0, network_ms=0.0)
        else:
            if opt.device_sig:
                h, _ = self.clock.run(self.device, self.model.signature(opt.device_sig), h)
            t1 = now()
            row["device_ms"] = (t1 - t0) * 1e3
            logits, new_change = self._remote(i, opt, h, row, t0)
        if self.drift is not None:
            if opt.device_sig:
                self.drift = self.drift.observe("device", opt.device_ms / device_factor,
                                                row["device_ms"])  # fmt: skip
            if opt.remote and row["fallback"] is None and row.get("edge_timed", True):
                self.drift = self.drift.observe("edge", opt.edge_ms / edge_factor, row["edge_ms"])
        total = (now() - t0) * 1e3
        self._since_sample += 1
        pred = int(np.asarray(logits).argmax())
        row.update(measured_ms=total, met=total <= self.deadline_ms, prediction=pred,
                   label=int(label), correct=pred == int(label))  # fmt: skip
        row["error_ms"] = total - predicted
        row["within_bound"] = abs(total - predicted) <= 1.0 + row["predicted_transfer_ms"]
        if self._since_sample >= self.probe_every:
            self.probe()  # between frames: not part of any frame's latency
        return row, new_change

    def _remote(self, i, opt, h, row, t0) -> tuple[np.ndarray, bool]:
        request = self.pool.request(opt.edge_sig, h, _encoding(opt), i)
        up = request.ByteSize()
        edge = self.pool.pick()
        if edge is None:
            row["fallback"] = "no healthy edge server"
        else:
            row["edge"] = edge.address
            spent = (self.clock.now() - t0) * 1e3
            fallback_ms = self.device.slowdown * opt.edge_ms
            budget = self.deadline_ms - spent - fallback_ms
            timeout_s = clamp_timeout(max(budget, 2 * opt.edge_ms + 5.0) / 1e3 + 0.02)
            t1 = time.perf_counter()
            try:
                self.link.transmit(up, timeout_s)
                left = timeout_s - (time.perf_counter() - t1)
                y, server_ms, down = self.pool.infer(edge, request, self.out_shape, left)
                self.link.transmit(down, timeout_s - (time.perf_counter() - t1))
                wall_s = time.perf_counter() - t1
                network_s = wall_s - server_ms / 1e3
                row.update(edge_ms=server_ms, network_ms=max(network_s, 0.0) * 1e3,
                           edge_timed=network_s > 0)  # fmt: skip
                # A server reporting more compute than the whole call took is wrong (or
                # lying): its answer is checked and used, its timing is not.
                # A transfer shorter than the RTT it is corrected by is RTT noise, not a
                # throughput sample (a 784 B frame at 5 Mbit/s is 1.3 ms; subtracting a
                # start-up RTT taken on a busier moment can leave microseconds, i.e. a
                # "900 Mbit/s" sample). The sized probes measure such links instead.
                # Likewise a transfer expected to last under MIN_SAMPLE_S at the current
                # estimate: the RPC's own jitter on a loaded host is of that order.
                est = self.estimator.estimate_bps
                long_enough = not est or (up + down) * 8.0 / est >= MIN_SAMPLE_S
                row["bw_sample"] = network_s > 0 and network_s >= 2.0 * self.rtt_s and long_enough
                if not row["bw_sample"]:
                    return y, False
                return y, self._observe(up + down, network_s)
            except EdgeFailure as f:
                row["fallback"] = str(f)
        t2 = self.clock.now()
        y, rest_s = self.clock.run(self.device, self.model.signature(opt.edge_sig), h)
        row.update(edge_ms=0.0, network_ms=(t2 - t0) * 1e3 - row["device_ms"],
                   local_rest_ms=rest_s * 1e3)  # fmt: skip
        return y, False


def summarize(rows: Sequence[Mapping], deadline_ms: float) -> dict:
    """Deadline met rate, accuracy, latency stats, prediction error and plan histogram."""
    ms = np.array([r["measured_ms"] for r in rows])
    err = np.array([r["error_ms"] for r in rows])
    plans: dict[str, int] = {}
    for r in rows:
        plans[r["plan"]] = plans.get(r["plan"], 0) + 1
    return {
        "frames": len(rows),
        "deadline_ms": deadline_ms,
        "deadline_met": float(np.mean([r["met"] for r in rows])),
        # Misses by plan: device-only frames miss only when the device itself ran late.
        "missed_remote": int(sum(not r["met"] and r["partition"] is not None for r in rows)),
        "missed_device_only": int(sum(not r["met"] and r["partition"] is None for r in rows)),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "mean_ms": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_abs_error_ms": float(np.abs(err).mean()),
        "within_1ms_plus_transfer": float(np.mean([r["within_bound"] for r in rows])),
        "infeasible_frames": int(sum(not r["feasible"] for r in rows)),
        "fallbacks": int(sum(r["fallback"] is not None for r in rows)),
        "plans": plans,
        "mean_exit_index": None,
    }


@dataclasses.dataclass(frozen=True)
class Options:
    """One co-inference run (the flags of ``python -m runtime.coinfer``, typed).

    `edges` are ``HOST:PORT`` addresses; `bandwidth` is Mbps (``"2"``) or a CSV
    trace path; `device` a `Target` spec (None: the target the bundle's device
    latency model was fitted on); `tls_ca` a PEM file that enables TLS.
    """

    bundle: str
    edges: tuple[str, ...]
    deadline_ms: float
    bandwidth: str
    frames: int = 100
    data: str = "mnist5k:test"
    policy: str = "edgent"
    margin: float = 0.1
    device: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_server_name: str | None = None
    cooldown_s: float = 2.0
    probe_every: int = 10
    probe_bytes: int = 1024
    exit: str | None = None  # restrict every policy to this exit (None: all exits)
    adapt: bool = True  # learn the compute drift of device and edge (planner.ComputeDrift)


def run(opts: Options) -> dict:
    """Runs `opts.frames` frames through the device client and the edge servers.

    Returns:
      The report: settings, per-edge call counts, base RTT, loading time, the
      `summarize` summary and the per-frame log (``frames``).

    Raises:
      ValueError / FileNotFoundError: bad options; BundleError: a bad bundle;
      RuntimeError: no usable edge server for a policy that needs one.
    """
    if not (math.isfinite(opts.deadline_ms) and opts.deadline_ms > 0) or opts.frames < 1:
        raise ValueError(f"--deadline-ms must be finite and > 0 and --frames >= 1; got "
                         f"{opts.deadline_ms} and {opts.frames}")  # fmt: skip
    if not 0 <= opts.margin < 1:
        raise ValueError(f"--margin must be in [0, 1); got {opts.margin}")
    if opts.policy not in planner.POLICIES:
        raise ValueError(f"unknown policy {opts.policy!r}; valid: {', '.join(planner.POLICIES)}")
    link = Link.parse(opts.bandwidth)
    bundle = Bundle.from_dir(opts.bundle)

    frames = data_lib.load(opts.data, bundle.manifest)
    addresses = [a.strip() for a in opts.edges if a.strip()]
    if not addresses:
        raise ValueError("--edge needs at least one HOST:PORT")
    for a in addresses:
        host, _, port = a.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--edge {a!r} is not HOST:PORT")
    tls_ca = None
    if opts.tls_ca:
        with open(opts.tls_ca, "rb") as f:
            tls_ca = f.read()
    device = Target.parse(opts.device) if opts.device else None
    pool = EdgePool(addresses, token=opts.token, tls_ca=tls_ca, digest=bundle.digest,
                    tls_server_name=opts.tls_server_name, cooldown_s=opts.cooldown_s)  # fmt: skip
    try:
        rtt_s, problems = pool.connect(bundle.digest)
        if all(not e.compatible or e.down_until > time.perf_counter() for e in pool.edges) and (
            opts.policy not in ("device-only", "right-sizing")
        ):
            raise RuntimeError(f"no edge server usable: {'; '.join(problems)}")
        for p in problems:
            print(f"warning: {p}", file=sys.stderr)
        client = CoInference(bundle, pool, link, deadline_ms=opts.deadline_ms, policy=opts.policy,
                             margin=opts.margin, device=device, probe_every=opts.probe_every,
                             probe_bytes=opts.probe_bytes, exit_name=opts.exit,
                             adapt=opts.adapt)  # fmt: skip
        client.start(rtt_s, pool.min_rtt_s)
        rows, changed = [], False
        for i in range(opts.frames):
            j = i % len(frames.x)
            row, changed = client.frame(i, frames.x[j], frames.y[j], changed)
            row["t_s"] = link.now() - link.t0
            rows.append(row)
    finally:
        pool.close()
    rep = {
        "bundle": os.path.abspath(opts.bundle),
        "policy": opts.policy,
        "deadline_ms": opts.deadline_ms,
        "margin": opts.margin,
        "bandwidth": link.source,
        "device": dataclasses.asdict(client.device),
        "edges": {e.address: {"calls": e.calls, "failures": e.failures} for e in pool.edges},
        "rtt_ms": client.rtt_s * 1e3,
        "loading_ms": client.loading_ms,
        "predicted_loading_ms": lm.loading_ms(
            bundle.manifest["latency_models"]["device"],
            bundle.manifest["files"][bundle.manifest["partitions"]["model"]]["bytes"],
        ),
        "bandwidth_changes": client.estimator.changes,
        "compute_drift": (
            None
            if client.drift is None
            else {
                "device": client.drift.device,
                "edge": client.drift.edge,
                "samples": list(client.drift.samples),
            }
        ),  # fmt: skip
        "summary": summarize(rows, opts.deadline_ms),
        "frames": rows,
    }
    idx = {e["name"]: i for i, e in enumerate(bundle.manifest["partitions"]["exits"])}
    rep["summary"]["mean_exit_index"] = float(np.mean([idx[r["exit"]] for r in rows]))
    return rep


_bandwidth_number_or_trace = args_lib.number_or_file(args_lib.positive(), "text")


def _bandwidth_arg(text: str) -> str | float:
    """``--bandwidth``: ``real``, else a number or trace file (its domain, for the fuzz tests)."""
    return text if text == "real" else _bandwidth_number_or_trace(text)


_bandwidth_arg.domain = _bandwidth_number_or_trace.domain  # type: ignore[attr-defined]


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.coinfer`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(
        prog="python -m runtime.coinfer", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--edge", required=True, help="HOST:PORT[,HOST:PORT...]")
    p.add_argument("--deadline-ms", type=args_lib.positive(), required=True)
    p.add_argument("--bandwidth", required=True, type=_bandwidth_arg,
                   help="Mbps, a CSV trace of t_s,mbps (both emulated), or real (no emulation: "
                   "the network shapes, e.g. runtime.netlink_bench)")  # fmt: skip
    p.add_argument("--frames", type=args_lib.count(1), default=100)
    p.add_argument("--json", default=None, type=args_lib.output_file(),
                   help="write the report (summary + per-frame log)")  # fmt: skip
    p.add_argument("--data", default="mnist5k:test", type=args_lib.prefixed_file("npz:"),
                   help="frames: DATASET:SPLIT or npz:PATH")  # fmt: skip
    p.add_argument("--policy", default="edgent", choices=planner.POLICIES)
    p.add_argument("--margin", type=args_lib.real(0.0, 10.0), default=0.1,
                   help="relative headroom in planning")  # fmt: skip
    p.add_argument("--device", default=None, help="device target (default: the fitted one)")
    p.add_argument("--token", default=None)
    p.add_argument("--tls-ca", default=None, type=args_lib.existing_file(),
                   help="PEM CA certificate (enables TLS)")  # fmt: skip
    p.add_argument("--tls-server-name", default=None, help="TLS name override (tests)")
    p.add_argument("--cooldown-s", type=args_lib.real(0.0, 3600.0), default=2.0)
    p.add_argument("--probe-every", type=args_lib.count(1), default=10)
    p.add_argument("--probe-bytes", type=args_lib.count(1, DEFAULT_MAX_MESSAGE // 2), default=1024)
    p.add_argument("--static-compute", action="store_true",
                   help="plan with the profiled compute times (no drift learning)")  # fmt: skip
    p.add_argument("--exit", default=None,
                   help="restrict the policy to this exit (e.g. edge-only at exit_11)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv, errors=(KeyError,))


def _main(args) -> int:
    opts = Options(
        bundle=args.bundle, edges=tuple(args.edge.split(",")), deadline_ms=args.deadline_ms,
        bandwidth=str(args.bandwidth), frames=args.frames, data=args.data, policy=args.policy,
        margin=args.margin, device=args.device, token=args.token, tls_ca=args.tls_ca,
        tls_server_name=args.tls_server_name, cooldown_s=args.cooldown_s,
        probe_every=args.probe_every, probe_bytes=args.probe_bytes, exit=args.exit,
        adapt=not args.static_compute,
    )  # fmt: skip
    rep = run(opts)
    if args.json:
        write_json_atomic(args.json, rep)
    s = rep["summary"]
    print(
        f"{s['frames']} frames, deadline {s['deadline_ms']} ms, {rep['policy']} on "
        f"{rep['bandwidth']}: "
        f"met {s['deadline_met']:.3f}, accuracy {s['accuracy']:.3f}, mean {s['mean_ms']:.2f} ms "
        f"(p95 {s['p95_ms']:.2f}), |pred err| {s['mean_abs_error_ms']:.2f} ms, within 1 ms + "
        f"transfer {s['within_1ms_plus_transfer']:.3f}, fallbacks {s['fallbacks']}, "
        f"plans {s['plans']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
