"""VGG-16 with BranchyNet exits at 1/3 and 2/3 depth on CIFAR-10 (FlexDNN backbone).

  python -m train.multi_exit --config=configs/cifar10_vgg16.py \
      --workdir=runs/cifar10_vgg16 \
      --config.data.path=/path/to/cifar-10-batches-py

CIFAR-10 is not bundled: point `data.path` at a local copy of the standard
python pickles (data_batch_1..5, test_batch).
Width 0.25 keeps VGG-16's depth and shape at CPU cost.
The `smoke` variant trains on scikit-learn's digits resized to 32x32x3 so tests
run it without CIFAR-10.
"""

from flexjax.config import defaults, smoke_on_digits


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "vgg16"
    config.model.kwargs.width = 0.25  # 16..128 filters: trainable on a CPU
    config.data.name = "cifar10"
    config.data.path = "data/cifar-10-batches-py"
    config.train.batch_size = 128
    config.train.num_epochs = 40
    config.train.optimizer = "sgd"
    config.train.learning_rate = 0.05
    config.train.weight_decay = 5e-4
    config.train.warmup_steps = 200
    config.train.augment_shift = 4
    config.train.checkpoint_every = 500
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    if arg == "smoke":
        config.model.kwargs.width = 0.0625
        smoke_on_digits(config)
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
