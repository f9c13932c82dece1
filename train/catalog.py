"""Builds an MCDNN catalog: approximated variants per task, exported and measured.

  python -m train.catalog --config=configs/mnist_catalog.py --workdir=runs/catalog
  python -m train.catalog --config=configs/mnist_catalog.py:smoke --workdir=/tmp/catalog

Steps (re-running resumes: finished models and variants are kept):

1. train the ``digit`` LeNet (`flexjax.training.train_and_evaluate`); derive
   the other tasks by relabeling and train only their upper layers on the
   frozen shared stem (`flexjax.finetune`);
2. per task, per variant: apply its recipe of pure transforms
   (`flexjax.approx`), fine-tune briefly with distillation from the original,
   export (`export.bundle.export_model`, precision / sparse storage) and
   measure its accuracy on the test split **with the exported LiteRT model**;
3. time every variant's ``full`` signature against the original, interleaved
   in the same run, plus the load time; energy per run / per load from the
   energy model in the config (or a phone through adb);
4. write ``catalog.json``, ``eval.npz`` (test images + per-task labels, for
   ``runtime.ams --execute``), Pareto plots per task;
5. sharing: export the stem once and one head per task (``shared/``), and time
   the shared runtime (stem once per frame) against separate models;
6. specialization: detect skew on a skewed stream, retarget the cheap variant
   with and without pre-forwarding vs a full retrain (Table 3 analogue), and
   measure the cascade on the stream (``specialize.json``);
7. a day trace and AMS (Fig. 11 analogue): ``trace.json``, ``ams.json``,
   ``fig11.png``.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags
from ml_collections import config_flags

from flexjax.cli import define_threads, fail, note_if_finished, parse_flags, start_job
from flexjax.config import catalog_defaults

flags.DEFINE_string("workdir", None, "Directory for models, bundles and catalog.json.")
config_flags.DEFINE_config_file("config", None, "Catalog config file (configs/*_catalog.py).")
define_threads()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv, FLAGS.threads)
    # lazy: flag errors are reported, and --threads applied, before JAX loads
    from export.bundle import ExportError
    from flexjax.approx import ApproxError
    from flexjax.checkpoint import CheckpointMismatchError
    from pipelines import mcdnn, mcdnn_report

    note_if_finished(FLAGS.workdir, marker="ams.json")  # the catalog's last stage
    try:
        report = mcdnn.run(FLAGS.config, FLAGS.workdir)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        ExportError,
        ApproxError,
        CheckpointMismatchError,
    ) as e:
        fail(str(e))
    print(mcdnn_report.format_report(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=functools.partial(parse_flags, schema_fn=catalog_defaults))
