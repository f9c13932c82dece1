"""Edgent benchmark: the paper's experiments on this machine, with real gRPC edge servers.

  python -m runtime.edgent_bench --bundle=BUNDLE --out=DIR [--frames=200] [--servers=2]
      [--deadline-ms=10] [--bandwidth-mbps=2] [--quick]

Starts ``--servers`` edge servers (`runtime.edge_server`, subprocesses on
127.0.0.1) and runs the device client (`runtime.coinfer`) in this process:

1. ``bandwidth``: Edgent at a fixed deadline for bandwidths 50 kbps ... 10 Mbps:
   the chosen exit and partition, measured latency vs prediction, deadline met;
2. ``deadline``: at a fixed bandwidth, for a range of deadlines, Edgent and the
   baselines (device-only, edge-only, partition-only = Neurosurgeon,
   right-sizing-only): accuracy, deadline met, latency; "effective accuracy"
   counts a frame that missed its deadline as wrong (the paper's comparison);
3. ``trace``: Edgent on a fluctuating bandwidth trace (written to DIR).

Writes ``DIR/edgent_bench.json`` (every run's summary) and ``DIR/edgent_bench.md``
(the tables for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from flexjax.io import write_json_atomic, write_text_atomic
from runtime import coinfer

BANDWIDTHS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0)
DEADLINES = (2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
POLICIES = ("edgent", "device-only", "edge-only", "neurosurgeon", "right-sizing")


def start_servers(bundle: str, n: int) -> tuple[list[subprocess.Popen], list[str]]:
    """Starts `n` edge servers on free ports; returns (processes, addresses)."""
    procs, addrs = [], []
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for _ in range(n):
        p = subprocess.Popen(
            [sys.executable, "-m", "runtime.edge_server", f"--bundle={bundle}", "--port=0",
             "--workers=2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        line = p.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"edge server did not start: {p.stderr.read()[-500:]}")
        addrs.append(line.split("listening on ")[1].split()[0])
        procs.append(p)
    return procs, addrs


def write_trace(path: str, seconds: float = 8.0, step: float = 0.5, seed: int = 0) -> None:
    """A fluctuating trace: a new bandwidth (log-uniform in 0.1 .. 10 Mbps) every `step` s."""
    rng = np.random.default_rng(seed)
    rows = ["t_s,mbps"]
    for i in range(int(seconds / step)):
        rows.append(f"{i * step:.3f},{10 ** rng.uniform(-1, 1):.4f}")
    write_text_atomic(path, "\n".join(rows) + "\n")


def _run(bundle, edges, policy, deadline, bandwidth, frames, margin, keep_rows=False) -> dict:
    args = argparse.Namespace(
        bundle=bundle, edge=",".join(edges), deadline_ms=deadline, bandwidth=str(bandwidth),
        frames=frames, json=None, data="mnist5k:test", policy=policy, margin=margin,
        device=None, token=None, tls_ca=None, tls_server_name=None, cooldown_s=2.0,
        probe_every=10, probe_bytes=1024,
    )  # fmt: skip
    rep = coinfer.run(args)
    s = dict(rep["summary"])
    rows = rep["frames"]
    s["effective_accuracy"] = float(np.mean([r["correct"] and r["met"] for r in rows]))
    s["policy"], s["bandwidth"] = policy, str(bandwidth)
    s["rtt_ms"] = rep["rtt_ms"]
    s["edges"] = rep["edges"]
    s["bandwidth_changes"] = rep["bandwidth_changes"]
    s["predicted_mean_ms"] = float(np.mean([r["predicted_ms"] for r in rows]))
    if keep_rows:
        s["rows"] = rows
    return s


def _top(plans: dict) -> str:
    return max(plans, key=plans.get) if plans else "-"


def markdown(rep: dict) -> str:
    out = [f"Deadline {rep['deadline_ms']} ms, {rep['frames']} frames per run, "
           f"margin {rep['margin']}, {rep['servers']} edge servers.", ""]  # fmt: skip
    out += ["| bandwidth (Mbps) | plan (most frames) | plans | predicted ms "
            "| measured mean / p95 ms | met | misses remote / device-only "
            "| within 1 ms + transfer | accuracy |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in rep["bandwidth"]:
        out.append(
            f"| {s['bandwidth']} | {_top(s['plans'])} | {len(s['plans'])} | "
            f"{s['predicted_mean_ms']:.2f} | {s['mean_ms']:.2f} / {s['p95_ms']:.2f} | "
            f"{s['deadline_met']:.3f} | {s['missed_remote']} / {s['missed_device_only']} | "
            f"{s['within_1ms_plus_transfer']:.3f} | {s['accuracy']:.3f} |"
        )
    out += ["", f"At {rep['bandwidth_mbps']} Mbps (effective accuracy: a missed deadline counts "
            "as wrong):", "",
            "| deadline ms | " + " | ".join(POLICIES) + " |",
            "|---|" + "---|" * len(POLICIES)]  # fmt: skip
    by = {(s["policy"], s["deadline_ms"]): s for s in rep["deadline"]}
    for d in rep["deadlines"]:
        cells = []
        for pol in POLICIES:
            s = by[(pol, d)]
            cells.append(
                f"{s['effective_accuracy']:.3f} (met {s['deadline_met']:.2f}, "
                f"{s['mean_ms']:.1f} ms, {_top(s['plans'])})"
            )
        out.append(f"| {d:g} | " + " | ".join(cells) + " |")
    t = rep["trace"]
    out += ["", f"Fluctuating trace ({t['bandwidth']}): {t['frames']} frames, deadline met "
            f"{t['deadline_met']:.3f}, accuracy {t['accuracy']:.3f}, mean {t['mean_ms']:.2f} ms, "
            f"p99 {t['p99_ms']:.2f} ms, {t['bandwidth_changes']} change points, "
            f"plans {t['plans']}, missed: {t['missed_remote']} remote / "
            f"{t['missed_device_only']} device-only frames, within 1 ms + transfer "
            f"{t['within_1ms_plus_transfer']:.3f}."]  # fmt: skip
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m runtime.edgent_bench",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--bundle", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--deadline-ms", type=float, default=10.0)
    p.add_argument("--bandwidth-mbps", type=float, default=2.0)
    p.add_argument("--margin", type=float, default=0.1)
    p.add_argument("--trace-frames", type=int, default=1000)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    procs, edges = start_servers(args.bundle, args.servers)
    t0 = time.perf_counter()
    try:
        rep = {"deadline_ms": args.deadline_ms, "frames": args.frames, "margin": args.margin,
               "servers": args.servers, "bandwidth_mbps": args.bandwidth_mbps,
               "deadlines": list(DEADLINES), "bandwidth": [], "deadline": []}  # fmt: skip
        for bw in BANDWIDTHS:
            s = _run(args.bundle, edges, "edgent", args.deadline_ms, bw, args.frames, args.margin)
            rep["bandwidth"].append(s)
            print(f"bandwidth {bw} Mbps: {s['plans']} met {s['deadline_met']:.3f}", flush=True)
        for d in DEADLINES:
            for pol in POLICIES:
                s = _run(args.bundle, edges, pol, d, args.bandwidth_mbps, args.frames, args.margin)
                rep["deadline"].append(s)
            print(f"deadline {d} ms done", flush=True)
        trace = os.path.join(args.out, "trace.csv")
        write_trace(trace)
        rep["trace"] = _run(args.bundle, edges, "edgent", args.deadline_ms, trace,
                            args.trace_frames, args.margin, keep_rows=True)  # fmt: skip
        rep["seconds"] = time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    write_json_atomic(os.path.join(args.out, "edgent_bench.json"), rep)
    md = markdown(rep)
    write_text_atomic(os.path.join(args.out, "edgent_bench.md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
