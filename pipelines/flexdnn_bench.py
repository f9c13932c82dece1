"""FlexDNN's benchmark and report: every system timed in one interleaved LiteRT run.

Systems are bundles run by the runtime's `EarlyExitExecutor` (early exits
with the thresholds their bundle carries, or the ``full`` signature for the
input-agnostic baselines). On each data source `benchmark` makes two runs:

* the equal-accuracy comparison (`runtime.equal_accuracy`, the headline): every
  operating point of every system's threshold sweep (the bundle's calibrations at
  every stored epsilon and a shared-threshold sweep, the same families for FlexDNN
  and BranchyNet) timed in ONE interleaved run on the same frames; the time per
  frame read off each system's Pareto front at the backbone's accuracy minus 0.5,
  1 and 2 points, against the labels and against the backbone's own top-1;
* the single operating points (each early-exit system at its bundle's thresholds
  for the config's epsilon), the second table.

`targets`, `plot` and `format_report` turn the job's report into the issue's
targets, a figure and text.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from export.bundle import FLOPS
from flexjax import exits, flexdnn
from flexjax.io import save_figure_atomic
from runtime import data as runtime_data
from runtime import equal_accuracy, timing
from runtime.bundle import Bundle
from runtime.executor import EarlyExitExecutor
from runtime.names import FULL
from runtime.timing import time_stats

TARGETS = {"max_accuracy_loss": 0.01, "vs_backbone": 0.6, "vs_branchynet": 0.7}
# Issue 13: at the backbone's accuracy - 1 point (labels), read off the measured curves.
EQUAL_ACCURACY_TARGETS = {"drop": 0.01, "vs_backbone": 0.6, "vs_branchynet": 0.72}


class EarlyExitSystem:
    """A bundle run with the runtime's early-exit executor and the thresholds it carries."""

    def __init__(self, bundle_dir: str, full: bool = False):
        self.bundle = Bundle.from_dir(bundle_dir)
        self.ex = EarlyExitExecutor(self.bundle, num_threads=1)
        self.full = full
        self.names = [e.name for e in self.bundle.exits]
        m = self.bundle.manifest
        self.flops = {e["name"]: e["flops"] for e in m["exits"]}
        self.backbone_flops = m["costs"]["backbone_flops"]

    def measure(self, x_probe, rounds, calls) -> None:
        sigs = self.bundle.manifest["signatures"]
        inputs = {}
        h = x_probe[None].astype(np.float32)
        for e in self.bundle.exits:
            inputs[e.segment] = h
            h = self.ex.model.signature(e.segment)(np.ascontiguousarray(h))
            if e.head:
                inputs[e.head] = h
        inputs[FULL] = x_probe[None].astype(np.float32)
        self.sig_ms = flexdnn.signature_times(
            self.ex.model, {k: v for k, v in inputs.items() if k in sigs}, rounds=rounds,
            calls=calls,
        )  # fmt: skip
        ex = self.bundle.exits
        self.head_ms = [self.sig_ms[e.head] for e in ex if e.head]
        self.seg_ms = [self.sig_ms[e.segment] for e in ex]

    def exit_ms(self) -> dict[str, float]:
        side = self.names[:-1]
        return flexdnn.exit_costs(range(len(side)), self.head_ms, self.seg_ms, side)

    def reload(self) -> None:
        """Re-reads the bundle (after `calibrate_bundle`); keeps the measured times."""
        self.bundle = Bundle.from_dir(self.bundle.path)
        self.ex = EarlyExitExecutor(self.bundle, num_threads=1)

    def use_calibration(self, source: str, epsilon: float) -> dict:
        """Runs with the bundle's own thresholds calibrated on `source` at `epsilon`."""
        row = self.bundle.calibration(source, epsilon)
        self.set_thresholds(row["thresholds"])
        return row

    def set_thresholds(self, thresholds) -> None:
        self.thresholds = dict(thresholds)
        self.ex = EarlyExitExecutor(
            self.bundle, thresholds=self.thresholds or None, model=self.ex.model
        )

    def fn(self) -> Callable:
        if self.full:
            return lambda x: int(self.ex.run_full(x).argmax())
        return lambda x: self.ex.run(x).prediction


def sweep(system: EarlyExitSystem, source, test_logits, test_y, criterion) -> list[dict]:
    """Accuracy vs expected time per frame over the bundle's calibrations (val -> test)."""

    ms = system.exit_ms()
    out = []
    for eps in exits.EPSILONS:
        thresholds = system.bundle.calibration(source, eps)["thresholds"]
        st = exits.simulate(test_logits, test_y, thresholds, criterion, ms, system.names)
        flops = sum(st.rates[n] * system.flops[n] for n in system.names)
        out.append(
            {
                "epsilon": eps,
                "accuracy": st.accuracy,
                "expected_ms": st.expected_cost,
                "flops_ratio": flops / system.backbone_flops,
                "exit_rates": st.rates,
            }
        )
    return out


def benchmark(systems: dict, sources: dict, criterion, epsilon, rounds, log) -> dict:
    """Sweeps and times every system on every data source, interleaved.

    `sources` maps a data source to ``(calibration source, frames)``: each
    early-exit system runs with its bundle's thresholds for that calibration
    source at `epsilon` (what ``runtime.bench`` picks for the same data).
    """

    out: dict = {}
    for src, (cal_source, test) in sources.items():
        log(f"benchmark on {src}: {len(test.y)} frames, {len(systems)} systems, {rounds} rounds")
        rows: dict = {}
        for name, sys_ in systems.items():
            row: dict = {}
            if not sys_.full:
                cal = sys_.use_calibration(cal_source, epsilon)
                test_logits = sys_.ex.all_logits(test.x)
                row["thresholds"] = cal["thresholds"]
                row["calibration"] = {"source": cal_source, "epsilon": epsilon,
                                      "cost": cal.get("cost", FLOPS)}  # fmt: skip
                row["sweep"] = sweep(sys_, cal_source, test_logits, test.y, criterion)
                row["test_logits"] = test_logits
            rows[name] = row
        fns = {n: s.fn() for n, s in systems.items()}
        xs = [systems[next(iter(systems))].ex.frame(x) for x in test.x]
        t = timing.interleaved(fns, xs, rounds=rounds, warmup=min(20, len(xs)), order="rotate")
        times = t.ns
        preds = {n: np.asarray(p, np.int64) for n, p in t.outputs.items()}
        for n, s in systems.items():
            row = rows[n]
            row["accuracy"] = float((preds[n] == test.y).mean())
            row["time_per_frame"] = time_stats(times[n])
            if not s.full:
                st = exits.simulate(
                    row.pop("test_logits"), test.y, s.thresholds, criterion, None, s.names
                )
                row["exit_rates"] = st.rates
                row["expected_flops"] = sum(st.rates[k] * s.flops[k] for k in s.names)
            else:
                row["expected_flops"] = s.backbone_flops
        base = rows["backbone"]["time_per_frame"]["mean_ms"]
        base_flops = rows["backbone"]["expected_flops"]
        for row in rows.values():
            row["ratio_vs_backbone"] = row["time_per_frame"]["mean_ms"] / base
            row["flops_ratio"] = row["expected_flops"] / base_flops
        out[src] = {"frames": len(xs), "rounds": rounds, "systems": rows}
        out[src]["equal_accuracy"] = equal_accuracy_run(systems, src, cal_source, test, rounds, log)
    return out


def equal_accuracy_run(systems: dict, src: str, cal_source: str, test, rounds: int, log) -> dict:
    """`runtime.equal_accuracy.compare` over the job's systems on one data source.

    The curves' systems are the early-exit bundles (calibrations on `cal_source`);
    the backbone and the lossy models are single points; the targets are read from
    the backbone's accuracy, against the labels and against the backbone's top-1.
    """
    kind = "video" if cal_source == "video_val" else "images"
    frames = runtime_data.Frames(np.asarray(test.x, np.float32), np.asarray(test.y, np.int64),
                                 src, kind)  # fmt: skip
    eq = [
        equal_accuracy.System(n, s.bundle, full=s.full, model=s.ex.model, calibration=cal_source)
        for n, s in systems.items()
    ]
    load0 = list(os.getloadavg())
    rep = equal_accuracy.compare(eq, frames, baseline="backbone", references=["backbone"],
                                 rounds=rounds, log=log)  # fmt: skip
    rep["load_average"] = {"start": load0, "end": list(os.getloadavg())}
    return rep


def targets(report: dict) -> dict:
    """The issue's targets, met or missed, per data source."""
    out = {}
    for src, b in report["benchmark"].items():
        s = b["systems"]
        loss = s["backbone"]["accuracy"] - s["flexdnn"]["accuracy"]
        vs_b = (
            s["flexdnn"]["time_per_frame"]["mean_ms"] / s["backbone"]["time_per_frame"]["mean_ms"]
        )
        vs_br = (
            s["flexdnn"]["time_per_frame"]["mean_ms"] / s["branchynet"]["time_per_frame"]["mean_ms"]
        )
        r = report["R_remeasured_on_test"].get(src, {})
        out[src] = {
            "accuracy_loss_vs_backbone": loss,
            "accuracy_loss_ok": loss <= TARGETS["max_accuracy_loss"] + 1e-12,
            "time_vs_backbone": vs_b,
            "time_vs_backbone_ok": vs_b <= TARGETS["vs_backbone"],
            "time_vs_branchynet": vs_br,
            "time_vs_branchynet_ok": vs_br <= TARGETS["vs_branchynet"],
            "kept_R": r,
            "kept_R_above_1": all(v > 1 for v in r.values()),
        }
        if "equal_accuracy" in b:
            out[src]["equal_accuracy"] = equal_accuracy_targets(b["equal_accuracy"])
    return out


def _meets(a: dict, b: dict, limit: float) -> tuple[float | None, bool | None]:
    """(a's time / b's time, whether it is <= limit) at one target; None where unknown.

    A reading ``at fastest`` is an upper bound on that system's time, so the ratio is
    an upper bound (a's) or a lower bound (b's): the verdict stands only where the
    bound decides it. a not reaching the target misses it; b not reaching it (a does)
    meets it.
    """
    if not a["reached"]:
        return None, False
    if not b["reached"]:
        return None, True
    ratio = a["ms"] / b["ms"]
    upper, lower = a["how"] == "at fastest", b["how"] == "at fastest"
    ok = ratio <= limit
    if (upper and lower) or (upper and not ok) or (lower and ok):
        return ratio, None
    return ratio, ok


def equal_accuracy_targets(eq: dict, reference: str = equal_accuracy.LABELS) -> dict:
    """FlexDNN against the backbone and BranchyNet at `EQUAL_ACCURACY_TARGETS`'s drop.

    ``*_ok`` is True (met), False (missed) or None (undetermined: a reading at a
    curve's fastest point is only a bound, `_meets`).
    """
    drop = EQUAL_ACCURACY_TARGETS["drop"]
    row = next(t for t in eq["headline"][reference]["targets"] if abs(t["drop"] - drop) < 1e-12)
    at = row["systems"]
    f, b, br = at["flexdnn"], at["backbone"], at["branchynet"]
    vs_b, ok_b = _meets(f, b, EQUAL_ACCURACY_TARGETS["vs_backbone"])
    vs_br, ok_br = _meets(f, br, EQUAL_ACCURACY_TARGETS["vs_branchynet"])
    return {
        "drop": drop,
        "reference": reference,
        "target_accuracy": row["accuracy"],
        "ms": {n: v["ms"] for n, v in at.items()},
        "time_vs_backbone": vs_b,
        "time_vs_backbone_ok": ok_b,
        "time_vs_branchynet": vs_br,
        "time_vs_branchynet_ok": ok_br,
        "flexdnn_reached": f["reached"],
        "branchynet_reached": br["reached"],
        "how": {n: v["how"] for n, v in at.items()},
    }


def plot(report: dict, path: str) -> None:
    """Per data source: accuracy (top) and agreement with the backbone (bottom) vs measured
    time per frame, every operating point of the one interleaved run and each Pareto
    front (`runtime.equal_accuracy.plot_axes`). The single operating points (another run,
    mean time) are in the second table only: their times are another statistic."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    srcs = list(report["benchmark"])
    refs = [equal_accuracy.LABELS, "backbone"]
    fig, axes = plt.subplots(len(refs), len(srcs), figsize=(6.5 * len(srcs), 4.6 * len(refs)),
                             squeeze=False)  # fmt: skip
    for j, src in enumerate(srcs):
        b = report["benchmark"][src]
        for i, ref in enumerate(refs):
            ax = axes[i][j]
            title = f"{report['net']} on {report['dataset']}: {src}"
            if "equal_accuracy" in b:
                equal_accuracy.plot_axes(b["equal_accuracy"], ax, ref, title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def format_report(report: dict) -> str:
    lines = [
        f"FlexDNN on {report['net']} / {report['dataset']} "
        f"(delta={report['delta']}, epsilon={report['epsilon']})",
        f"{'exit':<10}{'pos':>4}{'MFLOPs':>9}{'ms':>8}{'R by round':>28}  kept",
    ]
    for c in report["candidates"]:
        rs = " ".join("-" if r is None else f"{r:.2f}" for r in c["R_by_round"])
        kept = "yes" if c["kept"] else f"removed #{c['removed_at']}"
        lines.append(
            f"{c['name']:<10}{c['position']:>4}{c['flops'] / 1e6:>9.3f}{c['latency_ms']:>8.4f}"
            f"  {rs:>26}  {kept}"
        )
    for src, b in report["benchmark"].items():
        if "equal_accuracy" in b:
            lines.append(equal_accuracy.format_report(b["equal_accuracy"], src))
            e = report["targets"][src].get("equal_accuracy")
            if e:

                def r(v):
                    return "n/a (not reached)" if v is None else f"{v:.3f}x"

                def verdict(v):
                    return "UNDETERMINED: a bound" if v is None else "ok" if v else "MISSED"

                lines.append(
                    f"  at -{e['drop'] * 100:g} pt: FlexDNN {r(e['time_vs_backbone'])} backbone "
                    f"({verdict(e['time_vs_backbone_ok'])}), "
                    f"{r(e['time_vs_branchynet'])} BranchyNet "
                    f"({verdict(e['time_vs_branchynet_ok'])})"
                )
        lines.append(
            f"{src}, single operating points at epsilon={report['epsilon']} "
            f"({b['frames']} frames, {b['rounds']} interleaved rounds):"
        )
        for name, row in b["systems"].items():
            lines.append(
                f"  {name:<14} accuracy {row['accuracy']:.4f}  "
                f"{row['time_per_frame']['mean_ms']:.4f} ms/frame (mean)  "
                f"{row['ratio_vs_backbone']:.3f}x backbone  FLOPs {row['flops_ratio']:.3f}x"
            )
        t = report["targets"][src]

        def ok(key: str) -> str:
            return "ok" if t[key] else "MISSED"  # noqa: B023 - used in this iteration only

        lines.append(
            f"  targets: accuracy loss {t['accuracy_loss_vs_backbone']:+.4f} "
            f"({ok('accuracy_loss_ok')}), {t['time_vs_backbone']:.3f}x backbone "
            f"({ok('time_vs_backbone_ok')}), {t['time_vs_branchynet']:.3f}x BranchyNet "
            f"({ok('time_vs_branchynet_ok')}), kept R > 1: {ok('kept_R_above_1')}"
        )
    return "\n".join(lines)
