"""Batched early exit in JAX vs the full network, per batch size, against the FLOP prediction.

  python -m export.batched_exit_bench --workdir=runs/alexnet --bundle=bundles/alexnet \\
      [--batches=16,64,256] [--rounds=5] [--min-bucket=1] [--half-steps] [--json=OUT]

For each batch size B: a `flexjax.batched_exit.BatchedExitExecutor` with buckets up to B
is compiled first (every shape it can meet; the seconds are reported, never timed), then
the full backbone at batch B (``full``) and the early-exit executor (``early_exit``) run on
the same batches of test frames, interleaved round by round (`runtime.timing`). Reported
per B: median-round time per batch of each, the measured speedup (full / early exit), the
speedup FLOPs predict from the exit rates measured on those batches (backbone FLOPs /
expected FLOPs per frame: no padding, no overhead), and their ratio. Each stage is also
timed alone at the full batch in the same run; ``time`` is the speedup those stage times
predict for the same exit rates (full time / sum over stages of the fraction of frames
reaching the stage x its time), and its ratio separates the executor's own cost (padding,
gathers, host round trips) from the FLOP model's error (early layers on large maps cost
far more time per FLOP than late ones on a CPU). Every frame's exit
and prediction are checked against the per-frame reference (batch 1, first passing exit)
before timing.

Thresholds are the bundle's calibration (``--bundle``: what the runtime ships) or, without
it, calibrated here on the workdir's validation split (FLOP costs, the config's epsilon).
Lives in export/ because it needs JAX next to the workdir and the bundle.
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import numpy as np

from export.bundle import load_workdir
from flexjax import config as config_lib
from flexjax import costs as costs_lib
from flexjax import evaluation, training
from flexjax import exits as exits_lib
from flexjax.batched_exit import BatchedExitExecutor
from flexjax.io import write_json_atomic
from runtime import Bundle, timing
from runtime import args as args_lib

MAX_BATCHES_PER_SIZE = 8  # distinct batches timed per batch size


def thresholds_for(config, net, variables, splits, bundle_dir: str | None) -> dict:
    """``{"criterion", "epsilon", "thresholds", "source"}``: the bundle's, or calibrated here."""
    if bundle_dir:
        bundle = Bundle.from_dir(bundle_dir)
        if bundle.manifest["net"] != net.to_dict():
            raise ValueError(
                f"bundle {bundle_dir} was not exported from this workdir (nets differ)"
            )
        cal = bundle.manifest["calibration"]
        return {
            "criterion": bundle.criterion,
            "epsilon": cal["epsilon"],
            "thresholds": dict(cal["thresholds"]),
            "source": f"bundle {os.path.abspath(bundle_dir)}",
        }
    logits = evaluation.predict(net, variables, splits.val.x)
    cal = exits_lib.calibrate(
        logits, splits.val.y, costs_lib.of(net).exit_flops, criterion=config.exits.criterion,
        epsilon=float(config.exits.epsilon), names=net.exit_names,
        **config_lib.calibration_options(config),
    )  # fmt: skip
    return {
        "criterion": cal.criterion,
        "epsilon": cal.epsilon,
        "thresholds": cal.thresholds,
        "source": "calibrated on the workdir's validation split (FLOPs)",
    }


def _batches(x: np.ndarray, size: int) -> list[np.ndarray]:
    """Up to `MAX_BATCHES_PER_SIZE` batches of `size` frames (cycling when there are fewer)."""
    count = max(1, min(MAX_BATCHES_PER_SIZE, len(x) // size))
    idx = np.arange(count * size) % len(x)
    return [x[idx[i * size : (i + 1) * size]] for i in range(count)]


def measure(
    workdir: str,
    bundle_dir: str | None = None,
    batch_sizes=(16, 64, 256),
    rounds: int = 5,
    min_bucket: int = 1,
    half_steps: bool = False,
    log=print,
) -> dict:
    config, net, variables = load_workdir(workdir)
    splits = training.load_data(config)
    cal = thresholds_for(config, net, variables, splits, bundle_dir)
    test_x = splits.test.x.astype(np.float32)
    nc = costs_lib.of(net)
    rows = []
    reference = None
    for size in batch_sizes:
        ex = BatchedExitExecutor(
            net, variables, cal["thresholds"], cal["criterion"], max_batch=size,
            min_bucket=min_bucket, half_steps=half_steps,
        )  # fmt: skip
        compiled = ex.compile([size])
        host = _batches(test_x, size)
        frames = np.concatenate(host)
        if reference is None or len(reference.exit_index) < len(frames):
            reference = ex.run_per_frame(frames)  # frames of a smaller size are a prefix
        ref_where = reference.exit_index[: len(frames)]
        ref_pred = reference.predictions[: len(frames)]
        batches = [jax.device_put(b) for b in host]
        results = [ex.run(b) for b in batches]
        where = np.concatenate([r.exit_index for r in results])
        pred = np.concatenate([r.predictions for r in results])
        if not (np.array_equal(where, ref_where) and np.array_equal(pred, ref_pred)):
            bad = int(np.sum((where != ref_where) | (pred != ref_pred)))
            raise AssertionError(f"batch {size}: {bad} frames differ from the per-frame reference")
        # Each stage alone at the full batch, timed in the same run: what time (not FLOPs)
        # predicts for these exit rates, to tell the FLOP model's error from our overhead.
        stage_in = [ex.stage_inputs(b) for b in batches]
        fns = {"full": ex.run_full, "early_exit": ex.run}
        inputs = {"full": batches, "early_exit": batches}
        for i, name in enumerate(ex.exit_names):
            fns[f"stage:{name}"] = functools.partial(ex.run_stage, i)
            inputs[f"stage:{name}"] = [s[i] for s in stage_in]
        t = timing.interleaved(
            fns, inputs, rounds=rounds, warmup=1, order="rotate", keep_outputs=False
        )
        ms = t.median_round_ms()
        flops = ex.flop_speedup(where)
        measured = ms["full"] / ms["early_exit"]
        reach = [float((where >= i).mean()) for i in range(len(ex.exit_names))]
        stage_ms = {n: ms[f"stage:{n}"] for n in ex.exit_names}
        time_pred = ms["full"] / sum(r * stage_ms[n] for r, n in zip(reach, ex.exit_names))
        used = {}
        for r in results:
            for name, b in zip(ex.exit_names, r.stage_batches):
                used.setdefault(name, []).append(b)
        row = {
            "batch": size,
            "batches": len(batches),
            "full_ms": ms["full"],
            "early_exit_ms": ms["early_exit"],
            "full_us_per_frame": ms["full"] * 1e3 / size,
            "early_exit_us_per_frame": ms["early_exit"] * 1e3 / size,
            "measured_speedup": measured,
            "flop_speedup": flops["speedup"],
            "ratio": measured / flops["speedup"],
            "stage_ms_at_full_batch": stage_ms,
            "reach": dict(zip(ex.exit_names, reach)),
            "time_predicted_speedup": time_pred,
            "ratio_to_time_prediction": measured / time_pred,
            "exit_rates": flops["exit_rates"],
            "expected_flops": flops["expected_flops"],
            "mean_bucket_per_stage": {n: float(np.mean(v)) for n, v in used.items()},
            "agrees_with_per_frame_reference": True,
            "accuracy": float((pred == np.resize(splits.test.y, len(pred))).mean()),
            "compile": compiled,
            "stats": t.stats(),
        }
        rows.append(row)
        log(
            f"batch {size:4d}: full {row['full_ms']:8.3f} ms, early exit "
            f"{row['early_exit_ms']:8.3f} ms, measured {measured:6.2f}x, FLOPs "
            f"{flops['speedup']:6.2f}x, ratio {row['ratio']:.3f}; stage times predict "
            f"{time_pred:6.2f}x, ratio {row['ratio_to_time_prediction']:.3f} (compile "
            f"{compiled['seconds']:.1f} s, {compiled['executables']} executables, "
            f"{len(compiled['buckets'])} buckets)"
        )
    return {
        "workdir": os.path.abspath(workdir),
        "model": net.to_dict().get("name", config.model.name),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "calibration": cal,
        "backbone_flops": nc.backbone_flops,
        "exit_flops": dict(nc.exit_flops),
        "rounds": rounds,
        "min_bucket": min_bucket,
        "half_steps": half_steps,
        "load_average": list(os.getloadavg()),
        "rows": rows,
    }


def format_table(rep: dict) -> str:
    lines = [
        f"{rep['model']} on {rep['backend']} ({rep['calibration']['criterion']}, thresholds from "
        f"{rep['calibration']['source']}); load average {rep['load_average'][0]:.2f}",
        f"{'batch':>6}{'full ms':>11}{'early ms':>11}{'measured':>10}{'FLOPs':>9}{'ratio':>8}"
        f"{'time':>9}{'ratio':>8}{'compile s':>11}  exit rates",
    ]
    for r in rep["rows"]:
        rates = ", ".join(f"{n} {v:.3f}" for n, v in r["exit_rates"].items())
        lines.append(
            f"{r['batch']:>6}{r['full_ms']:>11.3f}{r['early_exit_ms']:>11.3f}"
            f"{r['measured_speedup']:>9.2f}x{r['flop_speedup']:>8.2f}x{r['ratio']:>8.3f}"
            f"{r['time_predicted_speedup']:>8.2f}x{r['ratio_to_time_prediction']:>8.3f}"
            f"{r['compile']['seconds']:>11.1f}  {rates}"
        )
    return "\n".join(lines)


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m export.batched_exit_bench``."""
    p = args_lib.ArgumentParser(
        prog="python -m export.batched_exit_bench", description=__doc__.split("\n")[0]
    )
    p.add_argument("--workdir", required=True, type=args_lib.existing_dir())
    p.add_argument("--bundle", default=None, type=args_lib.existing_dir(),
                   help="take the thresholds from this bundle's calibration")  # fmt: skip
    p.add_argument("--batches", type=args_lib.number_list(args_lib.count(1, 4096)),
                   default=[16, 64, 256], help="batch sizes, comma-separated")  # fmt: skip
    p.add_argument("--rounds", type=args_lib.count(1, 1000), default=5)
    p.add_argument("--min-bucket", type=args_lib.count(1, 4096), default=1)
    p.add_argument("--half-steps", action="store_true",
                   help="buckets at 3*2**k too (less padding, more executables)")  # fmt: skip
    p.add_argument("--json", default=None, type=args_lib.output_file())
    return p


def main(argv=None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(a) -> int:
    rep = measure(
        a.workdir, a.bundle, a.batches, a.rounds, a.min_bucket, a.half_steps,
        log=lambda s: print(s, file=sys.stderr),
    )  # fmt: skip
    print(format_table(rep))
    if a.json:
        write_json_atomic(a.json, rep)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
