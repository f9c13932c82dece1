"""Edgent's 5-exit BranchyNet AlexNet on the bundled MNIST-5k sample (28x28x1).

  python -m train.multi_exit --config=configs/mnist_alexnet_branchy.py --workdir=runs/alexnet

The CIFAR-10 version of the same network is configs/cifar10_alexnet_branchy.py;
this one trains on bundled data at half width so it fits a 2-core CPU.
"""

from flexjax.config import defaults


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "alexnet_branchy"
    config.model.kwargs.width = 0.5
    config.data.name = "mnist5k"
    config.train.batch_size = 64
    config.train.num_epochs = 15
    config.train.learning_rate = 1e-3
    config.train.augment_shift = 2
    config.train.checkpoint_every = 200
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    config.video.enabled = True
    if arg == "smoke":
        config.model.kwargs.width = 0.125
        config.data.limit = 400
        config.train.batch_size = 32
        config.train.num_epochs = 1
        config.train.log_every = 5
        config.video.num_clips = 5
        config.video.frames_per_clip = 8
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
