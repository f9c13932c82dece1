"""Edgent benchmark: the paper's experiments on this machine, with real gRPC edge servers.

  python -m runtime.edgent_bench --bundle=BUNDLE --out=DIR [--frames=200] [--servers=2]
      [--deadline-ms=10] [--bandwidth-mbps=2] [--margin=0.1] [--trace-frames=1000]

Starts ``--servers`` edge servers (`runtime.edge_server`, subprocesses on
127.0.0.1) and runs the device client (`runtime.coinfer`) in this process:

1. ``bandwidth``: Edgent at a fixed deadline for bandwidths 50 kbps ... 10 Mbps:
   the chosen exit, partition and cut encoding, measured latency vs
   prediction, deadline met; where most frames cut inside the network, the
   same exit is also run device-only and edge-only (``same_exit``: does the
   interior cut beat both, measured? their latency is measured under a 10x
   deadline, so no edge call is cut off by the deadline's budget);
2. ``deadline``: at a fixed bandwidth, for a range of deadlines, Edgent and the
   baselines (device-only, edge-only, partition-only = Neurosurgeon,
   right-sizing-only): accuracy, deadline met, latency; "effective accuracy"
   counts a frame that missed its deadline as wrong (the paper's comparison);
3. ``trace``: Edgent on a fluctuating bandwidth trace (written to DIR).

A plan reads ``exit@where[+encoding]`` (`runtime.planner.Option.label`): a cut
tensor sent as float16 or int8 says so, float32 is not written; each
summary's ``encodings`` counts the frames whose cut travelled in each encoding.

Writes ``DIR/edgent_bench.json`` (every run's summary) and ``DIR/edgent_bench.md``
(the tables for BENCHMARKS.md). The library call is ``run(bundle, out, Settings(...))``
(what ``python -m train.edgent``'s bench stage runs).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import numpy as np

from flexjax.io import write_json_atomic, write_text_atomic
from runtime import args as args_lib
from runtime import coinfer, names, planner
from runtime.bundle import Bundle

BANDWIDTHS = (0.05, 0.1, 0.25, 0.5, 1.0, 1.5, 2.0, 5.0, 10.0)
DEADLINES = (2.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0)
POLICIES = ("edgent", "device-only", "edge-only", "neurosurgeon", "right-sizing")


def start_servers(
    bundle: str, n: int, threads: int = 1
) -> tuple[list[subprocess.Popen], list[str]]:
    """Starts `n` edge servers (LiteRT `threads` each) on free ports; (processes, addresses)."""
    procs, addrs = [], []
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    for _ in range(n):
        p = subprocess.Popen(
            # --insecure: private servers on 127.0.0.1, children of this process.
            [sys.executable, "-m", "runtime.edge_server", f"--bundle={bundle}", "--port=0",
             "--workers=2", f"--threads={threads}", "--insecure"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
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


def _run(bundle, edges, policy, deadline, bandwidth, frames, margin, data, keep_rows=False,
         exit_name=None, adapt=True) -> dict:  # fmt: skip
    opts = coinfer.Options(
        bundle=bundle, edges=tuple(edges), deadline_ms=deadline, bandwidth=str(bandwidth),
        frames=frames, data=data, policy=policy, margin=margin, exit=exit_name, adapt=adapt,
    )  # fmt: skip
    rep = coinfer.run(opts)
    s = dict(rep["summary"])
    rows = rep["frames"]
    s["effective_accuracy"] = float(np.mean([r["correct"] and r["met"] for r in rows]))
    s["policy"], s["bandwidth"] = policy, str(bandwidth)
    s["rtt_ms"] = rep["rtt_ms"]
    s["edges"] = rep["edges"]
    s["bandwidth_changes"] = rep["bandwidth_changes"]
    s["predicted_mean_ms"] = float(np.mean([r["predicted_ms"] for r in rows]))
    s["compute_drift"] = rep["compute_drift"]
    s["encodings"] = encodings(rows)
    if keep_rows:
        s["rows"] = rows
    return s


def encodings(rows) -> dict[str, int]:
    """Frames per cut encoding among the frames that sent a cut tensor (from their plan labels)."""
    out: dict[str, int] = {}
    for r in rows:
        if r["partition"] is not None:
            name = planner.split_label(r["plan"])[1]
            out[name] = out.get(name, 0) + 1
    return out


def _top(plans: dict) -> str:
    return max(plans, key=plans.get) if plans else "-"


def interior(label: str) -> tuple[str, int] | None:
    """``(exit, partition)`` of a plan label that cuts inside the network, else None."""
    if label == "-":
        return None
    exit_name, p = names.parse_plan_label(planner.split_label(label)[0])
    return None if p in (None, 0) else (exit_name, p)


def same_exit(edgent: dict, device_only: dict, edge_only: dict) -> dict:
    """Edgent's interior cut against device-only and edge-only at the same exit, measured."""
    return {
        "exit": interior(_top(edgent["plans"]))[0],
        "edgent_ms": edgent["mean_ms"],
        "device_only_ms": device_only["mean_ms"],
        "edge_only_ms": edge_only["mean_ms"],
        "edge_only_plan": _top(edge_only["plans"]),
        "fallbacks": [device_only["fallbacks"], edge_only["fallbacks"]],
        "wins": edgent["mean_ms"] < min(device_only["mean_ms"], edge_only["mean_ms"]),
    }


def markdown(rep: dict) -> str:
    policies = rep.get("policies", POLICIES)
    out = [f"Deadline {rep['deadline_ms']} ms, {rep['frames']} frames per run, "
           f"margin {rep['margin']}, {rep['servers']} edge servers.", ""]  # fmt: skip
    out += ["| bandwidth (Mbps) | plan (most frames) | plans | cut encodings (frames) "
            "| predicted ms | measured mean / p95 ms | met | misses remote / device-only "
            "| within 1 ms + transfer | accuracy |",
            "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    wins = [s for s in rep["bandwidth"] if "same_exit" in s]
    for s in rep["bandwidth"]:
        enc = ", ".join(f"{k} {v}" for k, v in s.get("encodings", {}).items()) or "-"
        out.append(
            f"| {s['bandwidth']} | {_top(s['plans'])} | {len(s['plans'])} | {enc} | "
            f"{s['predicted_mean_ms']:.2f} | {s['mean_ms']:.2f} / {s['p95_ms']:.2f} | "
            f"{s['deadline_met']:.3f} | {s['missed_remote']} / {s['missed_device_only']} | "
            f"{s['within_1ms_plus_transfer']:.3f} | {s['accuracy']:.3f} |"
        )
    if wins:
        out += ["", "Where Edgent cut inside the network, the same exit run device-only and "
                "edge-only (input as uint8 where lossless), measured mean ms:", "",
                "| bandwidth (Mbps) | exit | Edgent | device-only | edge-only | interior wins |",
                "|---|---|---|---|---|---|"]  # fmt: skip
        for s in wins:
            w = s["same_exit"]
            out.append(
                f"| {s['bandwidth']} | {w['exit']} | {w['edgent_ms']:.2f} | "
                f"{w['device_only_ms']:.2f} | {w['edge_only_ms']:.2f} | {w['wins']} |"
            )
    out += ["", f"At {rep['bandwidth_mbps']} Mbps (effective accuracy: a missed deadline counts "
            "as wrong):", "",
            "| deadline ms | " + " | ".join(policies) + " |",
            "|---|" + "---|" * len(policies)]  # fmt: skip
    by = {(s["policy"], s["deadline_ms"]): s for s in rep["deadline"]}
    for d in rep["deadlines"]:
        cells = []
        for pol in policies:
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `run` measures (the flags of ``python -m runtime.edgent_bench``, typed)."""

    frames: int = 200  # frames per run of the bandwidth and deadline sweeps
    servers: int = 2  # edge servers started on 127.0.0.1
    deadline_ms: float = 10.0  # the bandwidth sweep's and the trace's deadline
    bandwidth_mbps: float = 2.0  # the deadline sweep's bandwidth
    margin: float = 0.1  # the planner's relative headroom
    trace_frames: int = 1000  # frames on the fluctuating trace
    bandwidths: tuple[float, ...] = BANDWIDTHS
    deadlines: tuple[float, ...] = DEADLINES
    policies: tuple[str, ...] = POLICIES  # compared in the deadline sweep
    data: str = "mnist5k:test"  # frames: DATASET:SPLIT or npz:PATH
    trace_seconds: float = 8.0
    trace_step_s: float = 0.5
    trace_seed: int = 0
    edge_threads: int = 1  # LiteRT threads of each edge server
    adapt: bool = True  # the client learns compute drift (runtime.planner.ComputeDrift)


def run(bundle: str, out: str, settings: Settings = Settings(), log=print) -> dict:
    """Runs the three experiments (see the module docstring) against fresh edge servers.

    Writes ``out/trace.csv``, ``out/edgent_bench.json`` and ``out/edgent_bench.md``.

    Returns:
      The report: every run's summary (``bandwidth``, ``deadline``, ``trace``
      with its per-frame rows) and the settings.

    Raises:
      ValueError: bad settings; RuntimeError: an edge server did not start, or
      the errors of `runtime.coinfer.run`.
    """
    st = settings
    if st.frames < 1 or st.trace_frames < 1 or st.servers < 1:
        raise ValueError("frames, trace_frames and servers must be >= 1")
    if not st.bandwidths or not st.deadlines or "edgent" not in st.policies:
        raise ValueError("need bandwidths, deadlines and 'edgent' among the policies")
    bad = [p for p in st.policies if p not in POLICIES]
    if bad:
        raise ValueError(f"unknown policies {bad}; valid: {', '.join(POLICIES)}")
    os.makedirs(out, exist_ok=True)
    exits = [e["name"] for e in Bundle.from_dir(bundle).manifest["partitions"]["exits"]]
    procs, edges = start_servers(bundle, st.servers, st.edge_threads)
    t0 = time.perf_counter()
    try:
        rep = {"deadline_ms": st.deadline_ms, "frames": st.frames, "margin": st.margin,
               "servers": st.servers, "bandwidth_mbps": st.bandwidth_mbps,
               "deadlines": list(st.deadlines), "policies": list(st.policies), "exits": exits,
               "bandwidth": [], "deadline": []}  # fmt: skip
        for bw in st.bandwidths:
            s = _run(bundle, edges, "edgent", st.deadline_ms, bw, st.frames, st.margin, st.data,
                     adapt=st.adapt)  # fmt: skip
            cut = interior(_top(s["plans"]))
            if cut:  # the same exit, device-only and edge-only, at this bandwidth; their
                # latency as it is (a deadline 10x longer: no call is cut off by its budget)
                base = [_run(bundle, edges, pol, 10 * st.deadline_ms, bw, st.frames, st.margin,
                             st.data, exit_name=cut[0], adapt=st.adapt)
                        for pol in ("device-only", "edge-only")]  # fmt: skip
                s["same_exit"] = same_exit(s, *base)
            rep["bandwidth"].append(s)
            log(f"bandwidth {bw} Mbps: {s['plans']} met {s['deadline_met']:.3f}"
                + (f"; same exit: {s['same_exit']}" if cut else ""))  # fmt: skip
        for d in st.deadlines:
            for pol in st.policies:
                s = _run(bundle, edges, pol, d, st.bandwidth_mbps, st.frames, st.margin,
                         st.data, adapt=st.adapt)  # fmt: skip
                rep["deadline"].append(s)
            log(f"deadline {d} ms done")
        trace = os.path.join(out, "trace.csv")
        write_trace(trace, st.trace_seconds, st.trace_step_s, st.trace_seed)
        rep["trace"] = _run(bundle, edges, "edgent", st.deadline_ms, trace, st.trace_frames,
                            st.margin, st.data, keep_rows=True, adapt=st.adapt)  # fmt: skip
        rep["seconds"] = time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)
    write_json_atomic(os.path.join(out, "edgent_bench.json"), rep)
    write_text_atomic(os.path.join(out, "edgent_bench.md"), markdown(rep))
    return rep


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.edgent_bench`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m runtime.edgent_bench",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--out", required=True, help="directory for the report (created)")
    p.add_argument("--frames", type=args_lib.count(1), default=200)
    p.add_argument("--servers", type=args_lib.count(1, 64), default=2)
    p.add_argument("--deadline-ms", type=args_lib.positive(), default=10.0)
    p.add_argument("--bandwidth-mbps", type=args_lib.positive(), default=2.0)
    p.add_argument("--margin", type=args_lib.real(0.0, 10.0), default=0.1)
    p.add_argument("--trace-frames", type=args_lib.count(1), default=1000)
    p.add_argument("--static-compute", action="store_true",
                   help="plan with the profile's compute times (no drift learning)")  # fmt: skip
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    settings = Settings(
        frames=args.frames, servers=args.servers, deadline_ms=args.deadline_ms,
        bandwidth_mbps=args.bandwidth_mbps, margin=args.margin, trace_frames=args.trace_frames,
        adapt=not args.static_compute,
    )  # fmt: skip
    rep = run(args.bundle, args.out, settings, log=lambda m: print(m, flush=True))
    print(markdown(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
