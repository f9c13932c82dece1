"""Plots the Edgent benchmark (`runtime.edgent_bench`) like the paper's figures.

  python -m export.edgent_figures --bench=DIR/edgent_bench.json --out=DIR

Writes ``edgent_bandwidth.png`` (chosen exit, partition and cut encoding, predicted vs
measured latency vs bandwidth at the fixed deadline), ``edgent_deadline.png``
(effective accuracy and latency vs deadline for Edgent and the baselines) and
``edgent_trace.png`` (bandwidth, estimate, plan and latency per frame on the
fluctuating trace). matplotlib lives here, not in `runtime/`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from runtime import args as args_lib
from runtime import names, planner

POLICIES = ("edgent", "device-only", "edge-only", "neurosurgeon", "right-sizing")


def _exit_index(plan: str, exits: list[str]) -> int:
    return exits.index(names.parse_plan_label(planner.split_label(plan)[0])[0])


def plot(rep: dict, out: str) -> list[str]:
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    # Reports written before the bench recorded its bundle's exits are the 5-exit AlexNet's.
    exits = rep.get("exits") or ["exit_3", "exit_7", "exit_9", "exit_11", "final"]
    policies = rep.get("policies") or POLICIES
    paths = []
    bw = rep["bandwidth"]
    x = [float(s["bandwidth"]) for s in bw]
    top = [max(s["plans"], key=s["plans"].get) for s in bw]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.semilogx(x, [_exit_index(p, exits) + 1 for p in top], "o-", label="exit point")
    part = [names.partition_text(p) for p in top]
    for xi, p in zip(x, part):
        a1.annotate(p, (xi, 0.6), rotation=90, fontsize=7, ha="center")
    a1.set(xlabel="bandwidth (Mbps)", ylabel=f"exit point (1-{len(exits)})",
           ylim=(0, len(exits) + 0.5),
           title=f"exit / partition+encoding, deadline {rep['deadline_ms']:g} ms")  # fmt: skip
    a2.semilogx(x, [s["predicted_mean_ms"] for s in bw], "s--", label="predicted")
    a2.semilogx(x, [s["mean_ms"] for s in bw], "o-", label="measured mean")
    a2.axhline(rep["deadline_ms"], color="gray", lw=0.8, label="deadline")
    a2.set(xlabel="bandwidth (Mbps)", ylabel="latency (ms)", title="latency vs bandwidth")
    a2.legend()
    fig.tight_layout()
    paths.append(os.path.join(out, "edgent_bandwidth.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    by = {(s["policy"], s["deadline_ms"]): s for s in rep["deadline"]}
    ds = rep["deadlines"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for pol in policies:
        a1.plot(ds, [by[(pol, d)]["effective_accuracy"] for d in ds], "o-", label=pol)
        a2.plot(ds, [by[(pol, d)]["mean_ms"] for d in ds], "o-", label=pol)
    a2.plot(ds, ds, color="gray", lw=0.8, label="deadline")
    a1.set(xlabel="deadline (ms)", ylabel="accuracy (missed deadline = wrong)",
           title=f"accuracy vs deadline at {rep['bandwidth_mbps']:g} Mbps")  # fmt: skip
    a2.set(xlabel="deadline (ms)", ylabel="mean latency (ms)", title="latency vs deadline")
    a1.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out, "edgent_deadline.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    rows = rep["trace"].get("rows")
    if rows:
        t = np.array([r["t_s"] for r in rows])
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(11, 5), sharex=True)
        a1.semilogy(t, [r["true_mbps"] for r in rows], label="link (emulated)")
        a1.semilogy(t, [max(r["est_mbps"], 1e-3) for r in rows], label="estimate (EWMA)")
        a1.set(ylabel="Mbps", title="fluctuating trace")
        a1.legend(fontsize=8)
        a2.plot(t, [r["measured_ms"] for r in rows], ".", ms=2, label="measured")
        a2.plot(t, [r["predicted_ms"] for r in rows], "-", lw=0.8, label="predicted")
        a2.axhline(rep["deadline_ms"], color="gray", lw=0.8)
        a2.set(xlabel="time (s)", ylabel="latency (ms)", ylim=(0, 3 * rep["deadline_ms"]))
        a2.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out, "edgent_trace.png"))
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m export.edgent_figures``."""
    p = args_lib.ArgumentParser(prog="python -m export.edgent_figures",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--bench", required=True, type=args_lib.json_file("dict"),
                   help="edgent_bench.json")  # fmt: skip
    p.add_argument("--out", required=True)
    return p


def main(argv=None) -> int:
    return args_lib.run(build_parser(), _main, argv, errors=(KeyError, TypeError))


def _main(args) -> int:
    rep = args_lib.read_json(args.bench, "dict", "report")
    os.makedirs(args.out, exist_ok=True)
    paths = plot(rep, args.out)
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
