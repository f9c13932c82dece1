"""VGG-16 (FlexDNN's first backbone, width 0.25, BN) trained to convergence on Fashion-MNIST.

  python -m train.multi_exit --config=configs/fashion_vgg16.py --workdir=runs/fashion_vgg16

The full Fashion-MNIST (60,000 train images, 6,000 of them held out for
validation, and the official 10,000 test images; Debian `dataset-fashion-mnist`,
installed by tools/setup_data.sh) upscaled to 32x32x1 so VGG-16's five pools
fit. BranchyNet exits at 1/3 and 2/3 of the depth are trained jointly with the
backbone (they are what FlexDNN's baseline starts from). Target: >= 92% test
accuracy at the final exit on 2 CPU cores; BENCHMARKS.md records accuracy and
wall time. `:smoke` runs a few steps on a 600-image slice for tests.
"""

from flexjax.config import defaults, smoke_on_slice


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "vgg16"
    config.model.kwargs.width = 0.25  # 16..128 filters: trainable on a CPU
    config.data.name = "fashion_mnist"
    config.data.image_size = 32
    config.data.channels = 1
    config.data.val_fraction = 0.1  # 6,000 of the 60,000 training images
    config.train.batch_size = 128
    config.train.num_epochs = 8
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.05
    config.train.momentum = 0.9
    config.train.weight_decay = 5e-4
    config.train.warmup_steps = 200
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
