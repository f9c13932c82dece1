"""Multi-exit training: BranchyNet joint loss, exits-only training (report: `flexjax.evaluation`).

`train_and_evaluate(config, workdir)` is what ``python -m train.multi_exit``
runs. The workdir is the unit of resumption: re-running the same command
restores the latest orbax checkpoint (net spec + variables + optimizer state)
and continues at the next step with the same data order, so a killed run loses
at most the steps since its last checkpoint.

Training is data-parallel over all local devices: parameters are replicated
and each global batch is sharded along a ``data`` mesh axis with
`jax.sharding.NamedSharding`; XLA inserts the gradient all-reduce.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from flexjax import checkpoint, costs, exits
from flexjax import config as config_lib
from flexjax import data as data_lib
from flexjax.evaluation import (
    accuracies,
    evaluate_and_report,
    plot_tradeoff,
    predict,
)
from flexjax.io import (
    jsonable,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from flexjax.models import build, get_model, init
from flexjax.spec import Net

MODES = ("joint", "exits_only")
OPTIMIZERS = ("adam", "adamw", "sgd")


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    def variables(self) -> dict:
        v = {"params": self.params}
        if self.batch_stats:
            v["batch_stats"] = self.batch_stats
        return v

    def to_tree(self) -> dict:
        return {
            "step": self.step,
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
        }


# ---------------------------------------------------------------------------
# Pieces (pure; tested on their own).
# ---------------------------------------------------------------------------


def exit_weights(net: Net, weights: Sequence[float] = (), mode: str = "joint") -> np.ndarray:
    """Loss weight per exit (execution order, final last).

    The default is BranchyNet's: linearly from 1.0 at the first exit to 0.3
    at the final one (favouring early exits). In ``exits_only`` mode the final
    exit has weight 0 (the backbone is frozen).
    """
    n = len(net.exit_names)
    if weights:
        if len(weights) != n:
            raise ValueError(
                f"train.exit_weights has {len(weights)} values but the net has "
                f"{n} exits {list(net.exit_names)}"
            )
        w = np.asarray(weights, np.float32)
    else:
        w = np.linspace(1.0, 0.3, n).astype(np.float32) if n > 1 else np.ones(1, np.float32)
    if mode == "exits_only":
        w[-1] = 0.0
    if np.any(w < 0) or not np.any(w > 0):
        raise ValueError(f"exit weights must be >= 0 with at least one > 0, got {w.tolist()}")
    return w


def make_optimizer(
    tcfg: ml_collections.ConfigDict, total_steps: int, trainable: Any | None = None
) -> optax.GradientTransformation:
    """The optax optimizer; parameters where `trainable` is False get zero updates."""
    if tcfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer '{tcfg.optimizer}'; valid: {', '.join(OPTIMIZERS)}")
    lr = tcfg.learning_rate
    if tcfg.schedule == "cosine" and tcfg.warmup_steps > 0:
        sched = optax.warmup_cosine_decay_schedule(
            0.0, lr, tcfg.warmup_steps, max(total_steps, tcfg.warmup_steps + 1)
        )
    elif tcfg.schedule == "cosine":
        sched = optax.cosine_decay_schedule(lr, max(total_steps, 1))
    elif tcfg.schedule == "constant":
        sched = optax.linear_schedule(0.0, lr, tcfg.warmup_steps) if tcfg.warmup_steps else lr
    else:
        raise ValueError(f"unknown schedule '{tcfg.schedule}'; valid: cosine, constant")
    if tcfg.optimizer == "adam":
        tx = optax.adam(sched)
    elif tcfg.optimizer == "adamw":
        tx = optax.adamw(sched, weight_decay=tcfg.weight_decay)
    else:
        tx = optax.sgd(sched, momentum=tcfg.momentum, nesterov=True)
    if tcfg.weight_decay and tcfg.optimizer != "adamw":
        tx = optax.chain(optax.add_decayed_weights(tcfg.weight_decay), tx)
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx


def exits_only_mask(params: Mapping[str, Any], net: Net) -> dict:
    """True for the parameters of exit heads, False for the backbone."""
    heads = {e.name for e in net.exits}
    return {k: jax.tree.map(lambda _, t=k in heads: t, v) for k, v in params.items()}


def random_shift(x: jax.Array, rng: jax.Array, shift: int) -> jax.Array:
    """Translates each image by up to `shift` pixels (zero fill)."""
    n, h, w, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
    oy, ox = jax.random.randint(rng, (2, n), 0, 2 * shift + 1)
    # A gather rather than vmap(dynamic_slice): it partitions cleanly along the batch.
    rows = (oy[:, None] + jnp.arange(h))[:, :, None]
    cols = (ox[:, None] + jnp.arange(w))[:, None, :]
    return padded[jnp.arange(n)[:, None, None], rows, cols]


def make_train_step(
    net: Net,
    tx: optax.GradientTransformation,
    weights: np.ndarray,
    *,
    freeze_backbone: bool = False,
    augment_shift: int = 0,
):
    """Returns ``step(state, x, y, rng) -> (state, metrics)`` (not jitted)."""
    model = build(net)
    names = net.exit_names
    w = jnp.asarray(weights)

    def loss_fn(params, batch_stats, x, y, rng):
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        out, updates = model.apply(
            variables,
            x,
            train=True,
            freeze_backbone=freeze_backbone,
            rngs={"dropout": rng},
            mutable=["batch_stats"],
        )
        per_exit = jnp.stack(
            [
                optax.softmax_cross_entropy_with_integer_labels(
                    out[n].astype(jnp.float32), y
                ).mean()
                for n in names
            ]
        )
        acc = jnp.stack([(out[n].argmax(-1) == y).mean() for n in names])
        return jnp.sum(w * per_exit), (updates.get("batch_stats", {}), per_exit, acc)

    def step(state: TrainState, x, y, rng):
        rng_aug, rng_drop = jax.random.split(jax.random.fold_in(rng, state.step))
        if augment_shift:
            x = random_shift(x, rng_aug, augment_shift)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (new_bs, per_exit, acc)), grads = grad_fn(
            state.params, state.batch_stats, x, y, rng_drop
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if freeze_backbone:
            new_bs = state.batch_stats  # frozen backbone statistics stay as trained
        metrics = {
            "loss": loss,
            "exit_loss": per_exit,
            "exit_accuracy": acc,
            "grad_norm": optax.global_norm(grads),
        }
        return state.replace(
            step=state.step + 1, params=params, batch_stats=new_bs, opt_state=opt_state
        ), metrics

    return step


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class _Setup:
    config: ml_collections.ConfigDict
    net: Net
    splits: data_lib.Splits
    init_variables: dict | None  # backbone weights for exits_only


def _data_kwargs(dcfg: ml_collections.ConfigDict) -> dict:
    return dict(
        path=dcfg.path,
        seed=dcfg.seed,
        val_fraction=dcfg.val_fraction,
        test_fraction=dcfg.test_fraction,
        image_size=dcfg.image_size or None,
        channels=dcfg.channels or None,
        limit=dcfg.limit or None,
    )


def load_data(config: ml_collections.ConfigDict) -> data_lib.Splits:
    return data_lib.load(config.data.name, **_data_kwargs(config.data))


def make_net(config: ml_collections.ConfigDict, splits: data_lib.Splits) -> Net:
    kwargs = dict(
        config.model.kwargs.to_dict()
        if hasattr(config.model.kwargs, "to_dict")
        else config.model.kwargs
    )
    kwargs.setdefault("input_shape", tuple(splits.input_shape))
    kwargs.setdefault("num_classes", splits.num_classes)
    net = get_model(config.model.name, **kwargs)
    if tuple(net.input_shape) != tuple(splits.input_shape):
        raise ValueError(
            f"model input {net.input_shape} does not match the data "
            f"{tuple(splits.input_shape)}; set data.image_size/data.channels or "
            "model.kwargs.input_shape"
        )
    return net


def check_same_backbone(net: Net, other: Net, where: str) -> None:
    """Raises CheckpointMismatchError naming `where` unless `other` has `net`'s backbone."""
    if (
        other.layers != net.layers
        or other.input_shape != net.input_shape
        or other.num_classes != net.num_classes
    ):
        raise checkpoint.CheckpointMismatchError(
            f"{where} holds a different backbone ('{other.name}', {len(other.layers)} layers) "
            f"than the config's net ('{net.name}', {len(net.layers)} layers)"
        )


def prepare(config: ml_collections.ConfigDict, workdir: str | None = None) -> _Setup:
    """Validates everything that can be wrong before anything is written."""
    config = config_lib.validate(config)
    t = config.train
    if t.mode not in MODES:
        raise ValueError(f"unknown train.mode '{t.mode}'; valid: {', '.join(MODES)}")
    if t.batch_size < 1 or t.num_epochs < 0:
        raise ValueError("train.batch_size must be >= 1 and train.num_epochs >= 0")
    n_dev = jax.local_device_count()
    if t.batch_size % n_dev:
        raise ValueError(
            f"train.batch_size={t.batch_size} must be divisible by the {n_dev} local devices"
        )
    if t.eval_batch_size % n_dev:
        raise ValueError(
            f"train.eval_batch_size={t.eval_batch_size} must be divisible by the "
            f"{n_dev} local devices"
        )
    if config.exits.criterion not in exits.CRITERIA:
        raise ValueError(
            f"unknown exits.criterion '{config.exits.criterion}'; valid: "
            f"{', '.join(exits.CRITERIA)}"
        )
    if not 0.0 <= config.exits.epsilon < 1.0:
        raise ValueError(f"exits.epsilon must be a fraction in [0, 1), got {config.exits.epsilon}")
    splits = load_data(config)
    net = make_net(config, splits)
    if len(splits.train) < t.batch_size:
        raise ValueError(
            f"train.batch_size={t.batch_size} exceeds the {len(splits.train)} training examples"
        )
    exit_weights(net, tuple(t.exit_weights), t.mode)
    ckpt_dir = os.path.join(workdir, "checkpoints") if workdir else ""
    saved = checkpoint.saved_net(ckpt_dir) if ckpt_dir else None
    if saved is not None:
        if saved != net:
            raise checkpoint.CheckpointMismatchError(
                f"the checkpoint in {ckpt_dir} was saved for a different net ('{saved.name}', "
                f"{len(saved.layers)} layers, exits {list(saved.exit_names)}) than this config "
                f"builds ('{net.name}', {len(net.layers)} layers, exits {list(net.exit_names)}); "
                "use a new --workdir"
            )
    init_variables = None
    if t.mode == "exits_only":
        if not t.init_from:
            raise ValueError(
                "train.mode='exits_only' needs train.init_from=<workdir of a trained backbone>"
            )
        other, init_variables = checkpoint.load(t.init_from)
        check_same_backbone(net, other, f"train.init_from={t.init_from}")
    return _Setup(config, net, splits, init_variables)


def data_parallel_mesh() -> tuple[NamedSharding, NamedSharding]:
    """(batch sharding, replicated sharding) over all local devices."""
    # Auto axes: GSPMD propagates the batch sharding and inserts the all-reduce.
    mesh = jax.make_mesh(
        (jax.local_device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,)
    )
    return NamedSharding(mesh, P("data")), NamedSharding(mesh, P())


def jit_train_step(
    net: Net, tx, weights, t, data_sharding, replicated, *, freeze=False, steps_per_call=1
):
    """The jitted, data-parallel train step; the state argument is donated.

    With ``steps_per_call=1``: ``step(state, x [B, ...], y [B], rng)``. With
    ``steps_per_call=K > 1``: ``steps(state, xs [K, B, ...], ys [K, B], rng)``
    runs K consecutive steps in one call (`jax.lax.scan`) and returns every
    step's metrics stacked along a leading axis. Both give the same states:
    the step's randomness is ``fold_in(rng, state.step)`` either way.
    """
    step = make_train_step(net, tx, weights, freeze_backbone=freeze, augment_shift=t.augment_shift)
    if steps_per_call <= 1:
        return jax.jit(
            step,
            in_shardings=(replicated, data_sharding, data_sharding, replicated),
            out_shardings=(replicated, replicated),
            donate_argnums=0,
        )

    def steps(state, xs, ys, rng):
        return jax.lax.scan(lambda s, xy: step(s, xy[0], xy[1], rng), state, (xs, ys))

    stacked = stacked_sharding(data_sharding)
    return jax.jit(
        steps,
        in_shardings=(replicated, stacked, stacked, replicated),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )


def stacked_sharding(data_sharding: NamedSharding) -> NamedSharding:
    """The sharding of K stacked batches ``[K, B, ...]``: the batch axis split as before."""
    return NamedSharding(data_sharding.mesh, P(None, *data_sharding.spec))


def train_compiler_options() -> dict[str, Any]:
    """XLA options for the train step on this backend (see docs/training_profile.md)."""
    return {}


@dataclasses.dataclass(frozen=True)
class StepFns:
    """A train step compiled twice: one step per call and `k` steps per call (scan).

    `run_steps` covers any number of steps with at most two executables, so
    chunk sizes never recompile.
    """

    one: Any  # (state, x, y, rng) -> (state, metrics)
    many: Any | None  # (state, xs, ys, rng) -> (state, stacked metrics); None when k == 1
    k: int
    sharding: NamedSharding
    compile_seconds: float


def compile_step_fns(
    net: Net,
    tx,
    weights,
    t,
    state: TrainState,
    data_sharding: NamedSharding,
    replicated: NamedSharding,
    *,
    freeze: bool = False,
    steps_per_call: int = 1,
    compiler_options: Mapping[str, Any] | None = None,
) -> StepFns:
    """Compiles (ahead of time) the 1-step and the `steps_per_call`-step train functions.

    `compiler_options` are XLA debug options for these two executables only
    (default: `train_compiler_options()`).
    """
    opts = dict(train_compiler_options() if compiler_options is None else compiler_options)
    t0 = time.perf_counter()
    shape = (t.batch_size, *net.input_shape)
    spec = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), state
    )
    rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated)

    def args(k: int, sharding):
        lead = (k,) if k > 1 else ()
        return (
            spec,
            jax.ShapeDtypeStruct((*lead, *shape), jnp.float32, sharding=sharding),
            jax.ShapeDtypeStruct((*lead, t.batch_size), jnp.int32, sharding=sharding),
            rng,
        )

    kw = dict(freeze=freeze)
    one = jit_train_step(net, tx, weights, t, data_sharding, replicated, **kw)
    one = one.lower(*args(1, data_sharding)).compile(opts)
    many = None
    if steps_per_call > 1:
        many = jit_train_step(
            net, tx, weights, t, data_sharding, replicated, steps_per_call=steps_per_call, **kw
        )
        many = many.lower(*args(steps_per_call, stacked_sharding(data_sharding))).compile(opts)
    return StepFns(one, many, max(1, steps_per_call), data_sharding, time.perf_counter() - t0)


def run_steps(fns: StepFns, state: TrainState, batches: Sequence, rng: jax.Array):
    """Runs one train step per ``(x, y)`` batch; returns ``(state, metrics of the last step)``.

    Full chunks of ``fns.k`` batches go through the scanned executable (one
    transfer and one dispatch per chunk), the rest one at a time. Nothing
    here waits for the device: the caller syncs when it reads a value.
    """
    metrics = None
    i, n = 0, len(batches)
    while i < n:
        if fns.many is not None and n - i >= fns.k:
            chunk = batches[i : i + fns.k]
            xs = np.stack([x for x, _ in chunk]).astype(np.float32, copy=False)
            ys = np.stack([y for _, y in chunk]).astype(np.int32)
            stacked = stacked_sharding(fns.sharding)
            xs, ys = jax.device_put(xs, stacked), jax.device_put(ys, stacked)
            state, m = fns.many(state, xs, ys, rng)
            metrics = (m, -1)
            i += fns.k
        else:
            x, y = batches[i]
            xs = jax.device_put(x.astype(np.float32, copy=False), fns.sharding)
            ys = jax.device_put(y.astype(np.int32), fns.sharding)
            state, m = fns.one(state, xs, ys, rng)
            metrics = (m, None)
            i += 1
    if metrics is None:
        return state, None
    m, last = metrics
    return state, (jax.tree.map(lambda a: a[last], m) if last is not None else m)


def measure_throughput(
    config: ml_collections.ConfigDict,
    steps: int = 50,
    warmup: int = 5,
    steps_per_call: int | None = None,
) -> dict:
    """Training images/s of the configured job's real (jitted, sharded) step.

    Times `steps` steps after `warmup` untimed ones (compilation is ahead of
    both), on the training split's batches, from a fresh initialization, run
    the way `train_and_evaluate` runs them (`run_steps`, ``train.steps_per_call``
    unless `steps_per_call` is given).
    """
    setup = prepare(config)
    config, net, splits = setup.config, setup.net, setup.splits
    t = config.train
    steps_per_call = t.steps_per_call if steps_per_call is None else steps_per_call
    data_sharding, replicated = data_parallel_mesh()
    tx = make_optimizer(t, steps + warmup)
    weights = exit_weights(net, tuple(t.exit_weights), "joint")
    state = jax.device_put(initial_state(net, tx, config.seed, None), replicated)
    fns = compile_step_fns(
        net, tx, weights, t, state, data_sharding, replicated, steps_per_call=steps_per_call
    )
    rng = jax.random.key(0)
    pool = list(data_lib.batches(splits.train, t.batch_size, seed=0, drop_remainder=True))
    batches = [pool[i % len(pool)] for i in range(warmup + steps)]
    t0 = time.perf_counter()
    state, _ = run_steps(fns, state, batches[:warmup], rng)
    jax.block_until_ready(state)
    t_warm = time.perf_counter()
    state, _ = run_steps(fns, state, batches[warmup:], rng)
    jax.block_until_ready(state)
    seconds = time.perf_counter() - t_warm
    return {
        "model": config.model.name,
        "net": net.name,
        "input_shape": list(net.input_shape),
        "batch_size": t.batch_size,
        "steps": steps,
        "seconds": seconds,
        "warmup_seconds": t_warm - t0,
        "compile_seconds": fns.compile_seconds,
        "steps_per_call": fns.k,
        "images_per_sec": steps * t.batch_size / seconds,
        "backbone_flops": costs.of(net).backbone_flops,
        "devices": jax.local_device_count(),
        "platform": jax.default_backend(),
    }


def initial_state(net: Net, tx, seed: int, init_variables: dict | None) -> TrainState:
    """A fresh train state for `net` (seeded), starting from `init_variables` where given."""
    variables = jax.jit(lambda r: init(net, r))(jax.random.key(seed))
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    if init_variables is not None:  # exits_only: the trained backbone, fresh heads
        heads = {e.name for e in net.exits}
        params = {k: v if k in heads else init_variables["params"][k] for k, v in params.items()}
        trained_stats = init_variables.get("batch_stats", {})
        batch_stats = {k: v if k in heads else trained_stats[k] for k, v in batch_stats.items()}
    params = jax.tree.map(jnp.asarray, params)
    batch_stats = jax.tree.map(jnp.asarray, batch_stats)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
    )


def _truncate_metrics(path: str, step: int) -> None:
    # After a resume, drop records from steps that the restored state never saw.
    records = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


class _Logger:
    """metrics.jsonl + TensorBoard event files."""

    def __init__(self, workdir: str):
        # lazy: TensorBoard logging is optional and slow to import
        from tensorboardX import SummaryWriter

        self._path = os.path.join(workdir, "metrics.jsonl")
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
        with open(self._path, "a") as f:
            f.write(json.dumps(jsonable(record)) + "\n")
        for k, v in scalars.items():
            self._tb.add_scalar(k, float(v), int(step))
        self._tb.flush()

    def close(self) -> None:
        self._tb.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) the configured multi-exit net, then writes report.json.

    Returns:
      The report (also written to ``workdir/report.json``).

    Raises:
      ValueError / FileNotFoundError: bad config, data path or checkpoint
        (nothing in the workdir is modified).
      FloatingPointError: the loss became NaN/inf (the last good checkpoint, if
        any, is kept; the message says which).
    """
    setup = prepare(config, workdir)
    config, net, splits = setup.config, setup.net, setup.splits
    t = config.train
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "config.json"), config.to_dict())
    write_json_atomic(os.path.join(workdir, "net.json"), net.to_dict())

    steps_per_epoch = len(splits.train) // t.batch_size
    total_steps = steps_per_epoch * t.num_epochs
    freeze = t.mode == "exits_only"
    variables0 = jax.eval_shape(lambda r: init(net, r), jax.random.key(0))
    trainable = exits_only_mask(variables0["params"], net) if freeze else None
    tx = make_optimizer(t, total_steps, trainable)
    weights = exit_weights(net, tuple(t.exit_weights), t.mode)

    data_sharding, replicated = data_parallel_mesh()
    state = initial_state(net, tx, config.seed, setup.init_variables)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    logger = _Logger(workdir)
    good, removed = checkpoint.repair(ckpt_dir)  # steps torn by kill -9 or lost files
    for bad, why in sorted(removed.items()):
        logging.warning("removed damaged checkpoint %s/%d (%s)", ckpt_dir, bad, why)
    if removed:
        if good is not None:
            logging.warning("resuming from step %d, the newest complete checkpoint", good)
        else:
            logging.warning("no complete checkpoint is left: training starts from step 0")
    with checkpoint.manager(ckpt_dir, t.max_to_keep) as mgr:
        start = mgr.latest_step()
        if start is not None:
            tree = checkpoint.restore_state(mgr, state.to_tree(), start)
            state = TrainState(**tree)
            _truncate_metrics(metrics_path, start)
            logging.info("resumed from %s at step %d", ckpt_dir, start)
        else:
            start = 0
            if os.path.exists(metrics_path):
                os.remove(metrics_path)
        state = jax.device_put(state, replicated)
        fns = compile_step_fns(
            net,
            tx,
            weights,
            t,
            state,
            data_sharding,
            replicated,
            freeze=freeze,
            steps_per_call=t.steps_per_call,
        )
        state, train_seconds, compile_seconds, images = _train_loop(
            state,
            fns,
            setup,
            start=start,
            total_steps=total_steps,
            mgr=mgr,
            logger=logger,
            sharding=data_sharding,
        )
        mgr.wait_until_finished()
    logger.close()
    variables = jax.device_get(state.variables())
    report = evaluate_and_report(net, variables, splits, config, data_sharding)
    if images and train_seconds > 0:
        report["train"] = {
            "steps": total_steps,
            "resumed_from": start,
            "train_seconds": round(train_seconds, 2),
            "compile_seconds": round(compile_seconds, 2),
            "images_per_sec": round(images / train_seconds, 1),
            "devices": jax.local_device_count(),
            "platform": jax.default_backend(),
        }
    else:  # nothing left to train: keep the timing of the run that trained
        previous = os.path.join(workdir, "report.json")
        if os.path.exists(previous):
            with open(previous) as f:
                old = json.load(f)
            if "train" in old:
                report["train"] = old["train"]
    write_json_atomic(os.path.join(workdir, "report.json"), report)
    plot_tradeoff(report, os.path.join(workdir, "tradeoff.png"))
    return report


def _train_loop(state, fns: StepFns, setup: _Setup, *, start, total_steps, mgr, logger, sharding):
    """Runs steps ``start..total_steps``; returns the final state and timing.

    Steps run in chunks (`run_steps`) that end at every log, eval and
    checkpoint step and at epoch ends, so what is logged, evaluated and saved
    is the same as one step at a time; the host syncs only there.
    """
    # lazy: the progress bar is only needed once training starts
    from tqdm import tqdm

    config, net, splits = setup.config, setup.net, setup.splits
    t = config.train
    steps_per_epoch = len(splits.train) // t.batch_size
    eval_every = t.eval_every or steps_per_epoch
    rng = jax.random.key(config.seed + 1)

    names = net.exit_names
    timed_images, timed_seconds, compile_seconds = 0, 0.0, fns.compile_seconds
    every = [t.log_every, eval_every, t.checkpoint_every]
    step = start
    metrics = None
    bar = tqdm(
        total=total_steps,
        initial=start,
        desc=f"train {net.name}",
        unit="step",
        disable=None,
        dynamic_ncols=True,
    )

    def check_finite(m, at):
        loss = float(m["loss"])
        if not np.isfinite(loss):
            mgr.wait_until_finished()  # only a finished save counts as kept
            kept = mgr.latest_step()
            if kept is not None:
                where = f"the last good checkpoint (step {kept}) is kept in {mgr.directory}"
            else:
                where = "no checkpoint was saved before it, so a rerun starts from step 0"
            raise FloatingPointError(
                f"loss became {loss} at step {at}; lower train.learning_rate (now "
                f"{t.learning_rate}); {where}"
            )
        return loss

    try:
        t_start = time.perf_counter()
        while step < total_steps:
            epoch, offset = divmod(step, steps_per_epoch)
            it = itertools.islice(
                data_lib.batches(
                    splits.train, t.batch_size, seed=config.seed, epoch=epoch, drop_remainder=True
                ),
                offset,
                None,
            )
            epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
            while step < epoch_end:
                stop = min([epoch_end] + [(step // n + 1) * n for n in every])
                chunk = list(itertools.islice(it, stop - step))
                state, metrics = run_steps(fns, state, chunk, rng)
                timed_images += sum(len(x) for x, _ in chunk)
                bar.update(stop - step)
                step = stop
                if step % t.log_every == 0 or step == total_steps:
                    m = jax.device_get(metrics)
                    loss = check_finite(m, step)
                    scalars = {"train/loss": loss, "train/grad_norm": m["grad_norm"]}
                    for i, n in enumerate(names):
                        scalars[f"train/loss_{n}"] = m["exit_loss"][i]
                        scalars[f"train/accuracy_{n}"] = m["exit_accuracy"][i]
                    logger.write(step, scalars)
                    bar.set_postfix(loss=f"{loss:.4f}")
                if step % eval_every == 0 or step == total_steps:
                    v = jax.device_get(state.variables())
                    val = accuracies(
                        predict(net, v, splits.val.x, t.eval_batch_size, sharding),
                        splits.val.y,
                    )
                    logger.write(step, {f"val/accuracy_{n}": a for n, a in val.items()})
                    bar.write(
                        f"step {step}: val accuracy "
                        + " ".join(f"{n}={a:.4f}" for n, a in val.items())
                    )
                if step % t.checkpoint_every == 0 or step == total_steps:
                    check_finite(jax.device_get(metrics), step)  # never save a NaN state
                    checkpoint.save(mgr, step, net, state.to_tree())
        if metrics is not None:
            jax.block_until_ready(state)
            timed_seconds = time.perf_counter() - t_start
    finally:
        bar.close()
    return state, timed_seconds, compile_seconds, timed_images
