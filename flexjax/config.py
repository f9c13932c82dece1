"""The schema of experiment configs, and its validation.

A config file (``configs/<exp>.py``) defines ``get_config(arg=None)``
returning an ``ml_collections.ConfigDict``. It starts from `defaults()` and
overrides values; a key that is not in the schema is an error with the list
of valid keys, so a typo never silently trains the wrong thing. The only
free-form section is ``model.kwargs`` (forwarded to the model builder, which
rejects unknown arguments itself).
"""

from __future__ import annotations

import fnmatch
import importlib.util
import math
import os
from collections.abc import Callable
from typing import Any

import ml_collections

from flexjax import exits
from runtime.args import MAX_COUNT, MAX_SEED, MAX_THREADS, Domain

FREE_FORM = ("model.kwargs",)


def defaults() -> ml_collections.ConfigDict:
    """Every key a training config may set, with its default."""
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    c.model.name = "lenet_branchy"  # a name from flexjax.models.MODELS
    c.model.kwargs = ml_collections.ConfigDict()  # forwarded to the builder

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist5k"  # mnist5k | digits | cifar10 | image_folder
    c.data.path = ""  # local directory for cifar10 / image_folder
    c.data.seed = 0  # split seed
    c.data.val_fraction = 0.1
    c.data.test_fraction = 0.2
    c.data.image_size = 0  # 0 = keep the dataset's size
    c.data.channels = 0  # 0 = keep; 1 or 3 to convert
    c.data.limit = 0  # 0 = all examples (smoke configs cap it)

    c.train = ml_collections.ConfigDict()
    c.train.mode = "joint"  # joint (BranchyNet weighted loss) | exits_only (frozen backbone)
    c.train.init_from = ""  # exits_only: workdir of a trained backbone
    c.train.batch_size = 64  # global batch, split across local devices
    c.train.num_epochs = 10
    c.train.optimizer = "adam"  # adam | adamw | sgd
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"  # cosine | constant
    c.train.warmup_steps = 0
    c.train.momentum = 0.9  # sgd only
    c.train.weight_decay = 0.0
    c.train.exit_weights = ()  # per exit incl. final; () = BranchyNet 1.0 ... 0.3
    c.train.augment_shift = 0  # random translation by up to N pixels
    c.train.log_every = 50
    # Train steps per jitted call (lax.scan over stacked batches): same result, fewer
    # dispatches; chunks never cross a log / eval / checkpoint step.
    c.train.steps_per_call = 1
    c.train.eval_every = 0  # steps; 0 = once per epoch
    c.train.checkpoint_every = 200
    c.train.max_to_keep = 2
    c.train.eval_batch_size = 256

    c.exits = ml_collections.ConfigDict()
    c.exits.criterion = "entropy"  # entropy | max_softmax
    c.exits.epsilon = 0.01  # allowed accuracy loss vs the final exit (0.01 = 1 point)

    # How exit thresholds meet exits.epsilon (flexjax.exits.METHODS), FlexDNN and BranchyNet
    # alike: every calibration of a job (plan, bundles, reports). "empirical" (the default,
    # what every figure in BENCHMARKS.md so far was made with) meets epsilon on the
    # validation frames only: the test loss exceeded epsilon in 52.5% / 58.5% of 200 random
    # val/test re-splits (FlexDNN / BranchyNet). "ucb" keeps an upper confidence bound
    # (level 1 - delta) of the loss within epsilon and held it in 92.5% / 95% at delta 0.05
    # (BENCHMARKS.md, "Calibration that holds on test"): use it when the bound must hold on
    # new frames (it needs ~1000 validation frames for a 1-point epsilon). Also "margin"
    # (epsilon - margin) | "ltt" (Learn-then-Test: a formal guarantee, far more conservative).
    c.calibration = ml_collections.ConfigDict()
    c.calibration.method = "empirical"
    c.calibration.delta = 0.05  # ucb / ltt: error level, in (0, 1)
    c.calibration.margin = 0.005  # margin: safety margin (fraction; 0.005 = half a point)

    # Also evaluate on video streams (flexjax.data.video): thresholds calibrated on a
    # stream filmed from the val split, measured on one filmed from the test split.
    c.video = ml_collections.ConfigDict()
    c.video.enabled = False
    c.video.num_clips = 50
    c.video.frames_per_clip = 40
    c.video.seed = 0

    return c


def flexdnn_defaults() -> ml_collections.ConfigDict:
    """A FlexDNN config (``python -m train.flexdnn``): a training config plus ``flexdnn``.

    The ``flexdnn`` section (exit architecture search, insertion plan,
    benchmark) lives only in FlexDNN's configs; ranges are checked by
    `flexjax.flexdnn.validate`.
    """
    c = defaults()
    c.flexdnn = ml_collections.ConfigDict()
    c.flexdnn.backbone_workdir = ""  # train.multi_exit workdir; "" = train one in <workdir>
    c.flexdnn.positions = ()  # candidate exit positions; () = every block boundary
    c.flexdnn.head_features = 64  # filters of each over-parameterized exit conv
    c.flexdnn.head_convs = 3  # conv layers per over-parameterized exit
    c.flexdnn.exit_epochs = 3  # training epochs of the candidate exits (frozen backbone)
    c.flexdnn.delta = 0.01  # search: allowed exit accuracy drop (fraction, val split)
    c.flexdnn.prune_fraction = 0.5  # search: filters removed per pruning step
    c.flexdnn.min_filters = 2  # search: never prune a conv below this many filters
    c.flexdnn.finetune_steps = 100  # search: fine-tuning steps after each step
    c.flexdnn.finetune_lr = 1e-3
    c.flexdnn.max_trials = 16  # search: tried architectures per exit
    c.flexdnn.timing_rounds = 5  # latency measurement: interleaved rounds
    c.flexdnn.timing_calls = 50  # latency measurement: calls per signature per round
    c.flexdnn.lossy_widths = (0.5, 0.75)  # input-agnostic lossy baselines (x backbone width)
    c.flexdnn.branchy_positions = ()  # BranchyNet baseline exits; () = the paper's places
    c.flexdnn.bench_rounds = 3  # final benchmark: interleaved rounds over the frames
    c.flexdnn.bench_frames = 0  # final benchmark: frames per data source (0 = all)
    # Issue 13 items 2-3 (pipelines/flexdnn.py): BranchyNet "finetune" = from the same
    # trained backbone, joint weighted fine-tuning with FlexDNN's extra budget (steps x
    # batch); "scratch" = the old joint training from scratch (backbone + exit epochs).
    c.flexdnn.branchy_protocol = "finetune"
    c.flexdnn.joint_variant = True  # also FlexDNN-joint: backbone + kept exits fine-tuned
    c.flexdnn.joint_lr = 1e-4  # Adam rate of both joint fine-tunings
    c.flexdnn.search_examples = 0  # training examples the search fine-tunes on (0 = all)
    return c


def edgent_defaults() -> ml_collections.ConfigDict:
    """Every key an Edgent job config (``python -m train.edgent``) may set, with its default.

    The multi-exit network is not described here: `model_config` names its
    training config (a schema above), so the same network file serves
    ``train.multi_exit`` and Edgent.
    """
    c = ml_collections.ConfigDict()
    # The multi-exit net's training config, PATH[:ARG] as for --config (trained in <workdir>/train).
    c.model_config = "configs/mnist_alexnet_branchy.py"

    c.export = ml_collections.ConfigDict()  # export.bundle with partition signatures
    c.export.precision = "fp32"  # fp32 | fp16 | dynamic
    c.export.parity_examples = 1000  # test examples checked against JAX
    c.export.epsilons = (0.0, 0.005, 0.01, 0.02, 0.05)  # exit-threshold calibration

    c.sweep = ml_collections.ConfigDict()  # export.sweep: single-layer signatures
    c.sweep.size = "full"  # full | smoke
    c.sweep.seed = 0

    # The two machines, as runtime.profile targets: an emulated slow device (S x one core
    # here, in CPU time) and the edge; `runs` timed calls per signature when profiling.
    c.device = ml_collections.ConfigDict()
    c.device.target = "local:threads=1:slowdown=20"
    c.device.runs = 10
    c.edge = ml_collections.ConfigDict()
    c.edge.target = "local:threads=1"
    c.edge.runs = 20

    c.fit = ml_collections.ConfigDict()  # export.latency_fit
    c.fit.form = "auto"  # auto | edgent | interaction

    c.bench = ml_collections.ConfigDict()  # runtime.edgent_bench, against real gRPC servers
    c.bench.servers = 2  # edge servers on 127.0.0.1
    c.bench.data = "mnist5k:test"  # frames: DATASET:SPLIT or npz:PATH
    c.bench.frames = 200  # frames per run of the bandwidth and deadline sweeps
    c.bench.margin = 0.1  # the planner's relative headroom against timing noise
    c.bench.deadline_ms = 10.0  # deadline of the bandwidth sweep and the trace
    c.bench.bandwidths = ()  # Mbps of the bandwidth sweep; () = runtime.edgent_bench's
    c.bench.bandwidth_mbps = 2.0  # bandwidth of the deadline sweep
    c.bench.deadlines = ()  # ms of the deadline sweep; () = runtime.edgent_bench's
    c.bench.policies = ()  # compared in the deadline sweep; () = all (edgent + baselines)
    c.bench.trace_frames = 1000  # frames on the fluctuating bandwidth trace
    c.bench.trace_seconds = 8.0  # trace length: a new bandwidth every trace_step_s
    c.bench.trace_step_s = 0.5
    c.bench.trace_seed = 0
    # Clients learn how much slower than profiled each side computes (runtime.planner.
    # ComputeDrift); False plans with the profile's times (coinfer --static-compute).
    c.bench.adapt = True

    # A pretrained backbone with BranchyNet-style exit heads distilled on the real clips
    # (flexjax.distill_exits on flexjax.feature_cache), instead of training model_config.
    c.distill = ml_collections.ConfigDict()
    c.distill.backbone = ""  # "" = train model_config; else a pretrained name (efficientnet_lite0)
    c.distill.image_size = 224
    c.distill.exit_every = 4  # an exit at every k-th block boundary, counted from the last
    c.distill.exit_skip = 2  # ... after the first blocks (their activations are the largest)
    c.distill.positions = ()  # explicit exit positions; () = exit_every / exit_skip
    c.distill.cut_every = 1  # partition points at every k-th block boundary (+ input, end)
    c.distill.head = "conv_pool_dense"  # flexjax.distill_exits.HEADS
    # (mimic: the backbone's head width and its classifier; head_features is not used)
    c.distill.head_features = 128
    c.distill.steps = 300
    c.distill.batch_size = 64
    c.distill.learning_rate = 3e-3
    c.distill.temperature = 2.0
    c.distill.criterion = "entropy"  # exit criterion (entropy | max_softmax)
    c.distill.epsilon = 0.01  # thresholds: allowed agreement loss on val
    # flexjax.data.ClipConfig fields (its resolution is distill.image_size)
    c.distill.clips = ml_collections.ConfigDict()
    c.distill.clips.train = ("vtest", "bigbuckbunny", "bikes")
    c.distill.clips.val = ("tree", "carphone", "cup")
    c.distill.clips.test = ("box", "megamind")
    c.distill.clips.fps = 5.0
    c.distill.clips.max_frames = 0
    c.distill.clips.reference = "efficientnet_lite2"
    c.distill.clips.reference_resolution = 0
    # Distillation data (the train split only; val / test stay as above): frames per second
    # (-1 = clips.fps, 0 = every frame), ClipConfig tiles as flat (scale, y, x) triples
    # (() = the centre crop),
    # horizontally flipped copies, and clip-balanced sampling (each clip drawn equally often).
    c.distill.train_fps = -1.0
    c.distill.train_tiles = ()
    c.distill.flip = False
    c.distill.balance_clips = False
    # Random crops of opencv-doc's still images (flexjax.data.stills) appended to the train
    # split: many scenes besides the train clips' three (issues 13/14). 0 = none.
    c.distill.stills = 0
    return c


def _int(lo: int, hi: int) -> Domain:
    return Domain("int", lo, hi)


def _real(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Domain:
    return Domain("real", lo, hi, lo_open=lo_open, hi_open=hi_open)


def _each(d: Domain) -> Domain:
    return Domain(d.kind, d.lo, d.hi, d.lo_open, d.hi_open, items=True)


# A learning rate: positive and finite. No upper cap: a rate that diverges is what the
# trainer's NaN guard reports (with the step and the checkpoint kept), not a config typo.
_RATE = Domain("real", 0.0, None, lo_open=True)
_FRACTION = _real(0.0, 1.0, hi_open=True)  # an allowed accuracy loss, a split share
_STEPS = _int(0, MAX_COUNT)
_MS = _real(0.0, 1e6, lo_open=True)  # a deadline / latency (ms), at most ~17 minutes
_MBPS = _real(0.0, 1e5, lo_open=True)
_POSITION = _each(_int(0, 10_000))

# The domain of every numeric config value, declared once: (pattern, domain), matched with
# fnmatch against the flat key ("train.batch_size", "base.train.batch_size" in a catalog);
# the first match wins. `validate` refuses NaN and inf everywhere and a value outside its
# domain; tests check that every numeric key of every schema has one. Caps sit where a
# value sizes an allocation or a loop (batches, frames, threads, image sizes).
DOMAINS: tuple[tuple[str, Domain], ...] = (
    ("*seed", _int(0, MAX_SEED)),
    ("*learning_rate", _RATE),
    ("flexdnn.finetune_lr", _RATE),
    ("*batch_size", _int(1, 65_536)),
    ("*augment_shift", _int(0, 64)),
    ("train.num_epochs", _int(1, 100_000)),
    ("train.warmup_steps", _STEPS),
    ("train.momentum", _real(0.0, 1.0)),
    ("train.weight_decay", _real(0.0, 1.0)),
    ("train.exit_weights", _each(_real(0.0, 1000.0))),
    ("train.log_every", _int(1, MAX_COUNT)),
    ("train.steps_per_call", _int(1, 1000)),
    ("train.eval_every", _STEPS),  # 0 = once per epoch
    ("train.checkpoint_every", _int(1, MAX_COUNT)),
    ("train.max_to_keep", _int(1, 1000)),
    ("data.val_fraction", _FRACTION),
    ("data.test_fraction", _FRACTION),
    ("data.image_size", _int(0, 1024)),  # 0 = keep the dataset's size
    ("data.channels", _int(0, 3)),  # 0 = keep; 1 or 3
    ("data.limit", _int(0, MAX_COUNT)),  # 0 = all
    ("exits.epsilon", _FRACTION),
    ("video.num_clips", _int(1, 10_000)),
    ("video.frames_per_clip", _int(1, 1000)),
    ("flexdnn.positions", _POSITION),
    ("flexdnn.branchy_positions", _POSITION),
    ("flexdnn.head_features", _int(1, 4096)),
    ("flexdnn.head_convs", _int(1, 64)),
    ("flexdnn.exit_epochs", _int(0, 100_000)),
    ("flexdnn.delta", _FRACTION),
    ("flexdnn.prune_fraction", _real(0.0, 1.0, lo_open=True, hi_open=True)),
    ("flexdnn.min_filters", _int(1, 4096)),
    ("flexdnn.finetune_steps", _STEPS),
    ("flexdnn.max_trials", _int(0, 10_000)),
    ("flexdnn.timing_rounds", _int(1, 1000)),
    ("flexdnn.timing_calls", _int(1, 100_000)),
    ("flexdnn.lossy_widths", _each(_real(0.0, 1.0, lo_open=True, hi_open=True))),
    ("flexdnn.bench_rounds", _int(1, 1000)),
    ("flexdnn.bench_frames", _int(0, MAX_COUNT)),  # 0 = all
    ("flexdnn.joint_lr", _RATE),
    ("flexdnn.search_examples", _int(0, MAX_COUNT)),  # 0 = all
    # Edgent.
    ("export.parity_examples", _int(0, MAX_COUNT)),
    ("export.epsilons", _each(_FRACTION)),
    ("device.runs", _int(1, 100_000)),
    ("edge.runs", _int(1, 100_000)),
    ("bench.servers", _int(1, 64)),
    ("bench.frames", _int(1, MAX_COUNT)),
    ("bench.margin", _real(0.0, 10.0)),
    ("bench.deadline_ms", _MS),
    ("bench.deadlines", _each(_MS)),
    ("bench.bandwidth_mbps", _MBPS),
    ("bench.bandwidths", _each(_MBPS)),
    ("bench.trace_frames", _int(1, MAX_COUNT)),
    ("bench.trace_seconds", _real(0.0, 86_400.0, lo_open=True)),
    ("bench.trace_step_s", _real(0.001, 3600.0)),
    ("distill.image_size", _int(32, 1024)),
    ("distill.exit_every", _int(1, 1000)),
    ("distill.exit_skip", _int(0, 1000)),
    ("distill.positions", _POSITION),
    ("distill.cut_every", _int(1, 1000)),
    ("distill.head_features", _int(1, 4096)),
    ("distill.steps", _int(1, MAX_COUNT)),
    ("distill.epsilon", _FRACTION),
    ("distill.temperature", _real(0.0, 1000.0, lo_open=True)),
    ("distill.clips.fps", _real(0.0, 120.0)),
    ("distill.train_fps", _real(-1.0, 120.0)),
    ("distill.train_tiles", _each(_real(0.0, 1.0))),
    ("distill.clips.max_frames", _int(0, 100_000)),
    ("distill.clips.reference_resolution", _int(0, 1024)),
    ("distill.stills", _int(0, 1_000_000)),
    # MCDNN catalog.
    ("stem", _int(0, 10_000)),
    ("heads.steps", _int(1, MAX_COUNT)),
    ("finetune.steps", _STEPS),
    ("finetune.distill_weight", _real(0.0, 1.0)),
    ("finetune.temperature", _real(0.0, 1000.0, lo_open=True)),
    ("bench.rounds", _int(1, 1000)),
    ("bench.warmup", _int(0, 100_000)),
    ("bench.load_repeats", _int(1, 1000)),
    ("bench.threads", _int(1, MAX_THREADS)),
    ("energy.cpu_power_w", _real(0.0, 1e6)),
    ("energy.*_j_per_byte", _real(0.0, 1.0)),
    ("cloud.frame_bytes", _int(0, 1 << 30)),
    ("cloud.radio_j_per_byte", _real(0.0, 1.0)),
    ("cloud.rtt_ms", _real(0.0, 1e6)),
    ("cloud.speedup", _real(0.0, 1e6, lo_open=True)),
    ("cloud.money_per_request", _real(0.0, 1e6)),
    ("specialize.window", _int(1, MAX_COUNT)),
    ("specialize.n", _int(1, 9)),
    ("specialize.p", _real(0.0, 1.0, lo_open=True)),
    ("specialize.steps", _STEPS),
    ("specialize.other_fraction", _real(0.0, 1.0)),
    ("specialize.stream_frames", _int(1, MAX_COUNT)),
    ("ams.budgets.memory_mb", _real(0.0, 1e6)),
    ("ams.budgets.money", _real(0.0, 1e12)),
    ("ams.budgets.latency_ms", _MS),
    ("ams.trace.hours", _real(0.0, 24.0 * 7, lo_open=True)),
    ("ams.trace.mean_rate", _real(0.0, 1000.0, lo_open=True)),
    ("ams.trace.bursts", _int(0, 10_000)),
    # Pretrained EfficientNet-Lite catalog (train.lite_catalog).
    ("resolutions", _each(_int(32, 1024))),
    ("original.resolution", _int(32, 1024)),
    ("clips.fps", _real(0.0, 120.0)),  # 0 = every frame (flexjax.data.clips.MAX_FPS)
    ("clips.max_frames", _int(0, 100_000)),  # 0 = all (flexjax.data.clips.MAX_FRAMES)
    ("clips.decode_resolutions", _each(_int(32, 1024))),
    ("clips.reference_resolution", _int(0, 1024)),  # 0 = the reference's native size
    ("clips.test_frames", _int(0, MAX_COUNT)),  # 0 = all
    ("calibration_frames", _int(1, 100_000)),
    # MCDNN on the lite catalog (train.lite_mcdnn).
    ("resolution", _int(32, 1024)),
    ("heads.distill_weight", _real(0.0, 1.0)),
    ("specialize.fps", _real(0.0, 120.0)),
    ("specialize.max_frames", _int(0, 100_000)),
    ("specialize.resolution", _int(32, 1024)),
    ("specialize.calibration_frames", _int(1, 100_000)),
    ("specialize.min_other", _int(0, 100_000)),  # lite MCDNN: the clip's own negatives
    ("specialize.max_wait", _int(0, 100_000)),
    ("specialize.check_every", _int(0, 100_000)),  # 0: no spot checks
    ("specialize.check_window", _int(1, 1000)),
    ("specialize.check_fail", _int(1, 1000)),
    ("ams.seeds", _each(_int(0, MAX_SEED))),
    ("ams.memory_mb", _real(0.0, 1e6)),
    ("ams.latency_ms", _MS),
    ("finetune.batch_size", _int(1, 4096)),
    ("finetune.learning_rate", _RATE),
    ("finetune.resolution", _int(0, 1024)),  # 0 = each variant's own; else >= 32
    ("finetune.val_frames", _int(0, 100_000)),  # 0 = all
    ("finetune.clip_norm", _real(0.0, 1e6)),  # 0 = no clipping
    ("finetune.train_frames", _int(1, 100_000)),
    # Exit threshold calibration.
    ("calibration.delta", _real(0.0, 1.0, lo_open=True, hi_open=True)),
    ("calibration.margin", _FRACTION),
)


def domain_of(key: str) -> Domain | None:
    """The declared domain of a flat config key (`DOMAINS`), or None for a non-numeric key."""
    bare = key.removeprefix("base.")  # a catalog's training config
    for pattern, domain in DOMAINS:
        if fnmatch.fnmatchcase(bare, pattern):
            return domain
    return None


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_value(key: str, value: Any) -> None:
    """Raises ValueError (one line) if a config value is NaN / inf or outside its domain."""
    domain = domain_of(key)
    items = list(value) if isinstance(value, (tuple, list)) else [value]
    if domain is not None and domain.items != isinstance(value, (tuple, list)):
        raise ValueError(f"config key '{key}' must be {domain.describe()}, got {value!r}")
    for x in items:
        if not _is_number(x):
            if domain is not None:
                raise ValueError(f"config key '{key}' must be {domain.describe()}, got {value!r}")
            continue
        if not math.isfinite(x):
            raise ValueError(f"config key '{key}' must be a finite number, got {value!r}")
        ok = domain is None or (
            domain.contains(float(x) if abs(x) < 1e300 else math.copysign(1e300, x))
            and (domain.kind == "real" or isinstance(x, int))
        )
        if not ok:
            raise ValueError(f"config key '{key}' must be {domain.describe()}, got {value!r}")


def load(ref: str) -> ml_collections.ConfigDict:
    """The config ``--config=PATH[:ARG]`` names: ``get_config(ARG)`` of PATH, not validated.

    A relative PATH is looked up in the working directory, then in the
    repository root (where ``configs/`` lives).

    Raises:
      FileNotFoundError: no such file. ValueError: the file has no ``get_config``
        (or rejects ARG).
    """
    path, _, arg = ref.partition(":")
    if not os.path.isabs(path) and not os.path.isfile(path):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        path = os.path.join(root, path) if os.path.isfile(os.path.join(root, path)) else path
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(
        f"_config_{os.path.basename(path)[:-3]}", os.path.abspath(path)
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"config file {path} has no get_config(arg=None)")
    return module.get_config(arg) if arg else module.get_config()


def catalog_defaults() -> ml_collections.ConfigDict:
    """An MCDNN catalog config (``python -m train.catalog``): every key, with its default.

    ``base`` is the training config of the task models; ``variants`` lists
    ``{"name", "recipe", "precision", "sparsity"}`` entries (recipes are
    `flexjax.approx` techniques) and ``task_variants`` the names built for
    the non-digit tasks. Semantic checks are `pipelines.mcdnn.validate`'s.
    """
    c = ml_collections.ConfigDict()
    c.base = defaults()
    c.tasks = ("digit",)  # names from flexjax.specialize.TASKS, "digit" first
    c.stem = 6  # shared backbone positions [0, stem)
    c.heads = ml_collections.ConfigDict(
        {"steps": 800, "batch_size": 64, "learning_rate": 1e-3, "augment_shift": 2}
    )
    c.finetune = ml_collections.ConfigDict(
        {"steps": 400, "batch_size": 64, "learning_rate": 5e-4, "distill_weight": 0.5,
         "temperature": 4.0, "augment_shift": 2}
    )  # fmt: skip
    c.variants = [{"name": "original", "recipe": [], "precision": "fp32"}]
    c.task_variants = ["original"]
    c.bench = ml_collections.ConfigDict(
        {"rounds": 5, "frames": 100, "warmup": 20, "load_repeats": 5, "threads": 1}
    )
    c.energy = ml_collections.ConfigDict(
        {"cpu_power_w": 1.5, "dram_j_per_byte": 1.6e-10, "storage_j_per_byte": 1.0e-9,
         "adb_serial": "", "adb_binary": ""}
    )  # fmt: skip
    c.cloud = ml_collections.ConfigDict(
        {"enabled": True, "frame_bytes": 20000, "radio_j_per_byte": 2.0e-7, "rtt_ms": 80.0,
         "speedup": 4.0, "money_per_request": 1.0e-5}
    )  # fmt: skip
    c.specialize = ml_collections.ConfigDict(
        {"window": 200, "n": 2, "p": 0.9, "skew_seed": 0, "steps": 300, "batch_size": 128,
         "learning_rate": 1e-2, "other_fraction": 0.2, "stream_frames": 2000,
         "variant": "original", "time_original": True}
    )  # fmt: skip
    c.ams = ml_collections.ConfigDict(
        {"budgets": {"energy": "0.05x", "memory_mb": 2.5, "money": 0.0, "latency_ms": 100.0},
         "trace": {"hours": 10.0, "mean_rate": 1.0, "bursts": 12, "seed": 0}}
    )  # fmt: skip
    return c


def lite_mcdnn_defaults() -> ml_collections.ConfigDict:
    """MCDNN on the EfficientNet-Lite catalog (``python -m train.lite_mcdnn``): every key.

    Semantic checks (task groups, class ids, budgets) are `pipelines.lite_mcdnn.validate`'s.
    """
    c = ml_collections.ConfigDict()
    c.catalog_config = "configs/clips_lite_catalog.py"  # PATH[:ARG] of the lite catalog
    c.catalog_dir = ""  # "" = <workdir>/catalog, built (or resumed) from catalog_config
    c.tasks = []  # [{"name": ..., "groups": {group: [ids or "lo-hi"], ...}}, ...]
    c.clips = ml_collections.ConfigDict(
        {"train": "vtest,bigbuckbunny,bikes", "val": "tree,carphone,cup", "test": "box,megamind",
         "fps": 5.0, "max_frames": 0, "reference": "efficientnet_lite2",
         "reference_resolution": 0}
    )  # fmt: skip
    c.heads = ml_collections.ConfigDict(
        {"steps": 300, "learning_rate": 1e-2, "distill_weight": 0.5, "seed": 0}
    )
    c.bench = ml_collections.ConfigDict({"rounds": 3, "frames": 20, "warmup": 3, "threads": 1})
    c.specialize = ml_collections.ConfigDict(
        {"clip": "megamind", "fps": 0.0, "max_frames": 0, "window": 60, "n": 2, "p": 0.8,
         "resolution": 160, "weights": "int8", "calibration_frames": 32, "steps": 300,
         "batch_size": 64, "learning_rate": 1e-2, "other_fraction": 0.3, "seed": 0,
         "min_other": 0, "max_wait": 0, "check_every": 0, "check_window": 3, "check_fail": 2}
    )  # fmt: skip
    c.ams = ml_collections.ConfigDict(
        {"energy": ("0.3x",), "memory_mb": 64.0, "latency_ms": 1000.0, "exclude": "",
         "seeds": (0, 1, 2, 3, 4),
         "trace": {"hours": 10.0, "mean_rate": 1.0, "bursts": 12}}
    )  # fmt: skip
    return c


def schema_of(config: Any) -> Callable[[], ml_collections.ConfigDict]:
    """The schema a config follows.

    Catalog (has ``base``), lite catalog (``recipes`` and ``resolutions``), Edgent
    (``model_config``), FlexDNN (``flexdnn``) or training.
    """
    if "base" in config:
        return catalog_defaults
    if "catalog_config" in config:
        return lite_mcdnn_defaults
    if "recipes" in config and "resolutions" in config:
        return lite_catalog_defaults
    if "model_config" in config:
        return edgent_defaults
    if "flexdnn" in config and "lite" in config:
        return flexdnn_lite_defaults
    return flexdnn_defaults if "flexdnn" in config else defaults


def smoke_on_digits(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Shrinks a CIFAR-size config for tests: 256 digits at 32x32x3, one tiny epoch.

    The `smoke` variants of configs whose real data is not bundled use this,
    so tests exercise the same model and training code on data that ships.
    """
    config.data.name = "digits"
    config.data.path = ""
    config.data.image_size = 32
    config.data.channels = 3
    smoke_on_slice(config, limit=256)
    config.train.log_every = 2
    return config


def smoke_on_slice(
    config: ml_collections.ConfigDict, limit: int = 600
) -> ml_collections.ConfigDict:
    """Shrinks a config for tests: a `limit`-example slice of its own data, one tiny epoch."""
    config.data.limit = limit
    if "calibration" in config:  # a 1-point bound needs ~1000 val frames, not 60
        config.calibration.method = "empirical"
    config.train.batch_size = 32
    config.train.num_epochs = 1
    config.train.warmup_steps = 0
    config.train.log_every = 5
    config.train.eval_batch_size = 64
    return config


def _free_form(key: str) -> bool:
    """Whether `key` is a free-form section (``model.kwargs``, also inside ``base``)."""
    return any(key == f or key.endswith("." + f) for f in FREE_FORM)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    items = d.items() if hasattr(d, "items") else []
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, (ml_collections.ConfigDict, dict)) and not _free_form(key):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def check_key(key: str, schema_fn: Callable[[], ml_collections.ConfigDict] = defaults) -> None:
    """Raises ValueError (listing the valid keys of its section) if `key` is not in the schema."""
    schema = _flat(schema_fn())
    if key in schema or any(f".{f}." in f".{key}" for f in FREE_FORM):
        return
    section = key.rsplit(".", 1)[0] if "." in key else ""
    valid = sorted(k for k in schema if "." in k and k.rsplit(".", 1)[0] == section)
    if not valid:  # a top-level key or an unknown section: list the top level
        valid = sorted({k.split(".", 1)[0] for k in schema})
    raise ValueError(f"unknown config key '{key}'; valid keys here: {', '.join(valid)}")


def validate(
    config: ml_collections.ConfigDict,
    schema_fn: Callable[[], ml_collections.ConfigDict] | None = None,
) -> ml_collections.ConfigDict:
    """Checks keys against the schema; returns a full config (defaults filled in).

    `schema_fn` defaults to `schema_of(config)` (FlexDNN's or training's).

    Raises:
      ValueError: an unknown key (naming the valid keys of its section), a
        value of the wrong type, NaN / inf, or a number outside its `DOMAINS` entry.
    """
    schema_fn = schema_fn or schema_of(config)
    schema = _flat(schema_fn())
    given = _flat(config)
    for key, value in given.items():
        check_key(key, schema_fn)
        default = schema[key]
        if (
            isinstance(default, bool) != isinstance(value, bool)
            or (isinstance(default, (int, float)) and not isinstance(value, (int, float)))
            or (isinstance(default, str) and not isinstance(value, str))
        ):
            raise ValueError(
                f"config key '{key}' must be a {type(default).__name__}, got {value!r}"
            )
        if not _free_form(key):
            check_value(key, value)
    full = schema_fn()
    full.update(config)  # nested update keeps defaults for keys the config omits
    if "calibration" in full:
        check_calibration(full.calibration)
    return full


def lite_catalog_defaults() -> ml_collections.ConfigDict:
    """A pretrained EfficientNet-Lite catalog (``python -m train.lite_catalog``): every key.

    Variants are ``models x resolutions x weights`` plus ``originals`` (fp32 at
    their native size) and ``original`` (the baseline every ratio is against).
    ``weights`` entries are the TFLite converter's modes (`export.convert.PRECISIONS`)
    or the names of ``recipes`` (lists of `export.quantize` rules applied by
    litert-quantizer). Semantic checks are `pipelines.lite_catalog.validate`'s.
    """
    c = ml_collections.ConfigDict()
    c.models = ("efficientnet_lite0",)
    c.resolutions = (224,)
    c.weights = ("fp32",)
    c.originals = []  # more models, fp32 at their native resolution
    c.extras = []  # more single variants: [{"model", "resolution", "weights"}, ...]
    c.original = ml_collections.ConfigDict(
        {"model": "efficientnet_lite0", "resolution": 224, "weights": "fp32"}
    )
    c.recipes = []  # [{"name": ..., "rules": [{"op", "bits", "granularity", "mode"}, ...]}]
    c.clips = ml_collections.ConfigDict(
        {"train": "vtest,bigbuckbunny,bikes", "val": "tree,carphone,cup", "test": "box,megamind",
         "fps": 5.0,
         "max_frames": 0, "decode_resolutions": (224,), "reference": "efficientnet_lite2",
         "reference_resolution": 0, "test_frames": 0}
    )  # fmt: skip
    c.calibration_frames = 64  # int8: training-clip frames that calibrate activation ranges
    # Approximations (flexjax.approx steps), used by ``extras`` entries with an "approx" key:
    # [{"name": ..., "steps": [{"technique": "low_rank_1x1", "energy": 0.9}, ...]}]
    c.approximations = []
    # Distillation of every approximated variant from the original (soft targets) on
    # training-clip frames; steps = 0: none. resolution 0: each variant's own (one
    # distillation per approximation and resolution). The distilled weights are kept only
    # if their top-1 agrees more with the original's on the val clips than the untuned ones.
    c.finetune = ml_collections.ConfigDict(
        {"steps": 0, "batch_size": 8, "learning_rate": 1e-4, "temperature": 2.0,
         "resolution": 0, "train_frames": 256, "seed": 0, "optimizer": "sgd",
         "clip_norm": 1.0, "val_frames": 0}
    )  # fmt: skip
    c.bench = ml_collections.ConfigDict(
        {"rounds": 3, "frames": 20, "warmup": 3, "load_repeats": 3, "threads": 1}
    )
    c.energy = ml_collections.ConfigDict(
        {"cpu_power_w": 1.5, "dram_j_per_byte": 1.6e-10, "storage_j_per_byte": 1.0e-9}
    )
    return c


def check_calibration(section: Any) -> None:
    """Raises ValueError (one line) for an unknown ``calibration.method``."""
    if section.method not in exits.METHODS:
        raise ValueError(
            f"unknown calibration.method {section.method!r}; valid: {', '.join(exits.METHODS)}"
        )


def calibration_options(config: Any) -> dict:
    """``{"method", "delta", "margin"}`` for `flexjax.exits.calibrate` from a job's config.

    A config saved before the ``calibration`` section existed (a workdir's
    ``config.json``) gets `defaults`' values, as every missing key does.

    Raises:
      ValueError: an unknown method, delta or margin out of range.
    """
    section = dict(defaults().calibration)
    given = config.get("calibration") if hasattr(config, "get") else None
    section.update(dict(given or {}))
    exits.check_options(section["method"], 0.0, section["delta"], section["margin"])
    return {
        "method": section["method"],
        "delta": float(section["delta"]),
        "margin": float(section["margin"]),
    }


# --- FlexDNN on a frozen pretrained backbone over the real clips (issue 13, item 1) ---------


def flexdnn_lite_defaults() -> ml_collections.ConfigDict:
    """``python -m train.flexdnn`` on a pretrained EfficientNet-Lite (`pipelines.flexdnn_lite`).

    FlexDNN's schema (``flexdnn``, ``exits``, ``calibration``) plus ``lite``:
    the backbone, the clips, the distillation of the candidate exits and the
    export. ``flexdnn.positions`` () = every ``lite.every``-th MBConv block
    boundary; ``flexdnn.head_convs`` / ``head_features`` size the
    over-parameterized exits; ``flexdnn.branchy_positions`` () = the blocks at
    about 1/3 and 2/3 of the depth.
    """
    c = flexdnn_defaults()
    c.lite = ml_collections.ConfigDict()
    c.lite.backbone = "efficientnet_lite0"  # a pretrained model (flexjax.models.pretrained)
    c.lite.image_size = 224
    c.lite.every = 2  # candidates: every k-th block boundary, counted from the last
    c.lite.skip_first = 3  # ... after the first few blocks (their maps are large)
    c.lite.head = "separable"  # separable (depthwise 3x3 + pointwise 1x1) | conv (3x3)
    c.lite.distill_steps = 400  # candidate exits: steps of KL distillation (cached features)
    c.lite.distill_batch_size = 64
    c.lite.distill_learning_rate = 3e-3
    c.lite.temperature = 2.0  # distillation temperature (training and search fine-tuning)
    c.lite.distill_weight = 0.7  # search fine-tuning: KL weight (rest: CE on the backbone's top-1)
    c.lite.branchy_features = 128  # BranchyNet heads: conv 1x1 (features) -> pool -> dense
    c.lite.flips = True  # train frames also mirrored (features of both cached)
    c.lite.feature_batch = 32
    # Random crops of opencv-doc's still images (flexjax.data.stills) appended to the train
    # frames (after the mirrored copies) for the exits' distillation; 0 = none.
    c.lite.stills = 0
    # Labels of the val clips for the search's delta, the thresholds and the R plan:
    # "reference" (the reference model's top-1) or "backbone" (the backbone's own top-1).
    c.lite.calibrate_on = "reference"
    c.lite.clips = ml_collections.ConfigDict()
    c.lite.clips.train = ("vtest", "bigbuckbunny", "bikes")
    c.lite.clips.val = ("tree", "carphone", "cup")
    c.lite.clips.test = ("box", "megamind")
    c.lite.clips.fps = 5.0  # val and test; 0 = every frame
    c.lite.clips.train_fps = 5.0
    c.lite.clips.train_tiles = ((1.0, 0.5, 0.5),)  # (scale, y, x) crops of each train frame
    c.lite.clips.max_frames = 0
    c.lite.clips.reference = "efficientnet_lite2"
    c.lite.clips.reference_resolution = 0
    c.lite.export = ml_collections.ConfigDict()
    c.lite.export.parity_examples = 32
    c.lite.export.epsilons = (0.005, 0.01, 0.02, 0.05)
    return c


DOMAINS = DOMAINS + (
    ("lite.image_size", _int(32, 1024)),
    ("lite.every", _int(1, 1000)),
    ("lite.skip_first", _int(0, 1000)),
    ("lite.distill_steps", _int(1, MAX_COUNT)),
    ("lite.temperature", _real(0.0, 1000.0, lo_open=True)),
    ("lite.distill_weight", _real(0.0, 1.0)),
    ("lite.branchy_features", _int(1, 4096)),
    ("lite.feature_batch", _int(1, 4096)),
    ("lite.stills", _int(0, 1_000_000)),
    ("lite.clips.fps", _real(0.0, 120.0)),
    ("lite.clips.train_fps", _real(0.0, 120.0)),
    ("lite.clips.max_frames", _int(0, 100_000)),
    ("lite.clips.reference_resolution", _int(0, 1024)),
    ("lite.export.parity_examples", _int(1, MAX_COUNT)),
    ("lite.export.epsilons", _each(_FRACTION)),
)
