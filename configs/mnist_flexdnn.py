"""FlexDNN on an AlexNet-size backbone with MNIST-5k video streams (bundled data).

  python -m train.flexdnn --config=configs/mnist_flexdnn.py --workdir=runs/mnist_flexdnn
  python -m train.flexdnn --config=configs/mnist_flexdnn.py:smoke --workdir=/tmp/f

Trains the backbone (Edgent's AlexNet at quarter width, no side exits), puts an
over-parameterized exit at each of its 5 block boundaries, searches each exit,
keeps the exits with R > 1, and benchmarks the result against the backbone,
width-reduced backbones and BranchyNet (exits after conv blocks 1 and 2) on
the test split and on video streams filmed from it. Runs in under 20 minutes
on 2 CPU cores. `:demo` is the `make demo` setting (a smaller search).
"""

from flexjax.config import flexdnn_defaults


def get_config(arg: str | None = None):
    config = flexdnn_defaults()
    config.model.name = "alexnet_branchy"
    config.model.kwargs.width = 0.25
    config.data.name = "mnist5k"
    config.data.val_fraction = 0.2  # 1,000 val images: thresholds and R need the frames
    config.train.batch_size = 64
    config.train.num_epochs = 10
    config.train.learning_rate = 1e-3
    config.train.augment_shift = 2
    config.train.log_every = 50
    config.train.checkpoint_every = 200
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    config.video.enabled = True
    config.video.num_clips = 50
    config.video.frames_per_clip = 40
    f = config.flexdnn
    f.head_features = 32
    f.head_convs = 3
    f.exit_epochs = 3
    f.delta = 0.01
    f.prune_fraction = 0.5
    f.finetune_steps = 50
    f.max_trials = 10
    f.lossy_widths = (0.5, 0.75)
    if arg == "demo":  # make demo: fewer epochs, a smaller search, one lossy width
        config.train.num_epochs = 6
        f.exit_epochs = 2
        f.finetune_steps = 40
        f.max_trials = 5
        f.lossy_widths = (0.5,)
        config.video.num_clips = 25
    elif arg == "smoke":  # tests: tiny data, a couple of search steps
        config.data.limit = 600
        config.calibration.method = "empirical"  # 1-point bounds need ~1000 val frames
        config.train.batch_size = 32
        config.train.num_epochs = 1
        config.train.log_every = 5
        config.train.checkpoint_every = 50
        config.video.num_clips = 4
        config.video.frames_per_clip = 8
        f.positions = (3, 7)
        f.head_features = 16
        f.exit_epochs = 1
        f.finetune_steps = 5
        f.max_trials = 2
        f.lossy_widths = (0.5,)
        f.timing_rounds = 2
        f.timing_calls = 10
        f.bench_rounds = 5  # enough for runtime.bench to reproduce the ratio within 5%
        f.bench_frames = 60
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: demo, smoke")
    return config
