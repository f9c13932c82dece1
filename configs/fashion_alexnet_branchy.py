"""Edgent's 5-exit BranchyNet AlexNet (width 0.5) trained to convergence on Fashion-MNIST.

  python -m train.multi_exit --config=configs/fashion_alexnet_branchy.py \
      --workdir=runs/fashion_alexnet

The full Fashion-MNIST at its native 28x28x1 (60,000 train images, 6,000 of
them held out for validation, the official 10,000 test images; Debian
`dataset-fashion-mnist`, installed by tools/setup_data.sh). Target: >= 90% test
accuracy at the final exit on 2 CPU cores; BENCHMARKS.md records accuracy and
wall time. `:smoke` runs a few steps on a 600-image slice for tests.
"""

from flexjax.config import defaults, smoke_on_slice


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "alexnet_branchy"
    config.model.kwargs.width = 0.5
    config.data.name = "fashion_mnist"
    config.data.val_fraction = 0.1  # 6,000 of the 60,000 training images
    config.train.batch_size = 128
    config.train.num_epochs = 6
    config.train.learning_rate = 1e-3
    config.train.augment_shift = 2
    config.train.checkpoint_every = 500
    config.train.log_every = 100
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    if arg == "smoke":
        config.model.kwargs.width = 0.125
        smoke_on_slice(config, limit=600)
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
