"""Benchmarks a bundle: accuracy, exit histogram and time per frame, vs `full`, in one run.

  python -m runtime.bench --bundle=BUNDLE --data=mnist5k:test --target=local --threads=1 --json=OUT
  python -m runtime.bench --bundle=BUNDLE --data=video:mnist5k --target=adb:SERIAL \\
      --benchmark-binary=/path/to/benchmark_model [--use-gpu] [--energy]

Local target: every frame is timed (wall clock, batch 1) in four modes,
interleaved round by round (their order rotating) so drift hits all of them alike:

* ``early_exit``: the executor with the bundle's calibrated thresholds;
* ``full``: the ``full`` signature (the whole backbone as one graph);
* ``segments_only``: every segment, no heads (pure split overhead);
* ``never_exit``: every segment and every head, thresholds that never pass
  (the worst case of an early-exit model).

plus ``batched`` (the executor's stage-by-stage batch mode; mean time per
frame only). Ratios are against ``full`` from the same run. ``early_exit`` makes one
interpreter call per side exit where the bundle has stage signatures; ``--two-call``
adds ``early_exit_two_call`` (the same thresholds, segment then head: two calls per side
exit, how bundles without stage signatures run) to the same interleaved run, and the
report's ``stage_calls`` compares the two (``python -m runtime.bench --bundle=B
--data=mnist5k:test --two-call``).

adb target: runs the user's ``benchmark_model`` on the phone for every
signature (`runtime.adb`), and combines the per-signature times with the exit
rates (measured on ``--data`` on this host with the same model, or the
bundle's validation rates without ``--data``) into an expected time per frame.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence

import numpy as np

from flexjax.io import write_json_atomic
from runtime import args as args_lib
from runtime import criteria, timing
from runtime import data as data_lib
from runtime.adb import AdbTarget
from runtime.bundle import Bundle
from runtime.executor import EarlyExitExecutor
from runtime.timing import time_stats

MODES = ("early_exit", "full", "segments_only", "never_exit")
TWO_CALL = "early_exit_two_call"  # --two-call: segment then head, stage signatures unused


def pick_thresholds(bundle: Bundle, kind: str, epsilon: float | None, source: str) -> tuple:
    """Thresholds for the run: calibrated on `source` (auto: video_val for video) at `epsilon`."""
    if source == "auto":
        rows = bundle.manifest.get("calibrations", [])
        has_video = any(r["source"] == "video_val" for r in rows)
        source = "video_val" if kind == "video" and has_video else "val"
    return bundle.calibration(source, epsilon), source


def expected_time(
    exits: Sequence[Mapping], rates: Mapping[str, float], sig_time: Mapping[str, float]
) -> float:
    """Expected time per frame from per-signature times and exit rates.

    A frame leaving at exit k ran every segment up to k and every head up to k
    (the heads before k did not pass; k's own head did). A frame reaching
    ``final`` ran all segments and all side heads. An exit with a timed ``stage``
    signature costs that one call instead (what the executor runs).
    """

    def staged(e) -> bool:
        return bool(e.get("stage")) and e["stage"] in sig_time

    leave = criteria.leave_costs(
        [sig_time[e["stage"]] if staged(e) else sig_time[e["segment"]] for e in exits],
        [sig_time[e["head"]] if e.get("head") and not staged(e) else 0.0 for e in exits],
    )
    return float(sum(rates.get(e["name"], 0.0) * c for e, c in zip(exits, leave)))


def run_local(
    bundle: Bundle,
    frames: data_lib.Frames,
    thresholds: Mapping[str, float | None],
    *,
    threads: int = 1,
    rounds: int = 3,
    warmup: int = 20,
    two_call: bool = False,
) -> dict:
    """Times every mode (module docstring) on `frames`, interleaved, and reports accuracy.

    `two_call`: also time `TWO_CALL` (early exit without the stage signatures) and compare.
    """
    ex = EarlyExitExecutor(bundle, num_threads=threads, thresholds=thresholds)
    never = EarlyExitExecutor.never_exit(bundle, model=ex.model)
    seg_only = EarlyExitExecutor(bundle, heads=False, model=ex.model)
    xs = [ex.frame(x) for x in frames.x]
    fns = {
        "early_exit": ex.run,
        "full": ex.run_full,
        "segments_only": seg_only.run,
        "never_exit": never.run,
    }
    if two_call:
        two = EarlyExitExecutor(
            bundle, thresholds=thresholds, model=ex.model, stage_signatures=False
        )
        fns[TWO_CALL] = two.run
    # The modes' order rotates every round, so none always runs first (or right after the
    # same mode): a fixed order biased --two-call's one-vs-two-call comparison by ~10 us.
    # Round 0's outputs are the results.
    t = timing.interleaved(fns, xs, rounds=rounds, warmup=min(warmup, len(xs)), order="rotate")
    times = t.ns
    results = t.outputs["early_exit"]
    full_pred = np.array([int(out.argmax()) for out in t.outputs["full"]], np.int64)
    clock = time.perf_counter_ns
    t0 = clock()
    batch_logits, batch_where = ex.run_batch(frames.x)
    batched_ns = clock() - t0

    y = frames.y
    pred = np.array([res.prediction for res in results])
    where = np.array([res.index for res in results])
    names = ex.exit_names
    counts = {n: int((where == i).sum()) for i, n in enumerate(names)}
    per_exit_acc = {
        n: float((pred[where == i] == y[where == i]).mean()) if counts[n] else None
        for i, n in enumerate(names)
    }
    if not (np.array_equal(batch_where, where) and np.array_equal(batch_logits.argmax(-1), pred)):
        raise AssertionError("batched and per-frame execution disagree")  # a runtime bug
    flops = {e["name"]: e["flops"] for e in bundle.manifest["exits"]}
    backbone = bundle.manifest["costs"]["backbone_flops"]
    modes = {m: time_stats(times[m]) for m in fns}
    modes["batched"] = {"mean_ms": batched_ns / 1e6 / len(xs), "frames": len(xs)}
    full_mean = modes["full"]["mean_ms"]
    report = {
        "frames": len(xs),
        "accuracy": float((pred == y).mean()),
        "full_accuracy": float((full_pred == y).mean()),
        "exit_histogram": counts,
        "exit_rates": {n: c / len(xs) for n, c in counts.items()},
        "exit_accuracy": per_exit_acc,
        "expected_flops_ratio": float(np.mean([flops[names[i]] for i in where]) / backbone),
        "time_per_frame": modes,
        "ratio_vs_full": {m: modes[m]["mean_ms"] / full_mean for m in modes},
        "ratio_vs_full_p50": {m: modes[m]["p50_ms"] / modes["full"]["p50_ms"] for m in MODES},
        "rounds": rounds,
        "calls_per_stage": dict(zip(names, ex.calls_per_stage)),
    }
    if two_call:
        same = all(
            a.index == b.index and a.prediction == b.prediction
            for a, b in zip(results, t.outputs[TWO_CALL])
        )
        if not same:
            raise AssertionError("stage signatures and segment+head disagree")  # a runtime bug
        one, two_ms = modes["early_exit"], modes[TWO_CALL]
        report["stage_calls"] = {
            "calls_per_stage": {"early_exit": dict(zip(names, ex.calls_per_stage)),
                                TWO_CALL: dict(zip(names, two.calls_per_stage))},
            "mean_us": {"early_exit": one["mean_ms"] * 1e3, TWO_CALL: two_ms["mean_ms"] * 1e3},
            "p50_us": {"early_exit": one["p50_ms"] * 1e3, TWO_CALL: two_ms["p50_ms"] * 1e3},
            "median_round_us": {m: v * 1e3 for m, v in t.median_round_ms().items()
                                if m in ("early_exit", TWO_CALL)},
            "saved_p50_us": (two_ms["p50_ms"] - one["p50_ms"]) * 1e3,
            "speedup_p50": two_ms["p50_ms"] / one["p50_ms"],
        }  # fmt: skip
    if frames.difficulty is not None:
        report["by_difficulty"] = _by_difficulty(
            frames.difficulty, where, pred == y, times, len(xs)
        )
    return report


def _by_difficulty(difficulty, where, correct, times, n) -> list[dict]:
    edges = np.quantile(difficulty, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bins = np.clip(np.searchsorted(edges, difficulty, side="right") - 1, 0, 4)
    early = np.asarray(times["early_exit"], np.float64).reshape(-1, n).mean(0) / 1e6
    full = np.asarray(times["full"], np.float64).reshape(-1, n).mean(0) / 1e6
    rows = []
    for b in range(5):
        m = bins == b
        rows.append(
            {
                "difficulty": [float(edges[b]), float(edges[b + 1])],
                "frames": int(m.sum()),
                "accuracy": float(correct[m].mean()) if m.any() else None,
                "mean_exit_index": float(where[m].mean()) if m.any() else None,
                "early_exit_ms": float(early[m].mean()) if m.any() else None,
                "full_ms": float(full[m].mean()) if m.any() else None,
            }
        )
    return rows


def run_adb(
    bundle: Bundle,
    target: str,
    binary: str,
    rates: Mapping[str, float],
    *,
    threads: int,
    use_gpu: bool,
    num_runs: int,
    warmup_runs: int,
    energy: bool,
) -> dict:
    serial = target.partition(":")[2] or None
    adb = AdbTarget(serial, binary)
    used = adb.check()
    sigs = list(bundle.manifest["signatures"])
    with bundle.verified_file() as model_path:  # push the verified bytes, not the file now
        timings = adb.benchmark_all(
            model_path,
            sigs,
            num_threads=threads,
            use_gpu=use_gpu,
            num_runs=num_runs,
            warmup_runs=warmup_runs,
            energy=energy,
        )
    ms = {s: t.avg_us / 1000.0 for s, t in timings.items()}
    exits = bundle.manifest["exits"]
    early = expected_time(exits, rates, ms)
    final_rates = {exits[-1]["name"]: 1.0}
    report = {
        "serial": used,
        "signature_ms": ms,
        "signatures": {s: t.to_dict() for s, t in timings.items()},
        "time_per_frame": {
            "early_exit": {"mean_ms": early},
            "full": {"mean_ms": ms["full"]},
            "segments_only": {"mean_ms": sum(ms[e["segment"]] for e in exits)},
            "never_exit": {"mean_ms": expected_time(exits, final_rates, ms)},
        },
        "exit_rates": dict(rates),
        "note": "per-signature benchmark_model averages combined with the exit rates",
    }
    report["ratio_vs_full"] = {
        m: v["mean_ms"] / ms["full"] for m, v in report["time_per_frame"].items()
    }
    if energy:
        joules = {s: t.energy.get("energy_per_inference_j") for s, t in timings.items() if t.energy}
        if joules and all(v is not None for v in joules.values()):
            report["energy_per_frame_j"] = {
                "early_exit": expected_time(exits, rates, joules),
                "full": joules["full"],
            }
    return report


def format_report(rep: Mapping) -> str:
    lines = [
        f"bundle {rep['bundle']} ({rep['precision']}) on {rep['target']}, "
        f"threads={rep['threads']}, data={rep['data']} ({rep.get('frames', '-')} frames)",
    ]
    if "accuracy" in rep:
        lines.append(
            f"accuracy: early exit {rep['accuracy']:.4f}, full {rep['full_accuracy']:.4f}; "
            f"expected FLOPs {rep['expected_flops_ratio']:.3f}x"
        )
    lines.append(
        "exits: "
        + ", ".join(
            f"{n} {rep['exit_rates'][n]:.3f}"
            + (f" ({rep['exit_histogram'][n]})" if "exit_histogram" in rep else "")
            for n in rep["exit_rates"]
        )
    )
    lines.append(f"{'mode':<20}{'mean ms':>10}{'p50 ms':>10}{'p95 ms':>10}{'x full':>9}")
    for m, s in rep["time_per_frame"].items():
        p50 = f"{s['p50_ms']:>10.4f}" if "p50_ms" in s else f"{'':>10}"
        p95 = f"{s['p95_ms']:>10.4f}" if "p95_ms" in s else f"{'':>10}"
        lines.append(f"{m:<20}{s['mean_ms']:>10.4f}{p50}{p95}{rep['ratio_vs_full'][m]:>9.3f}")
    sc = rep.get("stage_calls")
    if sc:
        calls = {
            m: ", ".join(f"{n} {c}" for n, c in v.items()) for m, v in sc["calls_per_stage"].items()
        }
        lines.append(
            f"early exit per frame, p50: {sc['p50_us']['early_exit']:.1f} us with stage "
            f"signatures (calls per stage: {calls['early_exit']}) vs "
            f"{sc['p50_us'][TWO_CALL]:.1f} us two-call ({calls[TWO_CALL]}): "
            f"{sc['saved_p50_us']:.1f} us saved, {sc['speedup_p50']:.3f}x"
        )
    return "\n".join(lines)


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m runtime.bench`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m runtime.bench", description=__doc__.split("\n")[0])
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--data", default=None, type=args_lib.prefixed_file("npz:"),
                   help="DATASET:SPLIT, video:DATASET or npz:PATH")  # fmt: skip
    p.add_argument("--target", default="local", help="local or adb[:SERIAL]")
    p.add_argument("--threads", type=args_lib.threads(), default=1)
    p.add_argument("--json", default=None, type=args_lib.output_file(),
                   help="write the report here")  # fmt: skip
    p.add_argument("--limit", type=args_lib.count(1), default=None,
                   help="use only the first N frames")  # fmt: skip
    p.add_argument("--rounds", type=args_lib.count(1), default=3,
                   help="timed passes over the frames (local)")  # fmt: skip
    p.add_argument("--epsilon", type=args_lib.probability(), default=None,
                   help="calibration to use")  # fmt: skip
    p.add_argument("--calibration", default="auto", choices=("auto", "val", "video_val"))
    p.add_argument("--two-call", action="store_true",
                   help="local: also time early exit as segment then head (two calls per "
                        "stage) against the stage signatures' one call")  # fmt: skip
    p.add_argument("--benchmark-binary", default=None, type=args_lib.existing_file(),
                   help="benchmark_model for --target=adb")  # fmt: skip
    p.add_argument("--use-gpu", action="store_true", help="adb: run with the GPU delegate")
    p.add_argument("--num-runs", type=args_lib.count(1), default=50,
                   help="adb: timed runs per signature")  # fmt: skip
    p.add_argument("--warmup-runs", type=args_lib.count(0), default=5,
                   help="adb: warmup runs per signature")  # fmt: skip
    p.add_argument("--energy", action="store_true", help="adb: sample battery current/voltage")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv, errors=(KeyError,))


def _main(args) -> int:
    bundle = Bundle.from_dir(args.bundle)
    frames = data_lib.load(args.data, bundle.manifest, args.limit) if args.data else None
    kind = frames.kind if frames else "images"
    cal, source = pick_thresholds(bundle, kind, args.epsilon, args.calibration)
    rep: dict = {
        "bundle": os.path.abspath(args.bundle),
        "precision": bundle.manifest["precision"],
        "target": args.target,
        "threads": args.threads,
        "data": args.data,
        "calibration": {
            "source": source, "epsilon": cal["epsilon"], "thresholds": cal["thresholds"]
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpus": os.cpu_count()},
    }  # fmt: skip
    if args.target == "local":
        if frames is None:
            raise ValueError("--target=local needs --data")
        rep.update(run_local(bundle, frames, cal["thresholds"], threads=args.threads,
                             rounds=args.rounds, two_call=args.two_call))  # fmt: skip
    elif args.target == "adb" or args.target.startswith("adb:"):
        if not args.benchmark_binary:
            raise ValueError("--target=adb needs --benchmark-binary=PATH (TFLite benchmark_model)")
        if not os.path.isfile(args.benchmark_binary):
            raise FileNotFoundError(f"benchmark binary {args.benchmark_binary} does not exist")
        if frames is not None:  # exit rates on these frames, measured with the same model here
            local = EarlyExitExecutor(bundle, thresholds=cal["thresholds"])
            _, where = local.run_batch(frames.x)
            rates = {n: float((where == i).mean()) for i, n in enumerate(local.exit_names)}
            rep["frames"] = len(frames.x)
            rep["exit_rates_from"] = f"{args.data} (host run of the same model)"
        else:
            rates = cal["val_exit_rates"]
            rep["exit_rates_from"] = f"bundle calibration ({source})"
        rep.update(
            run_adb(bundle, args.target, args.benchmark_binary, rates, threads=args.threads,
                    use_gpu=args.use_gpu, num_runs=args.num_runs, warmup_runs=args.warmup_runs,
                    energy=args.energy)
        )  # fmt: skip
    else:
        raise ValueError(f"unknown --target={args.target}; valid: local, adb, adb:SERIAL")
    print(format_report(rep))
    if args.json:
        write_json_atomic(args.json, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
