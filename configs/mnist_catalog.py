"""MCDNN on MNIST-5k: a catalog of approximated LeNets for three relabeled tasks.

  python -m train.catalog --config=configs/mnist_catalog.py --workdir=runs/catalog
  python -m train.catalog --config=configs/mnist_catalog.py:smoke --workdir=/tmp/catalog
  python -m runtime.ams --bundle=runs/catalog --trace=runs/catalog/trace.json --json=ams.json

Tasks (MCDNN derives gender/age/race from one face set; we derive from
digits): ``digit`` (10 classes), ``parity`` (odd/even), ``ge5`` (< 5 / >= 5).
``digit`` trains the whole LeNet; the other tasks reuse its conv stem
(positions [0, stem)) frozen and train only their upper layers (sharing).

Each variant is a recipe of pure transforms (`flexjax.approx`), fine-tuned
briefly with distillation from the task's original, then exported
(`export.bundle.export_model`) with its precision (fp32 / fp16 / int8) and,
for magnitude pruning, sparse storage.

Energy model (documented in README, constants here): a run costs
``cpu_power_w * measured_latency + dram_j_per_byte * weight_bytes`` (weights
are streamed from DRAM once per inference at batch 1); a load costs
``storage_j_per_byte * file_bytes + cpu_power_w * measured_load_time``. With
``energy.adb_binary`` set and a phone attached, per-run energy is measured on
the phone instead (`runtime.adb`, battery current x voltage).
"""

import ml_collections

from flexjax.config import catalog_defaults, defaults

# Recipes: lists of {"technique": name, **arguments} (flexjax.approx.TECHNIQUES).
_LR = "low_rank"
_VARIANTS = [
    {"name": "original", "recipe": [], "precision": "fp32"},
    {"name": "fp16", "recipe": [], "precision": "fp16"},
    {"name": "int8", "recipe": [], "precision": "int8"},
    {"name": "lowrank_r1_2", "recipe": [{"technique": _LR, "fraction": 0.5}]},
    {"name": "lowrank_r1_4", "recipe": [{"technique": _LR, "fraction": 0.25}]},
    {"name": "lowrank_r1_8", "recipe": [{"technique": _LR, "fraction": 0.125}]},
    {"name": "lowrank_e90", "recipe": [{"technique": _LR, "energy": 0.9}]},
    {"name": "lowrank_fc32", "recipe": [{"technique": _LR, "ranks": {"layer_07": 32}}]},
    {
        "name": "prune_75",
        "recipe": [{"technique": "magnitude_prune", "sparsity": 0.75}],
        "sparsity": True,
    },
    {
        "name": "prune_90",
        "recipe": [{"technique": "magnitude_prune", "sparsity": 0.9}],
        "sparsity": True,
    },
    {"name": "width_1_2", "recipe": [{"technique": "width_multiplier", "multiplier": 0.5}]},
    {"name": "width_1_4", "recipe": [{"technique": "width_multiplier", "multiplier": 0.25}]},
    {"name": "fc_100", "recipe": [{"technique": "shrink_dense", "features": {"layer_07": 100}}]},
    {"name": "drop_conv2", "recipe": [{"technique": "drop_layers", "sites": ["layer_03"]}]},
    {
        "name": "width_1_2_lowrank_fc16",
        "recipe": [
            {"technique": "width_multiplier", "multiplier": 0.5},
            {"technique": _LR, "ranks": {"layer_07": 16}},
        ],
    },
    {
        "name": "width_1_4_int8",
        "recipe": [{"technique": "width_multiplier", "multiplier": 0.25}],
        "precision": "int8",
    },
]
# The relabeled tasks get a smaller catalog (fewer exports on a 2-core machine).
_TASK_VARIANTS = [
    "original",
    "int8",
    "lowrank_r1_4",
    "prune_90",
    "width_1_2",
    "width_1_4",
    "width_1_4_int8",
]


def get_config(arg: str | None = None):
    c = catalog_defaults()
    base = defaults()
    base.model.name = "lenet_branchy"
    base.model.kwargs.exits = ()  # a plain LeNet: MCDNN approximates single-exit models
    base.data.name = "mnist5k"
    base.train.batch_size = 64
    base.train.num_epochs = 20
    base.train.learning_rate = 2e-3
    base.train.augment_shift = 2
    base.train.log_every = 50
    base.train.checkpoint_every = 500
    c.base = base

    c.tasks = ("digit", "parity", "ge5")
    c.stem = 6  # shared positions [0, 6): conv, pool, relu, conv, pool, relu

    c.heads = ml_collections.ConfigDict(
        {"steps": 800, "batch_size": 64, "learning_rate": 1e-3, "augment_shift": 2}
    )
    c.finetune = ml_collections.ConfigDict(
        {
            "steps": 400,
            "batch_size": 64,
            "learning_rate": 5e-4,
            "distill_weight": 0.5,
            "temperature": 4.0,
            "augment_shift": 2,
        }
    )
    c.variants = _VARIANTS
    c.task_variants = _TASK_VARIANTS  # names (from variants) built for the non-digit tasks

    c.bench = ml_collections.ConfigDict(
        {"rounds": 5, "frames": 100, "warmup": 20, "load_repeats": 5, "threads": 1}
    )
    c.energy = ml_collections.ConfigDict(
        {
            "cpu_power_w": 1.5,  # one big phone core busy (a Snapdragon 8xx-class A7x core)
            "dram_j_per_byte": 1.6e-10,  # ~20 pJ/bit LPDDR4
            "storage_j_per_byte": 1.0e-9,  # UFS read incl. controller, ~1 nJ/byte
            "adb_serial": "",
            "adb_binary": "",  # TFLite benchmark_model for the phone; empty = model only
        }
    )
    c.cloud = ml_collections.ConfigDict(
        {
            "enabled": True,
            "frame_bytes": 20000,  # one camera crop, JPEG
            "radio_j_per_byte": 2.0e-7,  # LTE uplink incl. tail, amortized
            "rtt_ms": 80.0,
            "speedup": 4.0,
            "money_per_request": 1.0e-5,  # $ per request
        }
    )
    c.specialize = ml_collections.ConfigDict(
        {
            "window": 200,
            "n": 2,
            "p": 0.9,
            "skew_seed": 0,
            "steps": 300,
            "batch_size": 128,
            "learning_rate": 1e-2,
            "other_fraction": 0.2,
            "stream_frames": 2000,
            "variant": "width_1_4",  # the cheap variant specialized for the cascade
            "time_original": True,  # also time the three ways of specializing the original
        }
    )
    c.ams = ml_collections.ConfigDict(
        {
            "budgets": {"energy": "0.05x", "memory_mb": 2.5, "money": 0.0, "latency_ms": 100.0},
            "trace": {"hours": 10.0, "mean_rate": 1.0, "bursts": 12, "seed": 0},
        }
    )
    if arg == "smoke":
        base.data.limit = 400
        base.train.num_epochs = 2
        base.train.batch_size = 32
        base.train.log_every = 5
        base.train.checkpoint_every = 20
        base.model.kwargs.width = 0.25
        c.tasks = ("digit", "parity")
        c.heads.steps = 20
        c.heads.batch_size = 32
        c.finetune.steps = 10
        c.finetune.batch_size = 32
        keep = ("original", "lowrank_r1_4", "prune_90", "width_1_2")
        c.variants = [v for v in _VARIANTS if v["name"] in keep]
        c.task_variants = ["original", "width_1_2"]
        c.bench.rounds = 2
        c.bench.frames = 10
        c.bench.warmup = 2
        c.bench.load_repeats = 2
        c.specialize.window = 50
        c.specialize.p = 0.5  # the 2-epoch smoke model is too weak for p = 0.9
        c.specialize.steps = 20
        c.specialize.time_original = False
        c.specialize.stream_frames = 200
        c.specialize.variant = "width_1_2"
        c.ams.trace.hours = 1.0
        c.ams.trace.mean_rate = 0.5
    elif arg:
        raise ValueError(f"unknown config argument '{arg}'; valid: smoke")
    return c
