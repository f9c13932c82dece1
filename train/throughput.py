"""Benchmark: training throughput (images/s) of configured jobs, measured in one run.

  python -m train.throughput --config=configs/mnist_lenet_branchy.py \
      --config=configs/mnist_alexnet_branchy.py --steps=100 --json=throughput.json

Times the real jitted, data-parallel train step (after untimed warm-up steps
that include compilation) on each config's training batches.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import platform

from absl import app, flags, logging

from flexjax import config as config_lib
from flexjax.cli import fail, parse_flags
from runtime.args import MAX_COUNT

flags.DEFINE_multi_string("config", None, "Config file(s) (configs/*.py[:arg]).")
flags.DEFINE_integer("steps", 100, "Timed steps per config.", lower_bound=1, upper_bound=MAX_COUNT)
flags.DEFINE_integer(
    "warmup", 5, "Untimed steps first (the first one compiles).", lower_bound=0,
    upper_bound=100_000,
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


def _load_config(spec: str, overrides: list[str]):
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location("_bench_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects key=value, got {item!r}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = config
        for name in parents:
            if name not in node:
                raise ValueError(f"unknown config key {key!r} in --set")
            node = node[name]
        if leaf not in node and parents != ["model", "kwargs"]:
            raise ValueError(f"unknown config key {key!r} in --set")
        node[leaf] = value
    return config_lib.validate(config)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:  # every config and override is checked before JAX loads
        configs = [(spec, _load_config(spec, FLAGS.set)) for spec in FLAGS.config]
    except (ValueError, TypeError, OSError) as e:
        fail(str(e))
    # lazy: flag and config errors are reported before JAX and TensorFlow load (seconds)
    from flexjax import training
    from flexjax.io import write_json_atomic

    rows = []
    try:
        for spec, config in configs:
            row = training.measure_throughput(config, FLAGS.steps, FLAGS.warmup)
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
            {
                "machine": {
                    "cpus": os.cpu_count(),
                    "processor": _cpu_model(),
                    "python": platform.python_version(),
                },
                "results": rows,
            },
        )
    print(json.dumps({r["config"]: round(r["images_per_sec"], 1) for r in rows}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
