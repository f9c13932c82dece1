"""A real, shaped network link: two network namespaces joined by a veth pair, rate-limited by tc.

  with netlink.ShapedLink([(0.0, 5.0)]) as link:      # t_s, Mbps rows (a trace) or one row
      edge = link.popen("edge", [sys.executable, "-m", "runtime.edge_server", ...,
                                 f"--host={link.edge_ip}", "--port=0"])
      link.start_schedule()                              # the trace's t = 0 is now
      subprocess.run(link.exec_argv("device", [sys.executable, "-m", "runtime.coinfer",
                     f"--edge={link.edge_ip}:PORT", "--bandwidth=real", ...]))
  # namespaces, veth pair, qdiscs and every process started in them are gone here

Beside the in-process emulation (`runtime.coinfer.Link` sleeps ``n * 8 / B``),
this carries every byte through the kernel: the device process runs in one
namespace, the edge server in the other, and each end of the veth pair has a
token-bucket filter (``tc qdisc ... tbf``) as its root qdisc, so the device's
end shapes the uplink and the edge's end the downlink, both at the schedule's
rate. A trace (rows ``t_s, Mbps``, the format `runtime.coinfer.Link` reads) is
applied by a background thread with ``tc qdisc change`` on both ends; every
change actually applied is logged in ``applied`` as ``(time.perf_counter(),
Mbps)`` (CLOCK_MONOTONIC, the same clock in every process on the machine, so
a client's frames can be matched with the rate in force).

What a token bucket does to short messages: up to ``burst`` bytes leave at
line rate when the bucket is full (it refills between frames), the rest at the
rate. ``burst`` defaults to one full-size Ethernet frame plus a margin (1600
bytes), raised to half a millisecond at the rate above 25 Mbps, where a
smaller bucket cannot be refilled fast enough by the kernel's timer and the
shaper falls below its rate (measured: 100 Mbit/s with 1600 bytes carried 70-83).
``netem`` (delay, loss) is not used: it is not available on these machines.

Teardown is unconditional: on leaving the block normally, on an exception, on
SIGINT or SIGTERM (turned into exceptions while the block runs, held back while
tearing down), every process started through `popen` and any other process
left in the namespaces is killed, and both namespaces (with the veth pair) are
deleted. Namespaces are named ``flexjax-<pid>-<n>-dev|edge``; those of a
process that no longer exists (killed with SIGKILL) are deleted when the next
link is created (`remove_stale`).

Needs root, the ``ip`` and ``tc`` commands (iproute2) and kernel network
namespaces; `unavailable()` says why not in one line, and `ShapedLink` raises
`NetlinkError` (one line) instead of starting. stdlib only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

PREFIX = "flexjax"
DEVICE_IP, EDGE_IP = "10.203.0.1", "10.203.0.2"  # each in its own namespace: never clash
DEVICE_DEV, EDGE_DEV = "fx-dev", "fx-edge"
MIN_BURST_BYTES = 1600  # one 1514-byte Ethernet frame must fit, or tbf drops it
_NAME = re.compile(rf"^{PREFIX}-(\d+)-(\d+)-(dev|edge)$")
_counter = itertools.count()


class NetlinkError(RuntimeError):
    """The shaped link cannot be built or used; the message is one line saying why."""


def _run(argv: Sequence[str], timeout: float = 10.0) -> str:
    """Runs an ``ip``/``tc`` command; returns stdout. Raises NetlinkError with its stderr."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetlinkError(f"{' '.join(argv)}: {e}") from None
    if proc.returncode != 0:
        msg = proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}"
        raise NetlinkError(f"{' '.join(argv)}: {msg.splitlines()[0]}")
    return proc.stdout


def unavailable() -> str | None:
    """Why a shaped link cannot be built here (one line), or None when it can.

    Checks the platform, root, the ``ip`` and ``tc`` commands, then creates
    and deletes a probe namespace (the kernel may lack network namespaces,
    or a container may forbid them).
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "the namespace link needs root (ip netns / tc); run as root"
    missing = [c for c in ("ip", "tc") if shutil.which(c) is None]
    if missing:
        return f"the namespace link needs iproute2: {' and '.join(missing)} not found on PATH"
    name = f"{PREFIX}-{os.getpid()}-{next(_counter)}-dev"
    try:
        _run(["ip", "netns", "add", name])
    except NetlinkError as e:
        return f"cannot create a network namespace here: {e}"
    try:
        _run(["ip", "netns", "del", name])
    except NetlinkError as e:
        return f"cannot delete the probe namespace {name}: {e}"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def namespaces() -> list[str]:
    """Every network namespace named like ours (``flexjax-<pid>-<n>-dev|edge``)."""
    out = _run(["ip", "netns", "list"])
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if _NAME.match(n)]


def remove_stale() -> list[str]:
    """Deletes our namespaces whose creating process is gone; returns their names.

    Processes still inside them are not touched (they are not this process's);
    the kernel frees such a namespace when its last process exits.
    """
    removed = []
    for name in namespaces():
        pid = int(_NAME.match(name).group(1))
        if pid != os.getpid() and not _alive(pid):
            try:
                _run(["ip", "netns", "del", name])
                removed.append(name)
            except NetlinkError:
                pass  # raced with another cleaner: it is gone either way
    return removed


def burst_bytes(mbps: float) -> int:
    """The token bucket size for `mbps` (see the module docstring)."""
    return max(MIN_BURST_BYTES, int(mbps * 1e6 / 8 * 0.5e-3))


class ShapedLink:
    """Two namespaces (``device``, ``edge``) joined by a veth pair shaped by tbf both ways.

    Args:
      schedule: rows ``(t_s, Mbps)``, the first at ``t_s = 0``, times
        increasing, rates finite and > 0 (a constant link is one row).
      latency_ms: tbf's queue bound (how long a packet may wait for tokens
        before it is dropped).
      burst: bytes in the bucket; None: `burst_bytes` of each rate.

    Attributes:
      device_ns, edge_ns, device_ip, edge_ip, device_dev, edge_dev: the two sides.
      applied: ``(time.perf_counter(), Mbps)`` of every rate set (enter and schedule).
      errors: failures of the schedule thread (each stops it).

    Raises (on enter):
      NetlinkError: not root, no ``ip``/``tc``, no namespaces, tc refused tbf.
      ValueError: a bad schedule.
    """

    def __init__(
        self,
        schedule: Sequence[tuple[float, float]],
        *,
        latency_ms: float = 100.0,
        burst: int | None = None,
    ):
        rows = [(float(t), float(b)) for t, b in schedule]
        if not rows or rows[0][0] != 0.0:
            raise ValueError("a link schedule needs rows (t_s, Mbps) starting at t_s = 0")
        for (t0, _), (t1, _) in itertools.pairwise(rows):
            if not t1 > t0:
                raise ValueError(f"link schedule times must increase ({t1} after {t0})")
        for t, b in rows:
            if not (math.isfinite(t) and math.isfinite(b) and b > 0):
                raise ValueError(f"link schedule row ({t}, {b}): need finite t_s and Mbps > 0")
        if not (math.isfinite(latency_ms) and latency_ms > 0):
            raise ValueError(f"latency_ms must be > 0, got {latency_ms}")
        if burst is not None and burst < MIN_BURST_BYTES:
            raise ValueError(f"burst must be >= {MIN_BURST_BYTES} bytes, got {burst}")
        self.schedule = rows
        self.latency_ms = latency_ms
        self.burst = burst
        n = next(_counter)
        self.device_ns = f"{PREFIX}-{os.getpid()}-{n}-dev"
        self.edge_ns = f"{PREFIX}-{os.getpid()}-{n}-edge"
        self.device_ip, self.edge_ip = DEVICE_IP, EDGE_IP
        self.device_dev, self.edge_dev = DEVICE_DEV, EDGE_DEV
        self.applied: list[tuple[float, float]] = []
        self.errors: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._deferred: list[int] = []
        self._old_handlers: dict[int, object] = {}

    # -- the two sides ------------------------------------------------------------------------

    def _ns(self, side: str) -> str:
        if side not in ("device", "edge"):
            raise ValueError(f"side must be 'device' or 'edge', got {side!r}")
        return self.device_ns if side == "device" else self.edge_ns

    def exec_argv(self, side: str, argv: Sequence[str]) -> list[str]:
        """`argv` run inside the `side` namespace (``ip netns exec NS ...``)."""
        return ["ip", "netns", "exec", self._ns(side), *argv]

    def popen(self, side: str, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """Starts `argv` in the `side` namespace; it is killed on teardown at the latest."""
        proc = subprocess.Popen(self.exec_argv(side, argv), **kwargs)
        self._procs.append(proc)
        return proc

    # -- rates --------------------------------------------------------------------------------

    def _tbf(self, verb: str, side: str, mbps: float) -> None:
        dev = self.device_dev if side == "device" else self.edge_dev
        burst = self.burst or burst_bytes(mbps)
        rate, ns = f"{int(round(mbps * 1e6))}bit", self._ns(side)
        shape = f"root tbf rate {rate} burst {burst} latency {self.latency_ms:g}ms"
        _run(["tc", "-n", ns, "qdisc", verb, "dev", dev, *shape.split()])

    def set_rate(self, mbps: float) -> None:
        """Sets both directions to `mbps` now (``tc qdisc change``)."""
        if not (math.isfinite(mbps) and mbps > 0):
            raise ValueError(f"rate must be finite and > 0 Mbps, got {mbps}")
        for side in ("device", "edge"):
            self._tbf("change", side, mbps)
        self.applied.append((time.perf_counter(), mbps))

    def stats(self) -> dict:
        """Each side's qdisc counters: ``{"device"|"edge": {bytes, packets, drops, overlimits}}``.

        ``device`` is the uplink (what left the device), ``edge`` the downlink.
        """
        out = {}
        for side, dev in (("device", self.device_dev), ("edge", self.edge_dev)):
            raw = _run(["tc", "-n", self._ns(side), "-s", "-j", "qdisc", "show", "dev", dev])
            try:
                (q,) = [q for q in json.loads(raw) if q.get("root")]
                out[side] = {k: int(q[k]) for k in ("bytes", "packets", "drops", "overlimits")}
            except (ValueError, KeyError, TypeError) as e:
                raise NetlinkError(f"unexpected tc -s -j output for {dev}: {e}") from None
        return out

    def rate_at(self, t: float) -> float | None:
        """The rate in force at `t` (``time.perf_counter()`` seconds), per ``applied``."""
        rate = None
        for ts, mbps in self.applied:
            if ts <= t:
                rate = mbps
        return rate

    def start_schedule(self) -> float:
        """Starts the schedule now (its ``t_s = 0``); returns that ``time.perf_counter()``.

        The first row is set again at once; the rest by a background thread.
        """
        if self._thread is not None:
            raise RuntimeError("the link schedule is already running")
        t0 = time.perf_counter()
        self.set_rate(self.schedule[0][1])
        if len(self.schedule) > 1:
            self._thread = threading.Thread(
                target=self._follow, args=(t0,), daemon=True, name="netlink-schedule"
            )
            self._thread.start()
        return t0

    def _follow(self, t0: float) -> None:
        for t, mbps in self.schedule[1:]:
            if self._stop.wait(max(0.0, t0 + t - time.perf_counter())):
                return
            try:
                self.set_rate(mbps)
            except NetlinkError as e:
                self.errors.append(str(e))
                return

    # -- life cycle ---------------------------------------------------------------------------

    def __enter__(self) -> ShapedLink:
        why = unavailable()
        if why:
            raise NetlinkError(why)
        self._trap_signals()
        try:
            remove_stale()
            for ns in (self.device_ns, self.edge_ns):
                _run(["ip", "netns", "add", ns])
                self._created.append(ns)
            veth = f"{self.device_dev} netns {self.device_ns} type veth peer name {self.edge_dev}"
            _run(["ip", "link", "add", *veth.split(), "netns", self.edge_ns])
            for side, ns, dev, ip in (
                ("device", self.device_ns, self.device_dev, self.device_ip),
                ("edge", self.edge_ns, self.edge_dev, self.edge_ip),
            ):
                _run(["ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev])
                _run(["ip", "-n", ns, "link", "set", "lo", "up"])
                _run(["ip", "-n", ns, "link", "set", dev, "up"])
                self._tbf("add", side, self.schedule[0][1])
            self.applied.append((time.perf_counter(), self.schedule[0][1]))
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the schedule, kills every process in the namespaces, deletes them (idempotent).

        Raises:
          NetlinkError: something could not be removed (after trying everything).
        """
        self._closing = True
        problems = []
        try:
            self._stop.set()
            if self._thread is not None:
                self._thread.join(timeout=15)
            for proc in self._procs:
                _end(proc)
            for ns in list(self._created):
                try:
                    for pid in _run(["ip", "netns", "pids", ns]).split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)  # ours: it lives in our namespace
                        except ProcessLookupError:
                            pass
                    _run(["ip", "netns", "del", ns])
                    self._created.remove(ns)
                except NetlinkError as e:
                    problems.append(str(e))
        finally:
            self._restore_signals()
        if problems:
            raise NetlinkError("; ".join(problems))
        if self._deferred:  # a signal arrived while tearing down: honour it now
            sig = self._deferred[0]
            self._deferred.clear()
            _raise_for(sig)

    def _trap_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # only the main thread may install handlers; the caller owns signals then
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            self._old_handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)
        self._old_handlers.clear()

    def _on_signal(self, signum: int, _frame) -> None:
        if self._closing:
            self._deferred.append(signum)
            return
        _raise_for(signum)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP while a link was up: exits with status 128 + the signal number."""


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Terminated(128 + signum)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


# -- measuring the link -----------------------------------------------------------------------

_RECEIVER = r"""
import socket, sys, time
s = socket.socket()
s.bind((sys.argv[1], 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
n = first = 0
t0 = None
while True:
    b = c.recv(1 << 16)
    if not b:
        break
    if t0 is None:
        t0, first = time.perf_counter(), len(b)
    n += len(b)
print(n, first, time.perf_counter() - t0 if t0 else 0.0, flush=True)
"""

_SENDER = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
s.sendall(bytes(int(sys.argv[3])))
s.close()
"""


def measure_throughput(link: ShapedLink, direction: str = "up", seconds: float = 2.0) -> dict:
    """A plain TCP bulk transfer across `link`; its goodput vs the rate in force.

    Sends ``rate * seconds`` bytes from one namespace to the other (``up``:
    device to edge) and times them at the receiver, from the first byte to
    the last (the first read, which the bucket lets through at once, is not
    counted). Goodput excludes TCP/IP/Ethernet headers (about 4.4% of a
    full-size frame), so a perfect shaper measures about 0.96 of its rate.

    Returns:
      ``{"direction", "configured_mbps", "measured_mbps", "ratio", "bytes", "seconds"}``.
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
    src, dst = ("device", "edge") if direction == "up" else ("edge", "device")
    dst_ip = link.edge_ip if direction == "up" else link.device_ip
    mbps = link.rate_at(time.perf_counter())
    nbytes = max(64 * 1024, int(mbps * 1e6 / 8 * seconds))
    recv = link.popen(
        dst, [sys.executable, "-c", _RECEIVER, dst_ip], stdout=subprocess.PIPE, text=True
    )
    try:
        port = recv.stdout.readline().strip()
        if not port.isdigit():
            raise NetlinkError(f"throughput receiver did not start in the {dst} namespace")
        send = subprocess.run(
            link.exec_argv(src, [sys.executable, "-c", _SENDER, dst_ip, port, str(nbytes)]),
            capture_output=True,
            text=True,
            timeout=seconds * 10 + 30,
        )
        if send.returncode != 0:
            raise NetlinkError(f"throughput sender failed: {send.stderr.strip()[-200:]}")
        got, first, dt = recv.stdout.readline().split()
        recv.wait(timeout=10)
    finally:
        _end(recv)
    got, first, dt = int(got), int(first), float(dt)
    if got != nbytes or dt <= 0:
        raise NetlinkError(f"throughput transfer received {got} of {nbytes} bytes")
    measured = (got - first) * 8 / dt / 1e6
    return {
        "direction": direction,
        "configured_mbps": mbps,
        "measured_mbps": measured,
        "ratio": measured / mbps,
        "bytes": nbytes,
        "seconds": dt,
    }
