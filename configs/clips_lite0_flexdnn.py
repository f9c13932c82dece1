"""FlexDNN on a frozen, ImageNet-pretrained EfficientNet-Lite0 over the real clips (issue 13).

  python -m train.flexdnn --config=configs/clips_lite0_flexdnn.py --workdir=runs/lite0_flexdnn
  python -m train.flexdnn --config=configs/clips_lite0_flexdnn.py:demo --workdir=/tmp/lite0_demo
  python -m train.flexdnn --config=configs/clips_lite0_flexdnn.py:quick --workdir=runs/demo/q
  python -m train.flexdnn --config=configs/clips_lite0_flexdnn.py:smoke --workdir=/tmp/lite0_smoke

The backbone is EfficientNet-Lite0 at 224 px (frozen). Candidate exits hang off
every 2nd MBConv block boundary after the first three (positions 7, 9, 11, 13,
15, 17; the last block is left out: it reads what the classifier reads). Each
is over-parameterized: two depthwise-separable blocks (depthwise 3x3 ->
pointwise 1x1 (128) -> relu6) -> global pool -> dense 1000, as FlexDNN's exits
are described, distilled from the backbone's own softmax (T = 2) on the cached
activations of every train-clip frame (fps 0), three crops each (the centre
and two 0.75 zooms) and their mirror images. The search (filters, then layers,
fine-tuned with distillation) and the R plan run on the cached activations;
thresholds come from every frame of the val clips (reference labels:
EfficientNet-Lite2's top-1, `flexjax.data.clips`), the benchmark uses every
frame of the test clips. BranchyNet (frozen protocol): conv 1x1 (128) -> pool
-> dense heads after blocks 8 and 14 (~1/3, 2/3 of the 16 blocks), distilled
on the same cached features for as many steps as each FlexDNN exit got.

The search tries at most 4 architectures per exit (40 fine-tuning steps each)
after 300 distillation steps. `:demo` (the `make demo` candidate): the same
search over less: 5 fps, centre crops mirrored, three candidates (every 4th
block). `:quick` (`make demo`): a smaller search over less, to finish in minutes on
2 cores: train clips at 2 fps (centre crops mirrored), two candidates (blocks 7 and 11)
distilled 150 steps at batch 32, <= 3 search steps of 20 fine-tuning steps, 3 x 5 timing
calls, 2 bench rounds, parity on 8 frames. `:smoke`: the tests' 64 px run.
"""

from flexjax.config import flexdnn_lite_defaults


def get_config(arg: str | None = None):
    config = flexdnn_lite_defaults()
    config.exits.criterion = "entropy"
    config.exits.epsilon = 0.01
    f = config.flexdnn
    f.head_features = 128
    f.head_convs = 2
    f.delta = 0.01
    f.prune_fraction = 0.5
    f.finetune_steps = 40
    f.finetune_lr = 1e-3
    f.max_trials = 4
    f.timing_rounds = 5
    f.timing_calls = 10
    f.bench_rounds = 3
    f.bench_frames = 0
    lite = config.lite
    lite.every = 2
    lite.skip_first = 3
    lite.distill_steps = 300
    lite.flips = True
    # lite0 agrees with the reference on ~8% of the val frames (35% of the test frames): on
    # reference labels a 1-point epsilon lets exits that are always wrong fire on the other
    # ~92% of val for free. Thresholds, delta and the plan therefore read the backbone's own
    # top-1 on val (agreement with `full`); test accuracy is reported on both.
    lite.calibrate_on = "backbone"
    lite.clips.fps = 0.0  # every val and test frame
    lite.clips.train_fps = 0.0
    lite.clips.train_tiles = ((1.0, 0.5, 0.5), (0.75, 0.0, 0.0), (0.75, 1.0, 1.0))
    if arg == "demo":
        lite.every = 4
        lite.skip_first = 2
        lite.clips.fps = 5.0
        lite.clips.train_fps = 5.0
        lite.clips.train_tiles = ((1.0, 0.5, 0.5),)
    elif arg == "quick":  # `make demo`: < 10 min on 2 idle cores, cold clip cache included
        f.positions = (7, 11)  # two candidates (28x28x40 and 14x14x80 maps)
        f.max_trials = 3  # two filter-pruning steps, then one layer drop
        f.finetune_steps = 20
        f.timing_rounds = 3
        f.timing_calls = 5
        f.bench_rounds = 2
        lite.distill_steps = 150
        lite.distill_batch_size = 32  # also the search's fine-tuning and BranchyNet's batch
        lite.clips.fps = 5.0
        lite.clips.train_fps = 2.0
        lite.clips.train_tiles = ((1.0, 0.5, 0.5),)
        lite.export.parity_examples = 8
    elif arg == "smoke":  # tests: 64 px, a few frames per clip, two candidates
        config.lite.image_size = 64
        config.calibration.method = "empirical"  # bounds need many more val frames
        f.positions = (8, 14)
        f.branchy_positions = (9, 13)
        f.head_features = 16
        f.max_trials = 2
        f.finetune_steps = 5
        f.timing_rounds = 2
        f.timing_calls = 5
        f.bench_rounds = 2
        lite.distill_steps = 10
        lite.distill_batch_size = 8
        lite.branchy_features = 16
        lite.flips = True
        lite.clips.train = ("carphone",)
        lite.clips.val = ("tree",)
        lite.clips.test = ("bikes",)
        lite.clips.fps = 5.0
        lite.clips.train_fps = 5.0
        lite.clips.train_tiles = ((1.0, 0.5, 0.5),)
        lite.clips.max_frames = 4
        lite.clips.reference = "efficientnet_lite0"
        lite.clips.reference_resolution = 64
        lite.export.parity_examples = 4
        lite.export.epsilons = (0.01,)
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: demo, quick, smoke")
    return config
