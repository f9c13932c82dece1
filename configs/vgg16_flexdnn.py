"""FlexDNN on VGG-16 (the paper's first backbone) at CPU-trainable scale.

  python -m train.flexdnn --config=configs/vgg16_flexdnn.py --workdir=runs/vgg16_flexdnn

VGG-16 at width 0.25 (16..128 filters, BN after every conv) on the bundled
MNIST-5k sample upscaled to 32x32x3, so it runs end to end without downloads;
candidate exits at all 13 block boundaries (every conv that feeds a conv, and
every pool). For CIFAR-10, point at a local copy of the python pickles:

  --config.data.name=cifar10 --config.data.path=/path/to/cifar-10-batches-py \
  --config.data.image_size=0 --config.data.channels=0

`:smoke` trains on scikit-learn digits for a quick end-to-end check.
"""

from flexjax.config import flexdnn_defaults, smoke_on_digits


def get_config(arg: str | None = None):
    config = flexdnn_defaults()
    config.model.name = "vgg16"
    config.model.kwargs.width = 0.25
    config.data.name = "mnist5k"
    config.data.image_size = 32
    config.data.channels = 3
    config.data.val_fraction = 0.2  # 1,000 val images: thresholds and R need the frames
    config.train.batch_size = 64
    config.train.num_epochs = 8
    config.train.optimizer = "adam"
    config.train.learning_rate = 1e-3
    config.train.augment_shift = 2
    config.train.checkpoint_every = 200
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    config.video.enabled = True
    config.video.num_clips = 25
    config.video.frames_per_clip = 40
    f = config.flexdnn
    f.head_features = 32
    f.head_convs = 3
    f.exit_epochs = 2
    f.delta = 0.01
    f.finetune_steps = 40
    f.max_trials = 6
    f.lossy_widths = (0.5,)
    f.timing_calls = 30
    if arg == "smoke":
        config.model.kwargs.width = 0.0625
        smoke_on_digits(config)
        config.video.num_clips = 4
        config.video.frames_per_clip = 8
        f.positions = (6, 13)
        f.head_features = 8
        f.exit_epochs = 1
        f.finetune_steps = 3
        f.max_trials = 2
        f.timing_rounds = 2
        f.timing_calls = 5
        f.bench_rounds = 1
        f.bench_frames = 40
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
