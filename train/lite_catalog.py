"""Builds MCDNN's catalog from the pretrained EfficientNet-Lite family, measured on the real clips.

  python -m train.lite_catalog --config=configs/clips_lite_catalog.py --workdir=runs/lite_catalog
  python -m train.lite_catalog --config=configs/clips_lite_catalog.py:smoke --workdir=/tmp/lc

Variants are models x input resolutions x weight formats (the TFLite
converter's fp32 / fp16 / dynamic / int8, or litert-quantizer recipes such as
int4 blockwise), each exported and measured in LiteRT on the test clips
(`pipelines.lite_catalog`). Re-running resumes: finished variants are reused
when their spec and file match. Writes ``<workdir>/catalog.json`` and prints
the table and issue 15's memory / latency targets.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags
from ml_collections import config_flags

from flexjax.cli import define_threads, fail, parse_flags, start_job
from flexjax.config import lite_catalog_defaults

flags.DEFINE_string("workdir", None, "Directory for the variants and catalog.json.")
config_flags.DEFINE_config_file(
    "config", None, "Lite catalog config (configs/clips_lite_catalog.py)."
)
define_threads()
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv, FLAGS.threads)
    # lazy: flag errors are reported, and --threads applied, before JAX loads
    from pipelines import lite_catalog

    try:
        lite_catalog.validate(FLAGS.config)  # bad models / sizes / recipes: before any work
        report = lite_catalog.run(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as e:
        fail(str(e))
    print(lite_catalog.format_report(report))


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main, flags_parser=functools.partial(parse_flags, schema_fn=lite_catalog_defaults))
