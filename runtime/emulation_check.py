"""Shows how faithful the emulated device is: its time per signature against S x the edge's.

  python -m runtime.emulation_check --bundle=BUNDLE [--slowdown=20] [--rounds=30] \\
      [--clock=virtual|sleep] [--min-ms=1] [--tolerance=0.1] [--json=OUT]

Every signature of the bundle (its partition signatures when it has them,
else the main model's; a sweep bundle's single-layer signatures and probe)
runs on two LiteRT interpreters here, both with one
thread, interleaved signature by signature and round by round (the order of
signatures rotates each round, and which side goes first alternates):

* the **edge**: ``local:threads=1``, wall time (``time.perf_counter``);
* the **emulated device**: ``local:threads=1:slowdown=S[:clock=...]``
  (`runtime.profile.Target`): with ``clock=virtual`` S x the CPU time the call
  consumed on the calling thread, with ``clock=sleep`` the wall time of a call
  padded by sleeping to S x its CPU time (the former emulation).

Each measurement repeats a signature enough times to last ``--min-ms`` of
edge wall time (timer and call overhead then stay small for the tiniest
signatures). Per signature it reports the median edge and device time over
rounds, their ratio device / edge (the emulation is faithful when it is S),
the spread of the per-round ratios (p10-p90), and whether the ratio is within
``--tolerance`` of S; plus two checks of the method: process CPU / thread CPU
during the device's calls (1.0: LiteRT computed on the calling thread, no
worker thread did work the thread clock misses) and edge CPU / edge wall
(below 1.0: the edge waited for other tenants of this machine, a cost the
dedicated emulated device does not pay by design).
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime.bundle import Bundle, BundleError, read_files, read_manifest
from runtime.lite import Model
from runtime.profile import CLOCKS, MAX_SLOWDOWN, SWEEP_FORMAT, Target
from runtime.timing import round_order


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `check` measures (the flags of ``python -m runtime.emulation_check``)."""

    slowdown: float = 20.0
    rounds: int = 30
    clock: str = "virtual"
    min_ms: float = 1.0  # edge wall time each measurement lasts at least
    tolerance: float = 0.1  # a faithful signature's ratio is within S x (1 +- tolerance)
    warmup: int = 5


def _signatures(path: str) -> tuple[list[str], Callable[[], Model]]:
    """The signature names of a bundle or sweep bundle and a factory of fresh interpreters."""
    manifest = read_manifest(path)
    if isinstance(manifest, dict) and manifest.get("format") == SWEEP_FORMAT:
        try:
            files = read_files(path, manifest)
            names = [r["signature"] for r in manifest["layers"]] + [manifest["probe"]]
            data = files[manifest["model"]]
        except (KeyError, TypeError) as e:
            what = f"{type(e).__name__} {e}"
            raise BundleError(f"{path}: malformed sweep manifest ({what})") from None
        names = list(dict.fromkeys(names))
        return names, lambda: Model.from_bytes(data, num_threads=1)
    bundle = Bundle.from_dir(path)
    part = bundle.manifest.get("partitions")
    if part is not None:
        return list(part["signatures"]), lambda: bundle.load_partitions(1)
    return list(bundle.manifest["signatures"]), lambda: bundle.load(1)


def check(bundle_dir: str, st: Settings = Settings()) -> dict:
    """Runs the comparison (see the module docstring); returns the report.

    Raises:
      ValueError: bad settings. BundleError: a missing or corrupt bundle.
    """
    if st.rounds < 1 or not (1.0 < st.slowdown <= MAX_SLOWDOWN) or st.clock not in CLOCKS:
        raise ValueError(
            f"need rounds >= 1, 1 < slowdown <= {MAX_SLOWDOWN:g} and a clock in {CLOCKS}"
        )
    if not (st.min_ms > 0 and math.isfinite(st.min_ms) and 0 < st.tolerance < 1):
        raise ValueError("need min_ms > 0 and 0 < tolerance < 1")
    edge = Target.parse("local:threads=1")
    dev = Target.parse(f"local:threads=1:slowdown={st.slowdown:g}:clock={st.clock}")
    names, load = _signatures(bundle_dir)
    edge_model, dev_model = load(), load()  # the device has its own interpreter
    rng = np.random.default_rng(0)
    sigs, inputs, calls = {}, {}, {}
    for n in names:
        e, d = edge_model.signature(n), dev_model.signature(n)
        x = rng.random(e.input_shape).astype(e.input_dtype)
        for _ in range(st.warmup):
            e(x)
            d(x)
        t0 = time.perf_counter()
        for _ in range(st.warmup):
            e(x)
        per_call = (time.perf_counter() - t0) / st.warmup
        calls[n] = max(1, math.ceil(st.min_ms / 1e3 / max(per_call, 1e-9)))
        sigs[n], inputs[n] = (e, d), x
    edge_s = {n: [] for n in names}
    edge_cpu = {n: [] for n in names}
    dev_s = {n: [] for n in names}
    proc_cpu, thread_cpu = 0.0, 0.0
    t_start = time.perf_counter()
    for r in range(st.rounds):
        for n in round_order(names, r):
            (e, d), x, k = sigs[n], inputs[n], calls[n]
            for side in ("edge", "device") if r % 2 == 0 else ("device", "edge"):
                if side == "edge":
                    c0, t0 = time.thread_time(), time.perf_counter()
                    for _ in range(k):
                        e(x)
                    edge_s[n].append((time.perf_counter() - t0) / k)
                    edge_cpu[n].append((time.thread_time() - c0) / k)
                else:
                    p0, c0 = time.process_time(), time.thread_time()
                    total = sum(dev.run(d, x)[1] for _ in range(k))
                    proc_cpu += time.process_time() - p0
                    thread_cpu += time.thread_time() - c0
                    dev_s[n].append(total / k)
    rows = []
    for n in names:
        e, d, c = (np.asarray(v[n]) for v in (edge_s, dev_s, edge_cpu))
        ratio = float(np.median(d) / np.median(e))
        per_round = d / e
        rows.append({
            "signature": n,
            "calls": calls[n],
            "edge_ms": float(np.median(e) * 1e3),
            "device_ms": float(np.median(d) * 1e3),
            "ratio": ratio,
            "ratio_p10": float(np.percentile(per_round, 10)),
            "ratio_p90": float(np.percentile(per_round, 90)),
            "ratio_vs_edge_cpu": float(np.median(d) / np.median(c)),
            "edge_cpu_over_wall": float(np.median(c) / np.median(e)),
            "within": abs(ratio / st.slowdown - 1.0) <= st.tolerance,
        })  # fmt: skip
    ratios = np.array([r["ratio"] for r in rows])
    return {
        "bundle": os.path.abspath(bundle_dir),
        "settings": dataclasses.asdict(st),
        "device": dev.spec,
        "edge": edge.spec,
        "signatures": rows,
        "summary": {
            "signatures": len(rows),
            "edge_ms_min": min(r["edge_ms"] for r in rows),
            "edge_ms_max": max(r["edge_ms"] for r in rows),
            "ratio_median": float(np.median(ratios)),
            "ratio_min": float(ratios.min()),
            "ratio_max": float(ratios.max()),
            "within": int(sum(r["within"] for r in rows)),
            "all_within": all(r["within"] for r in rows),
            "process_over_thread_cpu": proc_cpu / thread_cpu if thread_cpu > 0 else None,
            "seconds": time.perf_counter() - t_start,
            "loadavg": list(os.getloadavg()),
        },
    }


def format_report(rep: dict) -> str:
    st, s = rep["settings"], rep["summary"]
    lines = [
        f"{'signature':<14}{'edge ms':>10}{'device ms':>11}{'ratio':>8}{'p10-p90':>15}"
        f"{'vs cpu':>8}{'cpu/wall':>9}  ok"
    ]
    for r in rep["signatures"]:
        lines.append(
            f"{r['signature']:<14}{r['edge_ms']:>10.4f}{r['device_ms']:>11.3f}{r['ratio']:>8.2f}"
            f"{r['ratio_p10']:>7.2f}-{r['ratio_p90']:<7.2f}{r['ratio_vs_edge_cpu']:>8.2f}"
            f"{r['edge_cpu_over_wall']:>9.2f}  {'yes' if r['within'] else 'NO'}"
        )
    pt = s["process_over_thread_cpu"]
    lines.append(
        f"{rep['device']} vs {rep['edge']}, {st['rounds']} rounds, {s['signatures']} signatures "
        f"({s['edge_ms_min']:.4f}-{s['edge_ms_max']:.3f} ms on the edge): ratio median "
        f"{s['ratio_median']:.2f} (min {s['ratio_min']:.2f}, max {s['ratio_max']:.2f}) for S = "
        f"{st['slowdown']:g}; within {st['tolerance']:.0%}: {s['within']}/{s['signatures']}; "
        f"process/thread CPU during device calls "
        + ("-" if pt is None else f"{pt:.3f}")
        + f"; load average {s['loadavg'][0]:.2f}; {s['seconds']:.1f} s"
    )
    return "\n".join(lines)


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.emulation_check`` (every domain declared)."""
    p = args_lib.ArgumentParser(
        prog="python -m runtime.emulation_check", description=__doc__.split("\n")[0]
    )
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--slowdown", type=args_lib.real(1.0, MAX_SLOWDOWN, lo_open=True),
                   default=20.0, help="S: the emulated device's slowdown")  # fmt: skip
    p.add_argument("--rounds", type=args_lib.count(1, 100_000), default=30)
    p.add_argument("--clock", choices=CLOCKS, default="virtual")
    p.add_argument("--min-ms", type=args_lib.real(0.0, 1000.0, lo_open=True), default=1.0,
                   help="edge wall time each measurement lasts at least")  # fmt: skip
    p.add_argument("--tolerance", type=args_lib.real(0.0, 1.0, lo_open=True, hi_open=True),
                   default=0.1, help="relative tolerance around S")  # fmt: skip
    p.add_argument("--json", default=None, type=args_lib.output_file(), help="report JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    st = Settings(slowdown=args.slowdown, rounds=args.rounds, clock=args.clock,
                  min_ms=args.min_ms, tolerance=args.tolerance)  # fmt: skip
    rep = check(args.bundle, st)
    if args.json:
        write_json_atomic(args.json, rep)
    print(format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
