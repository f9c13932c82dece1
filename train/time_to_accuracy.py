"""Benchmark: wall time to the final accuracy, flexjax's training job vs the PyTorch loop.

  python -m train.time_to_accuracy --config=configs/mnist_lenet_branchy.py \
      --seeds=0,1,2 --workdir=/tmp/tta --json=tta.json

Per seed, alternating which goes first: flexjax runs the real job
(`flexjax.training.train_and_evaluate`: checkpoints, metrics.jsonl,
TensorBoard, a validation pass per epoch, the report), and PyTorch eager
(`train.torch_reference.TorchTrainer`) trains the same net from the same
initial weights on the same batches in the same order with the same loss,
optimizer and schedule, also with a validation pass per epoch. Reported per
side: training wall time (flexjax: ``train_seconds + compile_seconds`` from
report.json; torch: the loop), the final exit's test accuracy, and the first
epoch at which the validation accuracy reached `--target` (both sides' curves
are written). Video evaluation is turned off (it does not touch training).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import time

from absl import app, flags

from flexjax.cli import fail, limit_cpu_threads, parse_flags, start_job
from runtime.args import MAX_THREADS
from train.benchmarking import load_config

flags.DEFINE_string("config", None, "Config file (configs/*.py[:arg]).")
flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed), one run of each side per seed.")
flags.DEFINE_integer("threads", 0, "CPU threads for both (0 = every core).",
                     lower_bound=0, upper_bound=MAX_THREADS)  # fmt: skip
flags.DEFINE_string("workdir", "/tmp/flexjax_tta", "flexjax workdirs go under here (fresh).")
flags.DEFINE_float("target", 0.0, "Validation accuracy (final exit) to time; 0 = none.",
                   lower_bound=0.0, upper_bound=1.0)  # fmt: skip
flags.DEFINE_string("json", "", "Also write the results here.")
flags.DEFINE_multi_string("set", [], "Override a config value (key=value).")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def run_flexjax(config, workdir: str) -> dict:
    # lazy: JAX loads after --threads is applied
    from flexjax import training
    from flexjax.io import read_jsonl

    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    report = training.train_and_evaluate(config, workdir)
    job = time.perf_counter() - t0
    val = [
        (r["step"], r["val/accuracy_final"])
        for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
        if "val/accuracy_final" in r
    ]
    return {
        "train_seconds": report["train"]["train_seconds"] + report["train"]["compile_seconds"],
        "compile_seconds": report["train"]["compile_seconds"],
        "job_seconds": job,
        "test_accuracy": report["final_accuracy"],
        "val_curve": val,
    }


def run_torch(config, seed: int) -> dict:
    # lazy: torch is the optional bench extra; JAX after --threads
    import jax
    import torch

    from flexjax import data as data_lib
    from flexjax import training
    from flexjax.spec import FINAL
    from train import torch_reference

    setup = training.prepare(config)
    net, splits, t = setup.net, setup.splits, config.train
    steps_per_epoch = len(splits.train) // t.batch_size
    total = steps_per_epoch * t.num_epochs
    tx = training.make_optimizer(t, total)
    variables = jax.device_get(training.initial_state(net, tx, seed, None).variables())
    t0 = time.perf_counter()
    trainer = torch_reference.TorchTrainer(
        net, variables, t, training.exit_weights(net, tuple(t.exit_weights)), total, seed=seed
    )
    val = []
    for epoch in range(t.num_epochs):
        for x, y in data_lib.batches(
            splits.train, t.batch_size, seed=seed, epoch=epoch, drop_remainder=True
        ):
            trainer.step(x, y)
        logits = trainer.predict(splits.val.x, t.eval_batch_size)[FINAL]
        acc = float((logits.argmax(-1) == splits.val.y).mean())
        val.append(((epoch + 1) * steps_per_epoch, acc))
    seconds = time.perf_counter() - t0
    test = trainer.predict(splits.test.x, t.eval_batch_size)[FINAL]
    return {
        "train_seconds": seconds,
        "test_accuracy": float((test.argmax(-1) == splits.test.y).mean()),
        "val_curve": val,
        "torch_threads": torch.get_num_threads(),
    }


def _first_at(curve, target: float, total_seconds: float, total_steps: int):
    for step, acc in curve:
        if acc >= target:
            return step, total_seconds * step / total_steps
    return None, None


def main(argv: list[str]) -> None:
    start_job(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # torch's best on a shared machine
    try:
        base = load_config(FLAGS.config, FLAGS.set)
        limit_cpu_threads(FLAGS.threads)
        seeds = [int(s) for s in FLAGS.seeds]
    except (ValueError, TypeError, OSError) as e:
        fail(str(e))
    # lazy: torch is the optional bench extra
    import torch

    from flexjax.io import write_json_atomic

    torch.set_num_threads(FLAGS.threads or os.cpu_count())
    rows = []
    for i, seed in enumerate(seeds):
        config = base.copy_and_resolve_references()
        config.seed = seed
        config.video.enabled = False
        workdir = os.path.join(FLAGS.workdir, f"seed{seed}")
        sides = {}
        order = ("flexjax", "torch") if i % 2 == 0 else ("torch", "flexjax")
        for side in order:
            load = os.getloadavg()[0]
            if side == "flexjax":
                sides[side] = run_flexjax(config, workdir)
            else:
                sides[side] = run_torch(config, seed)
            sides[side]["load_average_before"] = round(load, 2)
        total_steps = sides["torch"]["val_curve"][-1][0]
        for side in sides.values():
            if FLAGS.target:
                side["target_step"], side["seconds_to_target"] = _first_at(
                    side["val_curve"], FLAGS.target, side["train_seconds"], total_steps
                )
        rows.append({"seed": seed, **sides})
        print(
            f"seed {seed}: flexjax {sides['flexjax']['train_seconds']:.1f} s "
            f"(test acc {sides['flexjax']['test_accuracy']:.4f}), torch "
            f"{sides['torch']['train_seconds']:.1f} s (test acc "
            f"{sides['torch']['test_accuracy']:.4f}); load "
            f"{sides['flexjax']['load_average_before']:.2f} / "
            f"{sides['torch']['load_average_before']:.2f}",
            flush=True,
        )
    summary = {
        side: {
            "median_train_seconds": statistics.median(r[side]["train_seconds"] for r in rows),
            "mean_test_accuracy": statistics.mean(r[side]["test_accuracy"] for r in rows),
        }
        for side in ("flexjax", "torch")
    }
    print(json.dumps(summary))
    if FLAGS.json:
        write_json_atomic(FLAGS.json, {"config": FLAGS.config, "summary": summary, "runs": rows})


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
