"""BranchyNet LeNet on the bundled MNIST-5k sample (the quickstart).

  python -m train.multi_exit --config=configs/mnist_lenet_branchy.py --workdir=runs/lenet
  python -m train.multi_exit --config=configs/mnist_lenet_branchy.py:smoke --workdir=/tmp/s

Joint BranchyNet training of the backbone and its one side exit (after the
first conv block); entropy thresholds calibrated on the validation split to
stay within 1 accuracy point of the final exit.
"""

from flexjax.config import defaults


def get_config(arg: str | None = None):
    config = defaults()
    config.model.name = "lenet_branchy"
    config.data.name = "mnist5k"
    config.train.batch_size = 64
    config.train.num_epochs = 30
    config.train.learning_rate = 2e-3
    config.train.augment_shift = 2
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    config.video.enabled = True
    if arg == "smoke":
        config.video.num_clips = 10
        config.video.frames_per_clip = 10
        config.data.limit = 600
        config.calibration.method = "empirical"  # 1-point bounds need ~1000 val frames
        config.train.batch_size = 32
        config.train.num_epochs = 2
        config.train.log_every = 5
        config.train.checkpoint_every = 10
        config.model.kwargs.width = 0.5
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
