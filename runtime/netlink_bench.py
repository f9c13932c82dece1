"""Edgent over a real shaped link (`runtime.netlink`: netns, veth, tc tbf), beside the emulation.

  python -m runtime.netlink_bench throughput [--rates=1,5,20,100] [--seconds=2] [--busy=0]
      [--json=OUT]
  python -m runtime.netlink_bench coinfer --bundle=BUNDLE --bandwidth=MBPS|TRACE.csv
      --deadline-ms=T [--frames=100] [--policy=edgent] [--data=mnist5k:test] [--margin=0.1]
      [--emulated] [--json=OUT]

``throughput`` checks the shaping itself: for each rate, a plain TCP bulk
transfer device -> edge (uplink) and edge -> device (downlink) across the
veth pair, its goodput against the configured rate; ``--busy=N`` runs N
busy-loop processes beside it (ended by pid afterwards) to show the shaper
under CPU load.

``coinfer`` runs the Edgent device client (``python -m runtime.coinfer
--bandwidth=real``: it does not emulate, it learns the bandwidth from its own
transfers only) in the device namespace and one edge server
(``python -m runtime.edge_server``) in the edge namespace, the link shaped at
``--bandwidth`` (a trace is replayed with ``tc qdisc change``, its t = 0 when
the client starts). With ``--emulated`` the same client and server also run on
127.0.0.1 with the in-process emulated link at the same ``--bandwidth``, so
both links are measured in one run. Every summary says which link it used
(``link``: ``netns-tbf`` or ``emulated``); on the real link each frame's
``true_mbps`` is the tc rate in force when it ended.

Needs root, iproute2 and network namespaces (one ``error:`` line otherwise).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import netlink, planner
from runtime.coinfer import Link

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RATES = (1.0, 5.0, 20.0, 100.0)


def _env() -> dict:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else "")}


# -- throughput ---------------------------------------------------------------------------------


def throughput(
    rates: Sequence[float] = RATES, seconds: float = 2.0, busy: int = 0, log=print
) -> dict:
    """Goodput of a TCP bulk transfer per rate and direction, with `busy` busy loops beside.

    Returns:
      ``{"busy", "seconds", "load_before", "runs": [measure_throughput rows]}``.

    Raises:
      NetlinkError: the link cannot be built or a transfer failed.
    """
    loops = []
    runs = []
    try:
        for _ in range(busy):
            loops.append(subprocess.Popen([sys.executable, "-c", "while 1: pass"]))
        load = os.getloadavg()
        with netlink.ShapedLink([(0.0, rates[0])]) as link:
            for mbps in rates:
                link.set_rate(mbps)
                for direction in ("up", "down"):
                    r = netlink.measure_throughput(link, direction, seconds)
                    runs.append(r)
                    log(
                        f"{mbps:g} Mbit/s {direction}: {r['measured_mbps']:.3f} Mbit/s goodput "
                        f"({r['ratio']:.3f} of the rate)"
                    )
    finally:
        for p in loops:  # ours, by pid
            p.kill()
            p.wait()
    return {"busy": busy, "seconds": seconds, "load_before": list(load), "runs": runs}


# -- co-inference -------------------------------------------------------------------------------


def _start_server(argv: list[str], popen) -> tuple[subprocess.Popen, str]:
    """Starts an edge server through `popen`; returns (process, HOST:PORT)."""
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    if "listening on" not in line:
        proc.kill()
        proc.wait()
        err = proc.stderr.read().strip().splitlines()
        raise RuntimeError(f"edge server did not start: {err[-1] if err else 'no output'}")
    return proc, line.split("listening on ")[1].split()[0]


def _client(argv_wrap, bundle, edge, bandwidth, opts: dict, tmp: str) -> dict:
    out = os.path.join(tmp, f"client_{time.monotonic_ns()}.json")
    argv = [
        sys.executable,
        "-m",
        "runtime.coinfer",
        f"--bundle={bundle}",
        f"--edge={edge}",
        f"--bandwidth={bandwidth}",
        f"--json={out}",
        *(f"--{k.replace('_', '-')}={v}" for k, v in opts.items()),
    ]
    proc = subprocess.run(argv_wrap(argv), capture_output=True, text=True, env=_env(), timeout=600)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        raise RuntimeError(f"device client failed: {err[-1] if err else proc.returncode}")
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def _summary(rep: dict, link: str, bandwidth: str) -> dict:
    rows = rep["frames"]
    s = dict(rep["summary"])
    remote = [r for r in rows if r["partition"] is not None and r["fallback"] is None]
    s.update(
        link=link,
        bandwidth=bandwidth,
        rtt_ms=rep["rtt_ms"],
        bandwidth_changes=rep["bandwidth_changes"],
        edges=rep["edges"],
        effective_accuracy=float(np.mean([r["correct"] and r["met"] for r in rows])),
        median_true_mbps=float(np.median([r["true_mbps"] for r in rows])),
        median_est_mbps=float(np.median([r["est_mbps"] for r in rows])),
        remote_network_ms=float(np.mean([r["network_ms"] for r in remote])) if remote else None,
    )
    q = rep.get("link", {}).get("qdisc")  # the shaper's counters (real link only)
    s["qdisc_drops"] = None if q is None else {side: c["drops"] for side, c in q.items()}
    # Per rate in force: does the client's estimate follow the link, and how long did the
    # frames that crossed it spend on the network?
    s["by_rate"] = {}
    for mbps in sorted({r["true_mbps"] for r in remote}):
        at = [r for r in remote if r["true_mbps"] == mbps]
        s["by_rate"][f"{mbps:g}"] = {
            "frames": len(at),
            "median_est_mbps": float(np.median([r["est_mbps"] for r in at])),
            "median_network_ms": float(np.median([r["network_ms"] for r in at])),
        }
    return s


def coinfer(bundle: str, bandwidth: str, *, emulated: bool = False, log=print, **opts) -> dict:
    """The device client and an edge server across the shaped link (and, if `emulated`, on
    127.0.0.1 with the emulated link at the same `bandwidth`).

    Args:
      bundle: a bundle with partitions and fitted latency models.
      bandwidth: Mbps or a ``t_s,mbps`` trace file (`runtime.coinfer.Link.parse`).
      opts: more ``runtime.coinfer`` flags (``deadline_ms``, ``frames``, ``policy``, ...).

    Returns:
      ``{"runs": [summary per link], "reports": [the clients' full reports]}``; on
      the real link each frame gets ``true_mbps`` (the tc rate when it ended) and
      ``t_s`` since the schedule started, and the report the rates applied.

    Raises:
      NetlinkError, RuntimeError: the link, a server or the client failed.
    """
    spec = Link.parse(bandwidth)
    schedule = list(zip(spec.times.tolist(), (spec.bps / 1e6).tolist()))
    runs, reports = [], []
    server_argv = [sys.executable, "-m", "runtime.edge_server", f"--bundle={bundle}", "--port=0",
                   "--workers=2"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="netlink_bench_") as tmp:
        with netlink.ShapedLink(schedule) as link:
            server, edge = _start_server(
                [*server_argv, f"--host={link.edge_ip}"],
                lambda argv, **kw: link.popen("edge", argv, **kw),
            )
            t0 = link.start_schedule()
            rep = _client(
                lambda argv: link.exec_argv("device", argv), bundle, edge, "real", opts, tmp
            )
            qdisc = link.stats()
            for r in rep["frames"]:
                r["true_mbps"] = link.rate_at(r["t_s"])
                r["t_s"] -= t0
            rep["link"] = {
                "kind": "netns-tbf",
                "schedule": spec.source,
                "latency_ms": link.latency_ms,
                "burst_bytes": link.burst or [netlink.burst_bytes(b) for _, b in schedule],
                "applied": [(t - t0, b) for t, b in link.applied if t >= t0],
                "errors": link.errors,
                "qdisc": qdisc,
            }
            if link.errors:
                raise netlink.NetlinkError(f"link schedule failed: {link.errors[0]}")
        reports.append(rep)
        runs.append(_summary(rep, "netns-tbf", f"tc tbf at {spec.source}"))
        log(_line(runs[-1]))
        if emulated:
            server, edge = _start_server(
                [*server_argv, "--host=127.0.0.1"],
                lambda argv, **kw: subprocess.Popen(argv, **kw),
            )
            try:
                rep = _client(lambda argv: argv, bundle, edge, bandwidth, opts, tmp)
            finally:
                server.terminate()
                server.wait(timeout=30)
            rep["link"] = {"kind": "emulated", "schedule": spec.source}
            reports.append(rep)
            runs.append(_summary(rep, "emulated", f"emulated in the client at {spec.source}"))
            log(_line(runs[-1]))
    return {"runs": runs, "reports": reports}


def _line(s: dict) -> str:
    net = "-" if s["remote_network_ms"] is None else f"{s['remote_network_ms']:.2f}"
    return (
        f"link {s['link']} ({s['bandwidth']}): {s['frames']} frames, met "
        f"{s['deadline_met']:.3f}, mean {s['mean_ms']:.2f} ms (p95 {s['p95_ms']:.2f}), "
        f"remote network {net} ms, est {s['median_est_mbps']:.2f} Mbps (true "
        f"{s['median_true_mbps']:.2f}), fallbacks {s['fallbacks']}, plans {s['plans']}"
        + ("" if s["qdisc_drops"] is None else f", tbf drops {s['qdisc_drops']}")
    )


# -- command line -------------------------------------------------------------------------------


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.netlink_bench`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(
        prog="python -m runtime.netlink_bench", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("throughput", help="TCP goodput vs configured rate")
    t.add_argument(
        "--rates",
        type=args_lib.number_list(args_lib.positive(10000.0)),
        default=list(RATES),
        help="Mbit/s, comma-separated",
    )
    t.add_argument(
        "--seconds", type=args_lib.real(0.1, 60.0), default=2.0, help="transfer length at each rate"
    )
    t.add_argument(
        "--busy",
        type=args_lib.count(0, 64),
        default=0,
        help="busy-loop processes beside the transfers",
    )
    t.add_argument("--json", default=None, type=args_lib.output_file())
    c = sub.add_parser("coinfer", help="Edgent client and edge server across the link")
    c.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    c.add_argument(
        "--bandwidth",
        required=True,
        help="Mbps, or a CSV trace of t_s,mbps",
        type=args_lib.number_or_file(args_lib.positive(10000.0), "text"),
    )
    c.add_argument("--deadline-ms", type=args_lib.positive(), required=True)
    c.add_argument("--frames", type=args_lib.count(1), default=100)
    c.add_argument("--policy", default="edgent", choices=planner.POLICIES)
    c.add_argument(
        "--data",
        default="mnist5k:test",
        type=args_lib.prefixed_file("npz:"),
        help="frames: DATASET:SPLIT or npz:PATH",
    )
    c.add_argument("--margin", type=args_lib.real(0.0, 10.0), default=0.1)
    c.add_argument(
        "--emulated",
        action="store_true",
        help="also run on 127.0.0.1 with the emulated link, for comparison",
    )
    c.add_argument("--json", default=None, type=args_lib.output_file())
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    if args.command == "throughput":
        rep = throughput(args.rates, args.seconds, args.busy, log=lambda m: print(m, flush=True))
    else:
        rep = coinfer(
            args.bundle,
            str(args.bandwidth),
            emulated=args.emulated,
            log=lambda m: print(m, flush=True),
            deadline_ms=args.deadline_ms,
            frames=args.frames,
            policy=args.policy,
            data=args.data,
            margin=args.margin,
        )
    if args.json:
        write_json_atomic(args.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
