"""Checks that ``runtime.bench`` on a FlexDNN job's bundle reproduces the job's report.

    python -m pipelines.bench_check --report=W/report.json --bench=BENCH.json

The redesign rule (issue 12, item 5): numbers in a report are reproducible from
the bundle with the runtime alone. ``runtime.bench`` on ``W/bundles/flexdnn``
with the job's test frames must give the report's FlexDNN row exactly: the same
frames, accuracy and exit rates (deterministic: same bundle, same thresholds,
same frames). Time per frame is measured again, so its ratio to ``full`` is
printed beside the report's with their difference, not asserted (load).

Then the headline, win or loss: at the backbone's accuracy − 0.5 / 1 / 2 points,
the time per frame read off each system's curve in the job's one interleaved
equal-accuracy run, FlexDNN vs the backbone and vs BranchyNet.

A mismatch is one ``error:`` line and exit status 1. Reads JSON only (no JAX,
no TensorFlow).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

from runtime import args as args_lib


class MismatchError(ValueError):
    """runtime.bench and the report disagree on a deterministic number."""


def compare(report: dict, bench: dict, source: str = "test", system: str = "flexdnn") -> dict:
    """The bench run against the report's row of `system` on `source`.

    Raises:
      MismatchError: other frames, accuracy or exit rates than the report's.
    """
    try:
        b = report["benchmark"][source]
        row = b["systems"][system]
    except (KeyError, TypeError):
        raise MismatchError(
            f"the report has no benchmark row {source!r} / {system!r}; sources: "
            f"{sorted(report.get('benchmark', {}))}"
        ) from None
    for key in ("frames", "accuracy", "exit_rates", "ratio_vs_full"):
        if key not in bench:
            raise MismatchError(f"the bench JSON has no {key!r}: not a runtime.bench report")
    if int(bench["frames"]) != int(b["frames"]):
        raise MismatchError(
            f"runtime.bench ran {bench['frames']} frames, the report {b['frames']}: "
            "run it on the job's frames (--data=npz:W/frames_test.npz, --limit)"
        )
    if bench["accuracy"] != row["accuracy"]:
        raise MismatchError(
            f"accuracy: runtime.bench {bench['accuracy']!r}, report {row['accuracy']!r}"
        )
    want, got = row["exit_rates"], bench["exit_rates"]
    if set(want) != set(got) or any(abs(want[k] - got[k]) > 1e-12 for k in want):
        raise MismatchError(f"exit rates: runtime.bench {got}, report {want}")
    ratio_report = float(row["ratio_vs_backbone"])
    ratio_bench = float(bench["ratio_vs_full"]["early_exit"])
    return {
        "frames": int(bench["frames"]),
        "accuracy": float(bench["accuracy"]),
        "exit_rates": dict(got),
        "ratio_vs_backbone": {"report": ratio_report, "bench": ratio_bench,
                              "relative_difference": ratio_bench / ratio_report - 1.0},
    }  # fmt: skip


def headline_lines(report: dict, source: str = "test") -> list[str]:
    """FlexDNN vs backbone and BranchyNet at equal accuracy, from the job's interleaved run."""
    eq = report.get("benchmark", {}).get(source, {}).get("equal_accuracy") or {}
    lines = []
    for ref, h in eq.get("headline", {}).items():
        what = "labels" if ref == "labels" else f"{ref}'s own top-1"
        for t in h.get("targets", []):
            at = t["systems"]

            def ms(n, at=at):
                v = at.get(n, {}).get("ms")
                return None if v is None else float(v)

            f, bb, br = ms("flexdnn"), ms("backbone"), ms("branchynet")
            parts = [f"backbone {bb:.2f} ms" if bb else "backbone -"]
            for n, v in (("flexdnn", f), ("branchynet", br)):
                parts.append(f"{n} {v:.2f} ms" if v is not None else f"{n} not reached")
            verdict = []
            if f is not None and bb:
                r = f / bb
                verdict.append(f"FlexDNN {r:.3f}x backbone ({'win' if r < 1 else 'loss'})")
            if f is not None and br is not None:
                r = f / br
                verdict.append(f"{r:.3f}x BranchyNet ({'win' if r < 1 else 'loss'})")
            elif f is None:
                verdict.append("FlexDNN reaches no point at this accuracy (loss)")
            elif br is None:
                verdict.append("BranchyNet reaches no point at this accuracy (FlexDNN wins)")
            lines.append(
                f"  {what}, backbone - {t['drop'] * 100:g} pt (>= {t['accuracy']:.4f}): "
                + ", ".join(parts)
                + "; "
                + ", ".join(verdict)
            )
    return lines


def format_check(check: dict, report: dict, source: str = "test") -> str:
    r = check["ratio_vs_backbone"]
    lines = [
        f"runtime.bench reproduces the report's FlexDNN row on {check['frames']} {source} "
        f"frames: accuracy {check['accuracy']:.4f}, exit rates "
        + ", ".join(f"{k} {v:.3f}" for k, v in check["exit_rates"].items())
        + " (identical)",
        f"time per frame vs backbone (mean): job {r['report']:.3f}x, runtime.bench "
        f"{r['bench']:.3f}x ({r['relative_difference'] * 100:+.1f}%; "
        + ("within 5%" if abs(r["relative_difference"]) <= 0.05 else "more than 5% apart: "
           "two timed runs on a loaded machine")
        + ")",
        "headline (one interleaved LiteRT run, time per frame read off each system's "
        "threshold-sweep curve at equal accuracy):",
    ]  # fmt: skip
    lines += headline_lines(report, source) or ["  (the report has no equal-accuracy run)"]
    for ref, t in (report.get("targets", {}).get("equal_accuracy") or {}).items():

        def verdict(ok):
            return {True: "met", False: "MISSED", None: "undetermined"}[ok]

        lines.append(
            f"  issue 13 targets ({ref}, backbone - {t['drop'] * 100:g} pt): FlexDNN <= 0.6x "
            f"backbone {verdict(t['time_vs_backbone_ok'])}, <= 0.72x BranchyNet "
            f"{verdict(t['time_vs_branchynet_ok'])}"
        )
    return "\n".join(lines)


def build_parser() -> args_lib.ArgumentParser:
    p = args_lib.ArgumentParser(prog="python -m pipelines.bench_check",
                                description=__doc__.split("\n")[0])  # fmt: skip
    p.add_argument("--report", required=True, type=args_lib.json_file(),
                   help="the FlexDNN job's report.json")  # fmt: skip
    p.add_argument("--bench", required=True, type=args_lib.json_file(),
                   help="runtime.bench --json of the job's flexdnn bundle")  # fmt: skip
    return p


def _main(args: argparse.Namespace) -> int:
    report = args_lib.read_json(args.report, "dict", "report")
    bench = args_lib.read_json(args.bench, "dict", "bench JSON")
    try:
        check = compare(report, bench)
    except MismatchError as e:
        raise ValueError(f"runtime.bench does not reproduce the report: {e}") from None
    if not math.isfinite(check["ratio_vs_backbone"]["bench"]):
        raise ValueError("runtime.bench's time ratio is not finite")
    print(format_check(check, report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
