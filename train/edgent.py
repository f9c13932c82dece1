"""Edgent device-edge co-inference, end to end, as one resumable job.

Usage:
  python -m train.edgent --config=configs/mnist_edgent.py --workdir=runs/edgent
  python -m train.edgent --config=configs/mnist_edgent.py:smoke --workdir=/tmp/edgent

Stages (`pipelines.edgent`): train -> export with partitions -> latency sweep ->
profile device and edge -> fit the latency regressions -> benchmark against
real gRPC edge servers. Re-running the same command continues after the last
finished stage; a workdir made with another config is refused. Override any
config value with ``--config.bench.frames=50``.
"""

from __future__ import annotations

import functools
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from flexjax.cli import fail, parse_flags, start_job
from flexjax.config import edgent_defaults

flags.DEFINE_string("workdir", None, "Directory for every stage's output and the report.")
config_flags.DEFINE_config_file("config", None, "Edgent config file (configs/*_edgent.py[:arg]).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv)
    # lazy: flag errors are reported before JAX, TensorFlow and the job load
    import jax

    from export.bundle import ExportError
    from pipelines import edgent
    from runtime.bundle import BundleError
    from runtime.planner import PlannerError

    print(f"devices: {jax.devices()}", file=sys.stderr)
    try:
        report = edgent.run(FLAGS.config, FLAGS.workdir, log=lambda m: print(m, flush=True))
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        FloatingPointError,
        ExportError,
        BundleError,
        PlannerError,
        RuntimeError,
    ) as e:
        fail(str(e))
    print(edgent.format_report(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=functools.partial(parse_flags, schema_fn=edgent_defaults))
