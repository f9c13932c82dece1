"""Inception-V3 (FlexDNN's second backbone, width 0.125) trained to convergence on Fashion-MNIST.

  python -m train.multi_exit --config=configs/fashion_inception_v3.py \
      --workdir=runs/fashion_inception_v3

The full Fashion-MNIST (60,000 train images, 6,000 of them held out for
validation, the official 10,000 test images; Debian `dataset-fashion-mnist`,
installed by tools/setup_data.sh) upscaled to 32x32x1, the CIFAR-size input
the zoo's Inception-V3 takes. BranchyNet exits at 1/3 and 2/3 of the depth are
trained jointly. BENCHMARKS.md records accuracy and wall time. `:smoke` runs a
few steps on a 600-image slice for tests.
"""

from flexjax.config import defaults, smoke_on_slice


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "inception_v3"
    config.model.kwargs.width = 0.125
    config.data.name = "fashion_mnist"
    config.data.image_size = 32
    config.data.channels = 1
    config.data.val_fraction = 0.1  # 6,000 of the 60,000 training images
    config.train.batch_size = 128
    config.train.num_epochs = 8
    config.train.optimizer = "adam"
    config.train.learning_rate = 2e-3
    config.train.augment_shift = 2
    config.train.checkpoint_every = 500
    config.train.log_every = 100
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    if arg == "smoke":
        config.model.kwargs.width = 0.0625
        smoke_on_slice(config, limit=600)
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
