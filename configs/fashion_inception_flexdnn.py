"""FlexDNN on Inception-V3 (width 0.125) trained to convergence on Fashion-MNIST (issue 13, item 2).

  python -m train.flexdnn --config=configs/fashion_inception_flexdnn.py \
      --workdir=runs/fashion_inception_flexdnn --threads=1
  python -m train.flexdnn --config=configs/fashion_inception_flexdnn.py:smoke --workdir=/tmp/f

The backbone is `configs/fashion_inception_v3.py`'s (full Fashion-MNIST, 54,000
train / 6,000 val / the official 10,000 test images, 32x32x1, Adam 2e-3
cosine, 8 epochs) without side exits. FlexDNN searches exits after the stem
and at four inception blocks; BranchyNet (the zoo's heads at 1/3 and 2/3 of
the depth, positions 8 and 15) starts from the same trained backbone and is
fine-tuned jointly with the extra budget FlexDNN's exits got
(`flexdnn.branchy_protocol`, pipelines/flexdnn.py). Benchmarked on the first
`flexdnn.bench_frames` test images and on a video stream filmed from the test
split. Run once on the shared 2-core machine with `--config.train.num_epochs=5`
(8 epochs did not fit the session; XLA compiled the backbone step in 37 s and
the joint fine-tuning step in 2-2.5 min there): BENCHMARKS.md, "Converged
Inception-V3 backbone on Fashion-MNIST". `:smoke` checks the stages.
"""

from configs import fashion_inception_v3
from flexjax.config import flexdnn_defaults, smoke_on_slice


def get_config(arg: str | None = None):
    config = flexdnn_defaults()
    # The backbone, its data, its training and the exit rule: exactly `fashion_inception_v3.py`'s.
    base = fashion_inception_v3.get_config()
    for section in ("model", "data", "train", "exits"):
        config[section].update(base[section])
    config.calibration.method = "ucb"  # the bound holds on test (BENCHMARKS.md); 6,000 val frames
    config.video.enabled = True
    config.video.num_clips = 25
    config.video.frames_per_clip = 40
    f = config.flexdnn
    f.positions = (2, 9, 11, 13, 15)  # stem conv block, stem pool, inception A, B, C
    f.head_features = 32
    f.head_convs = 3
    f.exit_epochs = 1
    f.delta = 0.01
    f.finetune_steps = 20
    f.max_trials = 3
    f.search_examples = 12_000  # 20 steps x 128 per trial need far fewer than 54,000
    f.lossy_widths = ()  # a narrower Inception trained to convergence costs another backbone
    f.timing_calls = 30
    f.bench_frames = 1000
    if arg == "smoke":
        config.model.kwargs.width = 0.0625
        smoke_on_slice(config, limit=600)
        config.video.num_clips = 4
        config.video.frames_per_clip = 8
        f.positions = (9, 12)
        f.head_features = 8
        f.finetune_steps = 3
        f.max_trials = 2
        f.timing_rounds = 2
        f.timing_calls = 5
        f.bench_rounds = 1
        f.bench_frames = 40
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return config
