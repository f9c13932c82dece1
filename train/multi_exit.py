"""Trains a multi-exit network, calibrates its exits and writes report.json.

Usage:
  python -m train.multi_exit --config=configs/mnist_lenet_branchy.py --workdir=/tmp/lenet
  python -m train.multi_exit --config=configs/mnist_lenet_branchy.py:smoke --workdir=...

Re-running the same command resumes from the workdir's latest checkpoint.
Override any config value with ``--config.train.num_epochs=5``.
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from flexjax.cli import define_threads, fail, note_if_finished, parse_flags, start_job

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and the report.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).")
define_threads()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv, FLAGS.threads)
    # lazy: flag errors are reported, and --threads applied, before JAX loads
    import jax

    from flexjax import evaluation, training
    from flexjax.checkpoint import CheckpointMismatchError

    print(f"devices: {jax.devices()}", file=sys.stderr)
    note_if_finished(FLAGS.workdir)
    try:
        report = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointMismatchError) as e:
        fail(str(e))
    print(evaluation.format_report(report))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
