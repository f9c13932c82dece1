"""FlexDNN: searched exits where they pay off, measured against BranchyNet and the backbone.

Usage:
  python -m train.flexdnn --config=configs/mnist_flexdnn.py --workdir=runs/flexdnn
  python -m train.flexdnn --config=configs/mnist_flexdnn.py:smoke --workdir=/tmp/f
  python -m train.flexdnn --config=configs/clips_lite0_flexdnn.py --workdir=runs/lite0_flexdnn

A config with a ``lite`` section (a frozen pretrained backbone over the real
clips) runs `pipelines.flexdnn_lite` instead.

The stages and what each leaves in the workdir are listed in `pipelines.flexdnn`;
re-running the same command resumes after the last finished stage.
"""

from __future__ import annotations

import functools
import os
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from flexjax.cli import define_threads, fail, note_if_finished, parse_flags, start_job
from flexjax.config import flexdnn_lite_defaults

flags.DEFINE_string("workdir", None, "Directory for every stage's output and the report.")
config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).")
define_threads()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv, FLAGS.threads)
    # lazy: flag errors are reported, and --threads applied, before JAX loads
    from flexjax.checkpoint import CheckpointMismatchError
    from pipelines import flexdnn, flexdnn_bench, flexdnn_lite

    t0 = time.monotonic()

    def log(msg: str) -> None:
        m, sec = divmod(int(time.monotonic() - t0), 60)
        print(f"[{m:02d}:{sec:02d}] {msg}", file=sys.stderr, flush=True)

    note_if_finished(FLAGS.workdir)
    try:
        lite = "lite" in FLAGS.config
        job = flexdnn_lite if lite else flexdnn
        report = job.run(FLAGS.config, FLAGS.workdir, log)
    except (ValueError, FileNotFoundError, FloatingPointError, CheckpointMismatchError) as e:
        fail(str(e))
    print((flexdnn_lite if lite else flexdnn_bench).format_report(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=functools.partial(parse_flags, schema_fn=flexdnn_lite_defaults))
