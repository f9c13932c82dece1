"""MCDNN on the EfficientNet-Lite catalog: tasks + sharing, specialization, AMS (issue 15, 2-4).

  python -m train.lite_mcdnn --config=configs/clips_lite_mcdnn.py --workdir=runs/lite_mcdnn
  python -m train.lite_mcdnn --config=configs/clips_lite_mcdnn.py:smoke --workdir=/tmp/lm

Reads (or builds, resumably) the real lite catalog (`train.lite_catalog`),
then: coarse tasks grouped from ImageNet ids sharing Lite0's frozen stem
(`runtime.mcdnn.SharedStem`) vs one model per task; skew detection,
retargeting on pre-forwarded features and the cascade on a real clip; AMS
over day traces with every policy and the offline optimum
(`pipelines.lite_mcdnn`). Writes ``<workdir>/report.json``, ``ams.json``,
``fig11.png`` and prints the summary.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags
from ml_collections import config_flags

from flexjax.cli import define_threads, fail, parse_flags, start_job
from flexjax.config import lite_mcdnn_defaults

flags.DEFINE_string("workdir", None, "Directory for the catalog, shared stem, AMS and report.json.")
config_flags.DEFINE_config_file("config", None, "Config (configs/clips_lite_mcdnn.py).")
define_threads()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv, FLAGS.threads)
    # lazy: flag errors are reported, and --threads applied, before JAX loads
    from pipelines import lite_mcdnn

    try:
        lite_mcdnn.validate(FLAGS.config)  # bad tasks / ids / budgets: before any work
        report = lite_mcdnn.run(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        fail(str(e))
    print(lite_mcdnn.format_report(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=functools.partial(parse_flags, schema_fn=lite_mcdnn_defaults))
