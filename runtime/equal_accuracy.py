"""Equal-accuracy comparison: accuracy vs MEASURED time per frame, every point in one run.

  python -m runtime.equal_accuracy --bundle=flexdnn=B1 --bundle=branchynet=B2 \\
      --full=backbone=B1 --bundle=lossy=B3 --data=mnist5k:test [--points=calibrated,uniform:6] \\
      [--rounds=3] [--limit=N] [--reference=backbone] [--drops=0.005,0.01,0.02] \\
      [--json=OUT.json] [--plot=OUT.png]

Systems. ``--bundle=NAME=DIR``: an early-exit bundle, run by the runtime's
`EarlyExitExecutor` at every operating point of the sweep (a curve); a bundle
without side exits (a lossy model) is one point, its ``full`` signature.
``--full=NAME=DIR``: a bundle's ``full`` signature (the whole backbone as one
graph): the input-agnostic lossless baseline, one point.

Operating points (``--points``, the SAME families for every early-exit system):

* ``calibrated``: every calibration row the bundle stores for the calibration
  source (``--calibration``; auto: ``video_val`` for video data where the bundle
  has it, else ``val``): per-exit thresholds chosen on the same validation data,
  by the same method, at every stored epsilon (`flexjax.exits.EPSILONS`). These
  are the settings a user can deploy.
* ``uniform:N``: one threshold shared by every side exit, at N quantiles of the
  system's own side-exit scores on the benchmark frames (so the points spread
  over the range of exit rates), plus the two ends: never exit, and every frame
  leaves at the first side exit. BranchyNet's own sweep; it places points, it
  does not pick one: every point is then measured.

Every point of every system is timed in ONE `runtime.timing.interleaved` run
(order rotating every round) on the same frames: a point's time is what the
executor spends with those thresholds on those frames, never an estimate from
costs. A point's time per frame is, per frame, the fastest of its rounds (the work
is the same every round; preemption only adds), averaged over the frames (so the
mix of early and late exits counts in full): on a loaded machine the plain mean
is dominated by preemption spikes. Mean / p50 / p95 over all calls and the median
over rounds of the round's mean are kept in the report too.

Accuracy is agreement with the data source's labels; ``--reference=SYSTEM``
also reports agreement with that single-point system's own top-1 on the same
frames (e.g. the backbone's). Per reference, each system's curve is its Pareto
front (a point is kept only if it is more accurate than every faster point), and
the headline reads the time per frame at the baseline's accuracy minus each
``--drops`` value, interpolating linearly between the two front points that
bracket the target (what mixing those two settings frame by frame achieves). A
target above the curve's best point is ``not reached`` (never extrapolated);
a target below its fastest point reads that point's time (``at fastest``: the
curve does not show how much faster the system could go).

numpy + LiteRT only; the plot (``--plot``) needs matplotlib and is optional.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import platform
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import criteria, timing
from runtime import data as data_lib
from runtime.bundle import Bundle, BundleError
from runtime.executor import EarlyExitExecutor
from runtime.names import FULL

DEFAULT_POINTS = "calibrated,uniform:6"
DEFAULT_DROPS = (0.005, 0.01, 0.02)  # accuracy points below the baseline (0.01 = 1 point)
LABELS = "labels"
MAX_UNIFORM = 200


# ------------------------------------------------------------------ curves (pure numpy)


def _check_point(ms: float, acc: float) -> None:
    if not (math.isfinite(ms) and ms >= 0):
        raise ValueError(f"time per frame must be a finite number >= 0, got {ms}")
    if not (math.isfinite(acc) and 0 <= acc <= 1):
        raise ValueError(f"accuracy must be a finite number in [0, 1], got {acc}")


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the Pareto front of (ms, accuracy) points, fastest first.

    A point stays if it is strictly more accurate than every point at most as fast
    (ties in time: the more accurate one; equal points: the first listed).

    Raises:
      ValueError: no points, or a time / accuracy that is non-finite or out of range.
    """
    if not len(points):
        raise ValueError("a curve needs at least one point")
    for ms, acc in points:
        _check_point(ms, acc)
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], -1.0
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def time_at(curve: Sequence[tuple[float, float]], target: float) -> dict:
    """The time per frame at which a Pareto front (fastest first) first reaches `target`.

    Returns ``{"ms", "reached", "how"}``: ``how`` is ``interpolated`` (between the
    two front points bracketing the target), ``point`` (a point exactly at the
    target), ``at fastest`` (the fastest point is already at least as accurate:
    its time, an upper bound) or ``not reached`` (``ms`` None: the most accurate
    point is below the target; never extrapolated).
    """
    if not math.isfinite(target):
        raise ValueError(f"target accuracy must be finite, got {target}")
    if not len(curve):
        raise ValueError("a curve needs at least one point")
    for i, (ms, acc) in enumerate(curve):
        _check_point(ms, acc)
        if i and not (ms >= curve[i - 1][0] and acc > curve[i - 1][1]):
            raise ValueError("time_at needs a Pareto front (time and accuracy increasing)")
    prev = None
    for ms, acc in curve:
        if acc >= target:
            if prev is None:
                how = "point" if acc == target else "at fastest"
                return {"ms": float(ms), "reached": True, "how": how}
            if acc == target:
                return {"ms": float(ms), "reached": True, "how": "point"}
            f = (target - prev[1]) / (acc - prev[1])
            return {"ms": float(prev[0] + f * (ms - prev[0])), "reached": True,
                    "how": "interpolated"}  # fmt: skip
        prev = (ms, acc)
    return {"ms": None, "reached": False, "how": "not reached"}


# ------------------------------------------------------------------ systems and points


@dataclasses.dataclass
class System:
    """One system under comparison.

    full: run the bundle's ``full`` signature (one point) instead of early exits.
    model: an already loaded `runtime.lite.Model` of the bundle to share.
    calibration: the calibration source of the ``calibrated`` points (``auto``:
      ``video_val`` for video frames where the bundle has it, else ``val``).
    """

    name: str
    bundle: Bundle
    full: bool = False
    model: Any = None
    calibration: str = "auto"

    @property
    def side_exits(self) -> list[str]:
        return [e.name for e in self.bundle.exits if e.head]

    @property
    def single_point(self) -> bool:
        return self.full or not self.side_exits


def parse_points(spec: str) -> list[tuple[str, int]]:
    """``calibrated,uniform:6`` -> [("calibrated", 0), ("uniform", 6)]."""
    out = []
    for part in spec.split(","):
        kind, _, n = part.strip().partition(":")
        if kind == "calibrated" and not n:
            out.append(("calibrated", 0))
        elif kind == "uniform":
            try:
                k = int(n)
            except ValueError:
                k = -1
            if not 1 <= k <= MAX_UNIFORM:
                raise ValueError(f"--points: uniform:N needs N in [1, {MAX_UNIFORM}], got {part!r}")
            out.append(("uniform", k))
        else:
            raise ValueError(
                f"--points: unknown family {part!r}; valid: calibrated, uniform:N (comma-separated)"
            )
    if len({k for k, _ in out}) != len(out):
        raise ValueError(f"--points names a family twice: {spec!r}")
    return out


def calibration_source(bundle: Bundle, kind: str, source: str) -> str:
    if source != "auto":
        return source
    rows = bundle.manifest.get("calibrations", [])
    has_video = any(r["source"] == "video_val" for r in rows)
    return "video_val" if kind == "video" and has_video else "val"


def operating_points(system: System, families, frames_kind: str, logits=None) -> list[dict]:
    """The threshold settings of an early-exit system (module docstring), deduplicated.

    `logits`: exit name -> [N, C] on the benchmark frames (for ``uniform``).
    """
    side = system.side_exits
    crit = system.bundle.criterion
    pts: list[dict] = []
    for kind, n in families:
        if kind == "calibrated":
            src = calibration_source(system.bundle, frames_kind, system.calibration)
            rows = [r for r in system.bundle.manifest.get("calibrations", []) if r["source"] == src]
            if not rows:
                have = sorted({r["source"] for r in system.bundle.manifest.get("calibrations", [])})
                raise BundleError(
                    f"bundle {system.bundle.path} ({system.name}) has no calibrations for "
                    f"source {src}; has {have}"
                )
            for r in sorted(rows, key=lambda r: r["epsilon"]):
                pts.append({
                    "family": "calibrated", "label": f"eps={r['epsilon']:g}",
                    "epsilon": float(r["epsilon"]), "source": src,
                    "method": r.get("method", "empirical"),
                    "thresholds": {e: r["thresholds"].get(e) for e in side},
                })  # fmt: skip
        else:
            pooled = np.concatenate([criteria.score(logits[e], crit) for e in side])
            qs = (np.arange(n) + 0.5) / n
            for q, s in zip(qs, np.quantile(pooled, qs)):
                t = float(criteria.from_score(float(s), crit))
                pts.append({"family": "uniform", "label": f"q={q:.3g}", "quantile": float(q),
                            "thresholds": dict.fromkeys(side, t)})  # fmt: skip
            pts.append({"family": "uniform", "label": "never", "quantile": None,
                        "thresholds": dict.fromkeys(side)})  # fmt: skip
            # Every frame leaves at the first side exit: the fastest the system can go.
            first = 0.0 if crit == "max_softmax" else math.log(system.bundle.num_classes) + 1e-6
            pts.append({"family": "uniform", "label": "first", "quantile": 0.0,
                        "thresholds": dict.fromkeys(side, first)})  # fmt: skip
    out: list[dict] = []
    for p in pts:
        same = next((q for q in out if q["thresholds"] == p["thresholds"]), None)
        if same is None:
            p["also"] = []
            out.append(p)
        else:
            same["also"].append(p["label"])
    return out


# ------------------------------------------------------------------ the measurement


def _full_fn(ex: EarlyExitExecutor) -> Callable:
    return lambda x: int(ex.run_full(x).argmax())


def _one_fn(ex: EarlyExitExecutor) -> Callable:
    return lambda x: ex.run(x).prediction


def _exit_fn(ex: EarlyExitExecutor) -> Callable:
    def fn(x):
        r = ex.run(x)
        return r.prediction, r.index

    return fn


def compare(
    systems: Sequence[System],
    frames: data_lib.Frames | Mapping[str, data_lib.Frames],
    *,
    points: str = DEFAULT_POINTS,
    baseline: str | None = None,
    references: Sequence[str] = (),
    drops: Sequence[float] = DEFAULT_DROPS,
    rounds: int = 3,
    warmup: int = 20,
    threads: int = 1,
    log: Callable[[str], None] = lambda _m: None,
) -> dict:
    """Times every operating point of every system in one interleaved run; the report.

    Args:
      systems: the systems (distinct names).
      frames: the frames every system runs on, or per system name its own copy of the
        same frames (e.g. at a lossy model's lower resolution): labels must agree.
      points: operating-point families (`parse_points`).
      baseline: the single-point system whose accuracy the targets are read from
        (default: the first single-point system).
      references: single-point systems whose top-1 is also a reference (agreement).
      drops: targets, in accuracy (fraction) below the baseline's.
    """
    families = parse_points(points)
    names = [s.name for s in systems]
    if not systems:
        raise ValueError("no systems to compare")
    if len(set(names)) != len(names):
        raise ValueError(f"system names must be distinct, got {names}")
    by_name = {s.name: s for s in systems}
    singles = [s.name for s in systems if s.single_point]
    baseline = baseline or (singles[0] if singles else None)
    if baseline is None:
        raise ValueError("no baseline: give an input-agnostic system (--full=NAME=DIR)")
    for what, n in [("baseline", baseline), *(("reference", r) for r in references)]:
        if n not in by_name:
            raise ValueError(f"{what} {n!r} is not a system; systems: {names}")
        if not by_name[n].single_point:
            raise ValueError(f"{what} {n!r} must be a single-point system (--full or no exits)")
    for d in drops:
        if not (math.isfinite(d) and 0 <= d < 1):
            raise ValueError(f"accuracy drops must be in [0, 1), got {d}")
    if not rounds >= 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    per = {n: frames[n] if isinstance(frames, Mapping) else frames for n in names}
    y = per[names[0]].y
    kind = per[names[0]].kind
    for n in names:
        if len(per[n].y) == 0:
            raise ValueError(f"no frames for {n}")
        if not np.array_equal(per[n].y, y):
            raise ValueError(f"{n} runs on other frames (labels differ from {names[0]}'s)")
        if not np.isfinite(per[n].x).all():
            raise ValueError(f"the frames of {n} hold non-finite values (NaN or inf)")

    fns: dict[str, Callable] = {}
    inputs: dict[str, list] = {}
    meta: dict[str, dict] = {}
    info: dict[str, dict] = {}
    for s in systems:
        model = s.model if s.model is not None else s.bundle.load(threads)
        base = EarlyExitExecutor(s.bundle, num_threads=threads, model=model)
        xs = [base.frame(x) for x in per[s.name].x]
        info[s.name] = {
            "bundle": s.bundle.path, "kind": "full" if s.single_point else "early_exit",
            "exits": list(base.exit_names), "criterion": s.bundle.criterion,
        }  # fmt: skip
        if s.single_point:
            key = s.name
            if FULL in s.bundle.manifest["signatures"]:
                fns[key] = _full_fn(base)
            elif s.side_exits:
                raise BundleError(f"bundle {s.bundle.path} ({s.name}) has no {FULL!r} signature")
            else:  # no side exits: the one segment is the whole model
                fns[key] = _one_fn(base)
            inputs[key] = xs
            meta[key] = {"system": s.name, "label": "full", "family": "full"}
            continue
        logits = (
            base.all_logits(per[s.name].x) if any(k == "uniform" for k, _ in families) else None
        )
        for p in operating_points(s, families, kind, logits):
            key = f"{s.name}@{p['label']}"
            ex = EarlyExitExecutor(s.bundle, thresholds=p["thresholds"], model=model)
            fns[key] = _exit_fn(ex)
            inputs[key] = xs
            meta[key] = {"system": s.name, **p}
    n_frames = len(y)
    log(f"equal accuracy: {len(fns)} operating points of {len(systems)} systems, "
        f"{n_frames} frames, {rounds} interleaved rounds")  # fmt: skip
    t = timing.interleaved(fns, inputs, rounds=rounds, warmup=min(warmup, n_frames),
                           order="rotate")  # fmt: skip
    median = t.median_round_ms()
    preds, rows = {}, {}
    for key, out in t.outputs.items():
        m = meta[key]
        if m["family"] == "full":
            pred, where = np.asarray(out, np.int64), None
        else:
            pred = np.asarray([o[0] for o in out], np.int64)
            where = np.asarray([o[1] for o in out], np.int64)
        preds[key] = pred
        ns = np.asarray(t.ns[key], np.float64).reshape(rounds, n_frames)
        best = float(ns.min(axis=0).mean() / 1e6)
        row = {**m, "time_per_frame": {**timing.time_stats(t.ns[key]), "median_round_ms":
                                       median[key], "min_of_rounds_ms": best}}  # fmt: skip
        row["ms"] = best
        if where is not None:
            ex_names = info[m["system"]]["exits"]
            row["exit_rates"] = {e: float((where == i).mean()) for i, e in enumerate(ex_names)}
        rows[key] = row
    refs = {LABELS: y}
    for r in references:
        refs[r] = preds[r]
    for key, row in rows.items():
        row["accuracy"] = {r: float((preds[key] == ry).mean()) for r, ry in refs.items()}

    report: dict = {
        "frames": int(n_frames), "kind": kind, "rounds": rounds, "threads": threads,
        "order": "rotate", "points": points, "timed_points": len(fns), "baseline": baseline,
        "drops": [float(d) for d in drops], "references": list(refs),
        "time": "per frame the fastest of the rounds, averaged over frames (ms; one "
                "interleaved run)",
        "systems": {n: {**info[n], "points": [rows[k] for k in rows if meta[k]["system"] == n]}
                    for n in names},
        "curves": {}, "headline": {},
    }  # fmt: skip
    report["notes"] = _fairness_notes(report)
    base_ms = rows[baseline]["ms"]
    for r in refs:
        curves = {}
        for n in names:
            pts = report["systems"][n]["points"]
            xy = [(p["ms"], p["accuracy"][r]) for p in pts]
            front = pareto(xy)
            curves[n] = [{"ms": xy[i][0], "accuracy": xy[i][1], "label": pts[i]["label"]}
                         for i in front]  # fmt: skip
        report["curves"][r] = curves
        base_acc = rows[baseline]["accuracy"][r]
        targets = []
        for d in drops:
            goal = base_acc - d
            at = {}
            for n in names:
                read = time_at([(c["ms"], c["accuracy"]) for c in curves[n]], goal)
                if read["reached"] and report["systems"][n]["kind"] == "full":
                    read["how"] = "single point"  # its one setting: no curve to read
                read["vs_baseline"] = None if read["ms"] is None else read["ms"] / base_ms
                at[n] = read
            for n, read in at.items():
                read["ratio_vs"] = {
                    o: (read["ms"] / v["ms"] if read["ms"] is not None and v["ms"] else None)
                    for o, v in at.items() if o != n
                }  # fmt: skip
            targets.append({"drop": float(d), "accuracy": goal, "systems": at})
        report["headline"][r] = {"baseline_accuracy": base_acc, "baseline_ms": base_ms,
                                 "targets": targets}  # fmt: skip
    return report


def _fairness_notes(report: dict) -> list[str]:
    """What differs between the early-exit systems' calibrated points (else nothing)."""
    grids, methods = {}, {}
    for n, s in report["systems"].items():
        cal = [p for p in s["points"] if p.get("family") == "calibrated"]
        if cal:
            grids[n] = sorted(
                {p["epsilon"] for p in cal}
                | {float(a.split("=")[1]) for p in cal for a in p["also"] if a.startswith("eps=")}
            )
            methods[n] = sorted({p["method"] for p in cal})
    notes = []
    if len({tuple(g) for g in grids.values()}) > 1:
        notes.append(f"calibrated points use different epsilon grids: {grids}")
    if len({tuple(m) for m in methods.values()}) > 1:
        notes.append(f"calibrated points use different calibration methods: {methods}")
    return notes


# ------------------------------------------------------------------ text and plot


def _cell(read: dict) -> str:
    if not read["reached"]:
        return "not reached"
    mark = "<=" if read["how"] == "at fastest" else ""
    return f"{mark}{read['ms']:.4f} ({read['vs_baseline']:.2f}x)"


def _ratio(a: dict, b: dict, na: str = "first", nb: str = "second") -> str:
    """a's time / b's time at one target; ``<=`` / ``>=`` where a reading is a bound."""
    if not (a["reached"] and b["reached"]):
        if not (a["reached"] or b["reached"]):
            return "n/a (neither reached)"
        return f"n/a (only {na if a['reached'] else nb} reached)"
    up_a, up_b = a["how"] == "at fastest", b["how"] == "at fastest"
    if up_a and up_b:
        return "n/a (both at their fastest point)"
    mark = "<=" if up_a else ">=" if up_b else ""
    return f"{mark}{a['ms'] / b['ms']:.2f}x"


def format_report(rep: Mapping, title: str = "") -> str:
    """The headline tables (one per reference) as text."""
    names = list(rep["systems"])
    w = max(20, *(len(n) + 2 for n in names))
    lines = [
        f"equal accuracy{' on ' + title if title else ''}: {rep['frames']} frames, "
        f"{rep['timed_points']} operating points timed in one interleaved run "
        f"({rep['rounds']} rounds, {rep['threads']} thread(s)); ms/frame (x {rep['baseline']})"
    ]
    for r, h in rep["headline"].items():
        what = "accuracy (labels)" if r == LABELS else f"agreement with {r}'s top-1"
        lines.append(
            f"  {what}: {rep['baseline']} {h['baseline_accuracy']:.4f} at {h['baseline_ms']:.4f} ms"
        )
        lines.append(f"  {'target':<16}" + "".join(f"{n:>{w}}" for n in names))
        for t in h["targets"]:
            head = f"-{t['drop'] * 100:g} pt {t['accuracy']:.4f}"
            lines.append(f"  {head:<16}" + "".join(f"{_cell(t['systems'][n]):>{w}}" for n in names))
        best = "".join(f"{max(c['accuracy'] for c in rep['curves'][r][n]):>{w}.4f}" for n in names)
        lines.append(f"  {'best accuracy':<16}{best}")
        curves = [n for n in names if rep["systems"][n]["kind"] != "full"]
        for i, a in enumerate(curves):
            for b in curves[i + 1 :]:
                cells = [f"-{t['drop'] * 100:g} pt {_ratio(t['systems'][a], t['systems'][b], a, b)}"
                         for t in h["targets"]]  # fmt: skip
                lines.append(f"  time {a} / {b}: " + ", ".join(cells))
    for n in rep.get("notes", []):
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def plot_axes(rep: Mapping, ax, reference: str = LABELS, title: str = "") -> None:
    """Draws one reference's comparison on a matplotlib Axes: every measured point, each
    early-exit system's Pareto front, the single-point systems as stars, the targets."""
    colors = {"flexdnn": "tab:red", "branchynet": "tab:blue", "backbone": "black"}
    palette = ["tab:green", "tab:purple", "tab:orange", "tab:brown", "tab:olive", "tab:cyan"]
    r = reference
    for i, (n, s) in enumerate(rep["systems"].items()):
        c = colors.get(n, palette[i % len(palette)])
        pts = s["points"]
        xs = [p["ms"] for p in pts]
        ys = [p["accuracy"][r] for p in pts]
        front = rep["curves"][r][n]
        if s["kind"] == "full":
            ax.plot(xs, ys, "*", color=c, ms=13, label=f"{n} (input-agnostic)")
            continue
        ax.plot(xs, ys, ".", color=c, ms=5, alpha=0.45)
        ax.plot([f["ms"] for f in front], [f["accuracy"] for f in front], "-", color=c,
                lw=1.4, label=f"{n} (Pareto front of {len(pts)} measured points)")  # fmt: skip
    h = rep["headline"][r]
    for t in h["targets"]:
        ax.axhline(t["accuracy"], color="gray", lw=0.7, ls=":")
        ax.annotate(f"-{t['drop'] * 100:g} pt", (1.0, t["accuracy"]), xycoords=("axes fraction",
                    "data"), fontsize=6, va="center", ha="right", color="gray")  # fmt: skip
    ax.set_xlabel("time per frame (ms, LiteRT, measured: per frame min of rounds, mean)")
    ax.set_ylabel("accuracy" if r == LABELS else f"agreement with {r}'s top-1")
    ax.set_title(f"{title}{' - ' if title else ''}{'labels' if r == LABELS else r}", fontsize=9)
    singles = [p["accuracy"][r] for s in rep["systems"].values() if s["kind"] == "full"
               for p in s["points"]]  # fmt: skip
    best = max(p["accuracy"][r] for s in rep["systems"].values() for p in s["points"])
    lo = min(min(t["accuracy"] for t in h["targets"]) - 0.05, min(singles) - 0.02)
    ax.set_ylim(max(0.0, lo), min(1.005, best + 0.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, loc="lower right")


def plot(rep: Mapping, path: str, title: str = "") -> None:
    """`plot_axes` for every reference, side by side, saved to `path` (needs matplotlib)."""
    # lazy: plots only; matplotlib is optional for the runtime (pyplot after choosing Agg)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only (see above)
    import matplotlib.pyplot as plt

    # lazy: flexjax.io is numpy-only; kept next to its only use here
    from flexjax.io import save_figure_atomic

    refs = list(rep["headline"])
    fig, axes = plt.subplots(1, len(refs), figsize=(6.5 * len(refs), 4.8), squeeze=False)
    for ax, r in zip(axes[0], refs):
        plot_axes(rep, ax, r, title)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


# ------------------------------------------------------------------ command line


def named_dir() -> Callable[[str], tuple[str, str]]:
    """``NAME=DIR``: a system name and an existing bundle directory."""
    check = args_lib.existing_dir()

    def convert(text: str) -> tuple[str, str]:
        name, sep, path = text.partition("=")
        if not sep or not name.strip() or "@" in name:
            raise args_lib.DomainError(f"must be NAME=DIR (a name without '@'), got {text!r}")
        return name.strip(), check(path)

    convert.domain = check.domain  # type: ignore[attr-defined]
    convert.__name__ = "NAME=DIR"
    return convert


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.equal_accuracy``."""
    p = args_lib.ArgumentParser(prog="python -m runtime.equal_accuracy",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--bundle", action="append", default=[], type=named_dir(),
                   help="NAME=DIR: an early-exit system (a curve); repeatable")  # fmt: skip
    p.add_argument("--full", action="append", default=[], type=named_dir(),
                   help="NAME=DIR: a bundle's full signature (one point); repeatable")  # fmt: skip
    p.add_argument("--data", required=True, type=args_lib.prefixed_file("npz:"),
                   help="DATASET:SPLIT, video:DATASET or npz:PATH (its labels)")  # fmt: skip
    p.add_argument(
        "--points",
        default=DEFAULT_POINTS,
        help="operating-point families: calibrated, uniform:N (comma-separated)",
    )
    p.add_argument("--calibration", default="auto", choices=("auto", "val", "video_val"))
    p.add_argument(
        "--baseline",
        default=None,
        help="the single-point system the targets are read from (default: first)",
    )
    p.add_argument(
        "--reference",
        action="append",
        default=[],
        help="also report agreement with this single-point system's top-1",
    )
    p.add_argument("--drops", type=args_lib.number_list(args_lib.real(0.0, 1.0, hi_open=True)),
                   default=list(DEFAULT_DROPS),
                   help="targets: accuracy below the baseline's (0.01 = 1 point)")  # fmt: skip
    p.add_argument("--rounds", type=args_lib.count(1), default=3, help="timed passes")
    p.add_argument("--limit", type=args_lib.count(1), default=None,
                   help="use only the first N frames")  # fmt: skip
    p.add_argument("--threads", type=args_lib.threads(), default=1)
    p.add_argument("--json", default=None, type=args_lib.output_file())
    p.add_argument("--plot", default=None, type=args_lib.output_file(),
                   help="accuracy vs time per frame (PNG; needs matplotlib)")  # fmt: skip
    return p


def _have_matplotlib() -> bool:
    try:
        return importlib.util.find_spec("matplotlib") is not None
    except ImportError:  # a finder that refuses it, or a broken install
        return False


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv, errors=(KeyError,))


def _main(args) -> int:
    load0 = list(os.getloadavg())
    parse_points(args.points)  # a bad spec fails before any bundle is read
    if args.plot and not _have_matplotlib():
        raise ValueError("--plot needs matplotlib, which is not installed")
    specs = [(n, d, False) for n, d in args.bundle] + [(n, d, True) for n, d in args.full]
    if not specs:
        raise ValueError("no systems: give --bundle=NAME=DIR and/or --full=NAME=DIR")
    names = [n for n, _, _ in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"system names must be distinct; repeated: {dup}")
    for n in [args.baseline, *args.reference]:
        if n is not None and n not in names:
            raise ValueError(f"{n!r} is not a system; systems: {names}")
    bundles: dict[str, Bundle] = {}
    systems, frames, loaded = [], {}, {}
    for n, d, full in specs:
        real = os.path.realpath(d)
        if real not in bundles:
            bundles[real] = Bundle.from_dir(d)
        b = bundles[real]
        key = repr((b.manifest.get("data"), b.manifest.get("video"), b.manifest["input"]))
        if key not in loaded:
            loaded[key] = data_lib.load(args.data, b.manifest, args.limit)
        frames[n] = loaded[key]
        systems.append(System(n, b, full=full, calibration=args.calibration))
    models: dict[str, Any] = {}
    for s in systems:  # one interpreter per bundle, shared by all its systems and points
        s.model = models.setdefault(s.bundle.path, s.bundle.load(args.threads))
    rep = compare(
        systems, frames, points=args.points, baseline=args.baseline, references=args.reference,
        drops=args.drops, rounds=args.rounds, threads=args.threads,
        log=lambda m: print(m, file=sys.stderr, flush=True),
    )  # fmt: skip
    rep["data"] = args.data
    rep["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                      "load_average_start": load0,
                      "load_average_end": list(os.getloadavg())}  # fmt: skip
    print(format_report(rep, args.data))
    if args.json:
        write_json_atomic(args.json, rep)
    if args.plot:
        plot(rep, args.plot, args.data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
