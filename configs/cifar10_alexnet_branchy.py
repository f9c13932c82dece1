"""Edgent's 5-exit BranchyNet AlexNet on CIFAR-10 (full width).

  python -m train.multi_exit --config=configs/cifar10_alexnet_branchy.py \
      --workdir=runs/cifar10_alexnet_branchy \
      --config.data.path=/path/to/cifar-10-batches-py

CIFAR-10 is not bundled: point `data.path` at a local copy of the standard
python pickles (data_batch_1..5, test_batch).
Five exit points: four side exits plus the final classifier.
The `smoke` variant trains on scikit-learn's digits resized to 32x32x3 so tests
run it without CIFAR-10.
"""

from flexjax.config import defaults, smoke_on_digits


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "alexnet_branchy"
    config.data.name = "cifar10"
    config.data.path = "data/cifar-10-batches-py"
    config.train.batch_size = 128
    config.train.num_epochs = 60
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-3
    config.train.weight_decay = 0.0
    config.train.warmup_steps = 200
    config.train.augment_shift = 4
    config.train.checkpoint_every = 500
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    if arg == "smoke":
        config.model.kwargs.width = 0.125
        smoke_on_digits(config)
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
