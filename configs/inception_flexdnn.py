"""FlexDNN on Inception-V3 (the paper's second backbone) at CPU-trainable scale.

  python -m train.flexdnn --config=configs/inception_flexdnn.py --workdir=runs/inception_flexdnn

Inception-V3 (stem, 3xA, B, 4xC, D, 2xE; each inception block one position)
at width 0.125 on the bundled MNIST-5k sample upscaled to 32x32x3, so it runs
end to end without downloads; candidate exits at every block boundary (the
stem's conv blocks and pool, and every inception block). For CIFAR-10:

  --config.data.name=cifar10 --config.data.path=/path/to/cifar-10-batches-py \
  --config.data.image_size=0 --config.data.channels=0

`:smoke` trains on scikit-learn digits for a quick end-to-end check.
"""

from flexjax.config import flexdnn_defaults, smoke_on_digits


def get_config(arg: str | None = None):
    config = flexdnn_defaults()
    config.model.name = "inception_v3"
    config.model.kwargs.width = 0.125
    config.data.name = "mnist5k"
    config.data.image_size = 32
    config.data.channels = 3
    config.train.batch_size = 64
    config.train.num_epochs = 5
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
    f.max_trials = 4
    f.lossy_widths = (0.5,)
    f.timing_calls = 30
    if arg == "smoke":
        config.model.kwargs.width = 0.0625
        smoke_on_digits(config)
        config.video.num_clips = 4
        config.video.frames_per_clip = 8
        f.positions = (9, 12)
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
