"""CIFAR ResNet-20 with BranchyNet exits at 1/3 and 2/3 depth.

  python -m train.multi_exit --config=configs/cifar10_resnet.py \
      --workdir=runs/cifar10_resnet \
      --config.data.path=/path/to/cifar-10-batches-py

CIFAR-10 is not bundled: point `data.path` at a local copy of the standard
python pickles (data_batch_1..5, test_batch).
Set model.kwargs.depth=110 for BranchyNet's ResNet-110.
The `smoke` variant trains on scikit-learn's digits resized to 32x32x3 so tests
run it without CIFAR-10.
"""

from flexjax.config import defaults, smoke_on_digits


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "resnet"
    config.model.kwargs.depth = 20
    config.data.name = "cifar10"
    config.data.path = "data/cifar-10-batches-py"
    config.train.batch_size = 128
    config.train.num_epochs = 60
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.1
    config.train.weight_decay = 1e-4
    config.train.warmup_steps = 200
    config.train.augment_shift = 4
    config.train.checkpoint_every = 500
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    if arg == "smoke":
        config.model.kwargs.depth = 8
        config.model.kwargs.width = 0.5
        smoke_on_digits(config)
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
