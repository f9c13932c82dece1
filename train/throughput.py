"""Benchmark: training throughput (images/s) of configured jobs, measured in one run.

  python -m train.throughput --config=configs/mnist_lenet_branchy.py \
      --config=configs/mnist_alexnet_branchy.py --steps=100 --json=throughput.json

Times the real jitted, data-parallel train step (after untimed warm-up steps
that include compilation) on each config's training batches.
"""

from __future__ import annotations

import json

from absl import app, flags

from flexjax.cli import fail, parse_flags, start_job
from runtime.args import MAX_COUNT
from train.benchmarking import load_config, machine

flags.DEFINE_multi_string("config", None, "Config file(s) (configs/*.py[:arg]).")
flags.DEFINE_integer("steps", 100, "Timed steps per config.", lower_bound=1, upper_bound=MAX_COUNT)
flags.DEFINE_integer(
    "warmup", 5, "Untimed steps first (the first one compiles).", lower_bound=0,
    upper_bound=100_000,
)  # fmt: skip
flags.DEFINE_integer(
    "steps_per_call", 0, "Train steps per jitted call (0 = the config's train.steps_per_call).",
    lower_bound=0, upper_bound=1000,
)  # fmt: skip
flags.DEFINE_string("json", "", "Also write the results here.")
flags.DEFINE_multi_string(
    "set",
    [],
    "Override a config value in every config, e.g. --set=data.name=digits "
    "--set=data.image_size=32 (values are parsed as Python literals, else strings).",
)
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv)
    try:  # every config and override is checked before JAX loads
        configs = [(spec, load_config(spec, FLAGS.set)) for spec in FLAGS.config]
    except (ValueError, TypeError, OSError) as e:
        fail(str(e))
    # lazy: flag and config errors are reported before JAX and TensorFlow load (seconds)
    from flexjax import training
    from flexjax.io import write_json_atomic

    rows = []
    try:
        for spec, config in configs:
            row = training.measure_throughput(
                config, FLAGS.steps, FLAGS.warmup, FLAGS.steps_per_call or None
            )
            rows.append({"config": spec, "overrides": FLAGS.set, **row})
            print(
                f"{spec:<40} {row['images_per_sec']:>10.1f} images/s  (batch "
                f"{row['batch_size']}, {row['steps']} steps, {row['devices']} "
                f"{row['platform']} device(s), {row['backbone_flops'] / 1e6:.1f} MFLOPs/img)"
            )
    except (ValueError, TypeError, FileNotFoundError) as e:
        fail(str(e))
    if FLAGS.json:
        write_json_atomic(
            FLAGS.json,
            {"machine": machine(), "results": rows},
        )
    print(json.dumps({r["config"]: round(r["images_per_sec"], 1) for r in rows}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
