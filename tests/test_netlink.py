"""The real shaped link: namespaces + veth + tc tbf (`runtime.netlink`), and Edgent across it.

Everything here builds real network namespaces, so it needs root, iproute2 and
kernel namespaces (CI runs as root); elsewhere the module is skipped with the
reason `runtime.netlink.unavailable()` gives. The shaping check compares a
TCP transfer's goodput with the configured rate in a generous band (0.5-1.2x):
a behavioural check that tbf is in the path and set to that rate, not a speed
target (goodput is at most ~0.96 of the rate: headers).
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
from test_edgent_system import edgent_dir  # noqa: F401  (fixture: a fitted partitions bundle)

from runtime import netlink, netlink_bench
from runtime.coinfer import Link

from conftest import ROOT

WHY = netlink.unavailable()
needs_netns = pytest.mark.skipif(WHY is not None, reason=f"namespace link unavailable: {WHY}")


def _exists(ns: str) -> bool:
    return ns in netlink.namespaces()


def _qdisc(link: netlink.ShapedLink, side: str) -> str:
    ns, dev = (
        (link.device_ns, link.device_dev) if side == "device" else (link.edge_ns, link.edge_dev)
    )
    return subprocess.run(
        ["tc", "-n", ns, "qdisc", "show", "dev", dev], capture_output=True, text=True, check=True
    ).stdout


def test_link_real_mode_never_sleeps_and_reports_an_unknown_rate():
    link = Link.parse("real")
    assert link.real and math.isnan(link.bandwidth_bps()) and link.t0 == 0.0
    t0 = time.perf_counter()
    for _ in range(100):
        link.transmit(10**9)  # emulated, each would hold the caller for 8000 s / rate
    assert time.perf_counter() - t0 < 1.0
    link.restart()
    assert link.t0 == 0.0  # t_s stays the machine's monotonic clock
    assert not Link.parse("5").real


@needs_netns
def test_shaped_link_namespaces_exist_inside_and_are_removed_after_exit_and_error():
    with netlink.ShapedLink([(0.0, 5.0)]) as link:
        names = (link.device_ns, link.edge_ns)
        assert all(_exists(n) for n in names)
        for side in ("device", "edge"):
            assert "tbf" in _qdisc(link, side) and "rate 5Mbit" in _qdisc(link, side)
        sleeper = link.popen("edge", ["sleep", "600"])
    assert not any(_exists(n) for n in names)
    assert sleeper.poll() is not None  # the process inside was ended

    with pytest.raises(ZeroDivisionError):
        with netlink.ShapedLink([(0.0, 5.0)]) as link:
            names = (link.device_ns, link.edge_ns)
            sleeper = link.popen("device", ["sleep", "600"])
            1 / 0  # noqa: B018
    assert not any(_exists(n) for n in names)
    assert sleeper.poll() is not None


_HOLD = """
import sys, time
from runtime import netlink
with netlink.ShapedLink([(0.0, 5.0), (0.2, 1.0)]) as link:
    link.start_schedule()
    link.popen("edge", ["sleep", "600"])
    print(link.device_ns, link.edge_ns, flush=True)
    time.sleep(600)
"""


@needs_netns
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_shaped_link_signal_inside_block_removes_namespaces(sig):
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    names = proc.stdout.readline().split()
    assert len(names) == 2 and all(_exists(n) for n in names), proc.stderr.read()
    time.sleep(0.3)  # the schedule thread has changed the rate once
    proc.send_signal(sig)
    rc = proc.wait(timeout=30)
    if sig == signal.SIGKILL:  # cannot be caught: the next link (or remove_stale) cleans up
        assert rc == -signal.SIGKILL and all(_exists(n) for n in names)
        netlink.remove_stale()  # (under xdist another worker's link may have done it first)
    else:
        assert rc == (128 + sig if sig == signal.SIGTERM else -signal.SIGINT), proc.stderr.read()
    assert not any(_exists(n) for n in names)


@needs_netns
def test_shaped_tcp_goodput_follows_configured_rate_and_schedule_changes():
    with netlink.ShapedLink([(0.0, 20.0), (0.4, 2.0)]) as link:
        fast = netlink.measure_throughput(link, "up", seconds=0.3)
        t0 = link.start_schedule()  # 20 Mbit/s again, then 2 Mbit/s from t0 + 0.4 s
        while link.rate_at(time.perf_counter()) != 2.0 and time.perf_counter() - t0 < 10:
            time.sleep(0.05)
        slow = netlink.measure_throughput(link, "down", seconds=0.5)
        assert "rate 2Mbit" in _qdisc(link, "device") and "rate 2Mbit" in _qdisc(link, "edge")
        assert not link.errors
    assert fast["configured_mbps"] == 20.0 and slow["configured_mbps"] == 2.0
    assert [b for _, b in link.applied] == [20.0, 20.0, 2.0]
    for r in (fast, slow):
        assert 0.5 <= r["ratio"] <= 1.2, r


@needs_netns
def test_coinfer_across_namespaces_uses_only_the_real_link(edgent_dir):  # noqa: F811
    bundle = os.path.join(edgent_dir, "bundle")
    rep = netlink_bench.coinfer(bundle, "5", log=lambda m: None, deadline_ms=40, frames=20,
                                policy="edge-only", data="mnist5k:test")  # fmt: skip
    (run,) = rep["runs"]
    (client,) = rep["reports"]
    assert run["link"] == "netns-tbf" and client["link"]["kind"] == "netns-tbf"
    assert client["bandwidth"] == "real link (not emulated)"  # the client did not emulate
    edge = f"{netlink.EDGE_IP}:"
    assert run["fallbacks"] == 0 and run["frames"] == 20
    assert all(r["edge"].startswith(edge) and r["true_mbps"] == 5.0 for r in client["frames"])
    assert all(math.isfinite(r["est_mbps"]) and r["est_mbps"] > 0 for r in client["frames"][1:])
    # Every request crossed the shaped uplink qdisc, every reply the downlink one.
    q = client["link"]["qdisc"]
    # Each request carries the frame as a client sends it: 784 uint8 pixels (edge-only's
    # input encoding, runtime.planner.baseline_encodings), under tbf's one 1600-byte bucket.
    assert q["device"]["bytes"] >= 20 * 784 and q["edge"]["packets"] >= 20
    # The start-up probes (~20 ms of transfer at the estimate, up to 64 kB) are larger than
    # the bucket and crossed at 5 Mbit/s: the first frame's estimate is the shaped rate's
    # order, not the veth pair's line rate (gigabits).
    assert client["frames"][0]["est_mbps"] < 25, client["frames"][0]["est_mbps"]
    assert not any(n.startswith(f"{netlink.PREFIX}-{os.getpid()}-") for n in netlink.namespaces())


def _nobody_python() -> str | None:
    """An interpreter an unprivileged user can run (netlink is stdlib only), or None."""
    for exe in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        try:
            ok = subprocess.run([exe, "-c", "pass"], user=65534, capture_output=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if ok.returncode == 0:
            return exe
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_shaped_link_refuses_a_non_root_user_in_one_line():
    exe = _nobody_python()
    if exe is None:
        pytest.skip("no Python interpreter runnable by user nobody")
    code = (
        "from runtime import netlink\n"
        "try:\n    netlink.ShapedLink([(0.0, 5.0)]).__enter__()\n"
        "except netlink.NetlinkError as e:\n    print(e)\n"
    )
    proc = subprocess.run([exe, "-c", code], user=65534, cwd="/", capture_output=True,
                          text=True, env={"PYTHONPATH": ROOT}, timeout=30)  # fmt: skip
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    assert proc.stdout.splitlines() == [
        "the namespace link needs root (ip netns / tc); run as root"
    ]
