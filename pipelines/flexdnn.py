"""The FlexDNN job: searched exits where they pay off, against BranchyNet and the backbone.

`run(config, workdir)` is what ``python -m train.flexdnn`` calls. Stages (each
one's output stays in the workdir, so re-running the same command resumes
after the last finished stage; a workdir made with another config is refused):

  backbone/      the input-agnostic backbone (train.multi_exit, no side exits),
                 unless flexdnn.backbone_workdir points at a trained one
  candidates/    over-parameterized exits at every candidate position, trained
                 on the frozen backbone
  search/<exit>/ each exit's searched head (filter + layer pruning, fine-tuned)
  costs.json     measured latency of every exported segment and exit signature
  final/         the FlexDNN model (kept exits only), a normal training workdir
  final_joint/   FlexDNN-joint: final/ with backbone and kept exits fine-tuned jointly
                 (BranchyNet's weighted loss) for BranchyNet's budget (flexdnn.joint_variant)
  branchy/       BranchyNet baseline (the zoo's conv+dense heads at ~1/3 and 2/3 depth)
  lossy_w<w>/    width-reduced backbones (input-agnostic lossy baselines)
  bundles/       every model exported (export.bundle), runtime-verifiable
  report.json, tradeoff.png

The benchmark times every system in one interleaved run with the LiteRT
runtime on the test split and on a test-split video stream.

BranchyNet's protocol (``flexdnn.branchy_protocol``, issue 13 item 3):

  finetune (default)  BranchyNet starts from the SAME trained backbone FlexDNN
                      uses (fresh heads) and is fine-tuned jointly with its
                      weighted sum of exit losses for exactly the extra budget
                      FlexDNN's exits got: candidate-exit training steps plus
                      every search fine-tuning step, counted as examples
                      (steps x batch; `extra_budget`).
  scratch             the old protocol: joint training from scratch for the
                      backbone's epochs + flexdnn.exit_epochs (what the issue-4
                      tables in BENCHMARKS.md were made with).

The report's ``protocols`` and ``budgets`` say which one every system used.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
from collections.abc import Callable, Mapping

import jax
import ml_collections
import numpy as np

from export import convert
from export.bundle import calibrate_bundle, export_bundle
from flexjax import checkpoint, costs, evaluation, flexdnn, training
from flexjax import config as config_lib
from flexjax import data as data_lib
from flexjax.data import Dataset
from flexjax.finetune import finetune
from flexjax.io import write_json_atomic
from flexjax.models import init
from pipelines.flexdnn_bench import EarlyExitSystem, benchmark, plot, targets
from runtime.bundle import Bundle, BundleError
from runtime.lite import Model
from runtime.names import FINAL, head_name, segment_name

# ---------------------------------------------------------------------------
# Setup and validation (nothing is written before all of it passed).
# ---------------------------------------------------------------------------


def _sub_config(config, *, exits=None, width_factor: float = 1.0, epochs: int | None = None):
    """A `train.multi_exit` config derived from the FlexDNN config."""
    c = copy.deepcopy(config)
    c.train.mode = "joint"
    c.train.init_from = ""
    c.train.exit_weights = ()
    kw = c.model.kwargs
    if exits is None:
        if "exits" in kw:
            del kw["exits"]
    else:
        kw.exits = list(exits)
    if width_factor != 1.0:
        kw.width = float(kw.get("width", 1.0)) * width_factor
    if epochs is not None:
        c.train.num_epochs = int(epochs)
    return c


def prepare(config, workdir: str) -> dict:
    """Validates the config, data, backbone source and candidate positions."""

    config = config_lib.validate(config)
    flexdnn.validate(config)
    f = config.flexdnn
    bcfg = _sub_config(config, exits=[])
    setup = training.prepare(bcfg)  # data, model, train settings
    backbone = setup.net
    if f.backbone_workdir:
        if not os.path.isdir(f.backbone_workdir):
            raise FileNotFoundError(f"flexdnn.backbone_workdir {f.backbone_workdir} does not exist")
        other, _ = checkpoint.load(f.backbone_workdir)
        training.check_same_backbone(
            backbone, other, f"flexdnn.backbone_workdir={f.backbone_workdir}"
        )
    check_protocol(config)
    positions = flexdnn.check_positions(backbone, list(f.positions))
    for p in f.branchy_positions:
        if p not in range(len(backbone.layers) - 1):
            raise flexdnn.FlexDNNError(
                f"flexdnn.branchy_positions: position {p} does not exist "
                f"(0..{len(backbone.layers) - 2})"
            )
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved):
        with open(saved) as fh:
            old = json.load(fh)
        if _with_defaults(old) != json.loads(config.to_json()):
            raise ValueError(
                f"{workdir} holds a FlexDNN run with a different config; use a new --workdir"
            )
    return {"config": config, "splits": setup.splits, "backbone": backbone, "positions": positions}


def _with_defaults(saved: dict) -> dict | None:
    """A saved config with keys added to the schema since at their defaults (None: invalid now).

    A key added later (e.g. ``calibration``) does not make an old workdir another run.
    """
    try:
        return json.loads(config_lib.validate(ml_collections.ConfigDict(saved)).to_json())
    except (ValueError, TypeError, KeyError):
        return None


BRANCHY_PROTOCOLS = ("finetune", "scratch")


def check_protocol(config) -> None:
    """Raises FlexDNNError (one line) for an unknown ``flexdnn.branchy_protocol``."""
    p = config.flexdnn.branchy_protocol
    if p not in BRANCHY_PROTOCOLS:
        raise flexdnn.FlexDNNError(
            f"flexdnn.branchy_protocol must be one of {', '.join(BRANCHY_PROTOCOLS)}, got '{p}'"
        )


# ---------------------------------------------------------------------------
# Budgets and the joint fine-tuning (BranchyNet's protocol, FlexDNN-joint).
# ---------------------------------------------------------------------------


def search_subset(ds: Dataset, n: int, seed: int) -> Dataset:
    """`n` training examples (seeded, in split order) the search fine-tunes on; 0 = all."""
    if not n or n >= len(ds):
        return ds
    idx = np.sort(np.random.default_rng(seed).permutation(len(ds))[:n])
    return Dataset(ds.x[idx], ds.y[idx])


def extra_budget(config, n_train: int, n_search: int, search: Mapping[str, dict]) -> dict:
    """The training FlexDNN's exits got beyond the backbone, as optimizer steps x batch.

    Candidate-exit training: ``exit_epochs`` epochs of ``n_train // batch_size``
    steps. Search: `flexdnn.finetune_steps` steps of ``min(batch_size, n_search)``
    examples after every tried architecture that was built (``search[exit]["history"]``
    entries with an accuracy; the starting point and transforms that failed to
    apply are not fine-tuned).
    """
    t, f = config.train, config.flexdnn
    exit_steps = (n_train // t.batch_size) * int(f.exit_epochs)
    trials = sum(
        1
        for r in search.values()
        for h in r["history"]
        if h["action"] != "start" and "accuracy" in h
    )
    sbs = min(t.batch_size, n_search)
    ft_steps = trials * int(f.finetune_steps)
    return {
        "exit_training": {"steps": exit_steps, "batch_size": t.batch_size,
                          "examples": exit_steps * t.batch_size,
                          "note": "all candidate heads at once, backbone frozen"},
        "search_finetune": {"trials": trials, "steps": ft_steps, "batch_size": sbs,
                            "examples": ft_steps * sbs,
                            "note": "one head at a time, on cached backbone activations"},
        "examples": exit_steps * t.batch_size + ft_steps * sbs,
    }  # fmt: skip


def joint_steps(budget: Mapping, batch_size: int) -> int:
    """Joint fine-tuning steps at `batch_size` that see `budget`'s examples (rounded up)."""
    return -(-int(budget["examples"]) // int(batch_size))


def joint_protocol(config, steps: int, protocol: str, start: str) -> dict:
    """What a joint fine-tuning run is (its workdir's protocol.json; reused only if equal)."""
    t, f = config.train, config.flexdnn
    return {
        "protocol": protocol, "start": start, "steps": int(steps), "batch_size": t.batch_size,
        "examples": int(steps) * t.batch_size, "optimizer": "adam, constant rate",
        "learning_rate": float(f.joint_lr), "augment_shift": t.augment_shift,
        "loss": "BranchyNet's weighted sum of exit losses (1.0 at the first exit .. 0.3 at final)",
        "seed": config.seed,
    }  # fmt: skip


def start_from(net, trained: Mapping, seed: int) -> dict:
    """`net`'s variables: the trained backbone's where `trained` has them, fresh (seeded) heads.

    BranchyNet's starting point in the ``finetune`` protocol: the backbone FlexDNN
    uses, bit for bit, with the zoo's heads initialised as in training.
    """
    fresh = jax.device_get(jax.jit(lambda r: init(net, r))(jax.random.key(seed)))
    heads = {e.name for e in net.exits}
    out = {}
    for col, tree in fresh.items():
        src = trained.get(col, {})
        out[col] = {
            k: v if k in heads else jax.tree.map(np.asarray, src[k]) for k, v in tree.items()
        }
    return out


def _finetune_workdir(net, make_start, config, splits, proto, out, bundle, log):
    """Joint weighted fine-tuning of `net` for ``proto["steps"]`` steps, saved in `out`.

    A model already in `out` is reused only if its protocol.json equals `proto`;
    otherwise it is fine-tuned again and its (now stale) `bundle` removed.
    """
    saved = checkpoint.load_saved(out, net)
    ppath = os.path.join(out, "protocol.json")
    if saved is not None and os.path.exists(ppath):
        with open(ppath) as fh:
            if json.load(fh) == json.loads(json.dumps(proto)):
                return saved
    t = config.train
    log(
        f"fine-tuning {os.path.basename(out)} jointly ({proto['protocol']}): "
        f"{proto['steps']} steps x {t.batch_size}"
    )
    variables = finetune(
        net, make_start(), splits.train.x, splits.train.y, steps=proto["steps"],
        batch_size=t.batch_size, learning_rate=float(config.flexdnn.joint_lr),
        seed=config.seed + 4, augment_shift=t.augment_shift,
    )  # fmt: skip
    for leaf in jax.tree.leaves(variables):
        if not np.all(np.isfinite(leaf)):
            raise FloatingPointError(
                f"joint fine-tuning of {os.path.basename(out)} diverged; lower flexdnn.joint_lr"
            )
    if os.path.isdir(bundle):
        shutil.rmtree(bundle)
    checkpoint.save_model(
        out, net, variables, config.to_dict(), json_files={"protocol.json": proto}
    )
    return net, variables


def budgets(exits: Mapping, branchy: Mapping, joint: Mapping | None) -> dict:
    """report["budgets"]: each system's training beyond the backbone, steps x batch."""

    def keep(d):
        return {k: d[k] for k in ("steps", "batch_size", "examples")}

    out = {"flexdnn_exits": dict(exits), "branchynet": keep(branchy)}
    if joint is not None:
        out["flexdnn_joint"] = {
            "joint_finetune": keep(joint),
            "examples": exits["examples"] + joint["examples"],
            "note": "FlexDNN's exit budget, then BranchyNet's again for the joint fine-tuning",
        }
    out["unit"] = "examples = optimizer steps x batch size, beyond the backbone's training"
    return out


def protocols(config, branchy: Mapping, joint: bool) -> dict:
    """Which protocol every benchmarked system's numbers come from (report["protocols"])."""
    f = config.flexdnn
    out = {
        "backbone": "trained once without side exits (train.multi_exit); the `full` signature",
        "flexdnn": "exits on the frozen backbone: candidate training + search fine-tuning "
        "(budgets.flexdnn_exits), insertion plan",
    }
    if joint:
        out["flexdnn_joint"] = (
            "flexdnn, then backbone + kept exits fine-tuned jointly (BranchyNet's weighted "
            "loss) for BranchyNet's budget (budgets.flexdnn_joint)"
        )
    if branchy["protocol"] == "scratch":
        out["branchynet"] = (
            f"scratch (old): joint training from scratch, {branchy['epochs']} epochs, heads at "
            f"{branchy['positions']}; not the backbone FlexDNN uses"
        )
    else:
        out["branchynet"] = (
            f"finetune: from the same trained backbone, heads at {branchy['positions']}, joint "
            f"weighted fine-tuning for FlexDNN's extra budget ({branchy['steps']} steps x "
            f"{branchy['batch_size']})"
        )
    for w in f.lossy_widths:
        out[f"lossy_w{w:g}"] = f"backbone at width x{w:g}, trained like the backbone"
    return out


def format_protocols(report: Mapping) -> str:
    """The protocol and training budget of every system (printed after the benchmark)."""
    b = report["budgets"]
    e = b["flexdnn_exits"]
    lines = ["protocols (budgets in examples = steps x batch, beyond the backbone):"]
    for name, text in report["protocols"].items():
        lines.append(f"  {name:<14} {text}")
    lines.append(
        f"  budgets: flexdnn exits {e['examples']:,} (exit training {e['exit_training']['steps']}"
        f" x {e['exit_training']['batch_size']} + search {e['search_finetune']['steps']} x "
        f"{e['search_finetune']['batch_size']}), branchynet {b['branchynet']['examples']:,} "
        f"({b['branchynet']['steps']} x {b['branchynet']['batch_size']})"
        + (f", flexdnn_joint {b['flexdnn_joint']['examples']:,}" if "flexdnn_joint" in b else "")
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def _train_workdir(cfg, workdir: str, log) -> None:
    """Trains (or resumes) a train.multi_exit job unless it already reported."""

    if os.path.exists(os.path.join(workdir, "report.json")):
        return
    log(f"training {cfg.model.name} -> {workdir}")
    training.train_and_evaluate(cfg, workdir)


def _load_backbone(s: dict, workdir: str, log):
    config = s["config"]
    path = config.flexdnn.backbone_workdir
    if not path:
        path = os.path.join(workdir, "backbone")
        _train_workdir(_sub_config(config, exits=[]), path, log)
    net, variables = checkpoint.load(path)
    net, variables = flexdnn.keep_exits(net, variables, ())
    return path, net, variables


def train_candidates(config, cnet, backbone_vars, splits, log) -> dict:
    """Trains the candidate exits on the frozen backbone (exits_only-style step)."""

    t = config.train
    steps_per_epoch = len(splits.train) // t.batch_size
    total = steps_per_epoch * config.flexdnn.exit_epochs
    shapes = jax.eval_shape(lambda r: init(cnet, r), jax.random.key(0))
    tx = training.make_optimizer(t, total, training.exits_only_mask(shapes["params"], cnet))
    weights = np.ones(len(cnet.exit_names), np.float32)
    weights[-1] = 0.0  # the backbone is frozen
    data_sharding, replicated = training.data_parallel_mesh()
    state = jax.device_put(
        training.initial_state(cnet, tx, config.seed, jax.tree.map(np.array, backbone_vars)),
        replicated,
    )
    step_fn = training.jit_train_step(cnet, tx, weights, t, data_sharding, replicated, freeze=True)
    rng = jax.random.key(config.seed + 2)
    log(f"training {len(cnet.exits)} candidate exits for {total} steps (backbone frozen)")
    for epoch in range(config.flexdnn.exit_epochs):
        for x, y in data_lib.batches(
            splits.train, t.batch_size, seed=config.seed, epoch=epoch, drop_remainder=True
        ):
            state, metrics = step_fn(
                state,
                jax.device_put(x, data_sharding),
                jax.device_put(y.astype(np.int32), data_sharding),
                rng,
            )
        loss = float(jax.device_get(metrics)["loss"])
        if not np.isfinite(loss):
            raise FloatingPointError(
                f"candidate exit loss became {loss}; lower train.learning_rate"
            )
        log(f"  epoch {epoch + 1}: loss {loss:.4f}")
    return jax.device_get(state.variables())


def search_or_load(cnet, cvars, workdir, search_one):
    """Every candidate exit of `cnet`, searched by ``search_one(exit)`` or reloaded if done.

    Each exit's result lives in ``workdir/search/<exit>`` (the head's net and
    variables, then ``result.json``, written last: its presence marks the exit
    done), so an interrupted search resumes at the first unfinished exit.
    Returns ``(net with every searched head, variables, {exit: result dict})``.
    """
    net, variables, results = cnet, cvars, {}
    for e in cnet.exits:
        d = os.path.join(workdir, "search", e.name)
        rpath = os.path.join(d, "result.json")
        found = checkpoint.load_saved(d) if os.path.exists(rpath) else None
        if found is not None:
            hnet, hvars = found
            with open(rpath) as fh:
                results[e.name] = json.load(fh)
        else:
            res = search_one(e)
            hnet, hvars = res.net, res.variables
            checkpoint.save_model(d + ".tmp-model", hnet, hvars)
            if os.path.exists(d):
                shutil.rmtree(d)
            os.rename(d + ".tmp-model", d)
            results[e.name] = res.to_dict()
            write_json_atomic(rpath, results[e.name])
        net, variables = flexdnn.with_head(net, variables, e.name, hnet, hvars)
    return net, variables, results


def search_all(s, cnet, cvars, workdir, log):
    """Runs (or reloads) the architecture search of every candidate exit."""

    config, splits = s["config"], s["splits"]
    f = config.flexdnn
    train = search_subset(splits.train, f.search_examples, config.seed)

    def search_one(e):
        xt = flexdnn.features(cnet, cvars, e.after, train.x)
        xv = flexdnn.features(cnet, cvars, e.after, splits.val.x)
        log(f"searching {e.name} (position {e.after}, input {tuple(xt.shape[1:])})")
        return flexdnn.search_exit(
            flexdnn.head_net(cnet, e.name), flexdnn.head_variables(cvars, e.name),
            (xt, train.y), (xv, splits.val.y),
            delta=f.delta, prune_fraction=f.prune_fraction, min_filters=f.min_filters,
            finetune_steps=f.finetune_steps, learning_rate=f.finetune_lr,
            max_trials=f.max_trials, batch_size=config.train.batch_size,
            seed=config.seed, log=log,
        )  # fmt: skip

    return search_or_load(cnet, cvars, workdir, search_one)


def measure_costs(net, variables, x_probe, workdir, rounds, calls, log) -> dict:
    """Exports `net` (every exit) to TFLite and times each signature with the runtime."""

    path = os.path.join(workdir, "costs.json")
    if os.path.exists(path):
        with open(path) as fh:
            saved = json.load(fh)
        if saved.get("net") == net.to_dict():
            return saved
    plans = convert.plan_signatures(net)
    log(f"exporting {len(plans)} signatures to time them")
    buf = convert.to_tflite(net, variables, plans)
    model_path = os.path.join(workdir, "candidates.tflite")
    with open(model_path + ".tmp", "wb") as fh:
        fh.write(buf)
    os.replace(model_path + ".tmp", model_path)
    inputs = convert.representative_inputs(net, variables, plans, x_probe[:1])
    model = Model(model_path, num_threads=1)
    ms = flexdnn.signature_times(
        model, {p.name: inputs[p.name][0] for p in plans}, rounds=rounds, calls=calls
    )
    nc = costs.of(net)
    out = {
        "net": net.to_dict(),
        "signature_ms": ms,
        "signature_flops": {
            p.name: (
                nc.heads[p.exit].flops
                if p.kind == "head"
                else costs.total(nc.layers[p.start : p.stop]).flops
            )
            for p in plans
        },
        "plans": [p.to_dict() for p in plans],
        "rounds": rounds,
        "calls": calls,
        "threads": 1,
    }
    write_json_atomic(path, out)
    return out


def _head_seg_costs(net, sig: Mapping[str, float]):
    exit_names = [e.name for e in net.exits]
    head = [sig[head_name(n)] for n in exit_names]
    seg = [sig[segment_name(n)] for n in exit_names] + [sig[segment_name(FINAL)]]
    return exit_names, head, seg


def _export_workdir(workdir: str, out: str, log) -> dict:
    """export.bundle of a workdir, unless an up-to-date bundle is there already."""

    try:
        b = Bundle.from_dir(out)
        with open(os.path.join(workdir, "net.json")) as fh:
            if b.manifest["net"] == json.load(fh) and b.manifest["source"]["workdir"] == (
                os.path.abspath(workdir)
            ):
                return b.manifest
    except (BundleError, FileNotFoundError, KeyError):
        pass
    return export_bundle(workdir, out, overwrite=True, log=log)


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def run(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Every stage of the FlexDNN job (see the module docstring); returns the report."""

    s = prepare(config, workdir)
    config, splits = s["config"], s["splits"]
    f = config.flexdnn
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

    # 1. Backbone and the candidate exits trained on it (frozen).
    backbone_dir, backbone, bvars = _load_backbone(s, workdir, log)
    cnet = flexdnn.candidate_net(backbone, s["positions"], f.head_features, f.head_convs)
    found = checkpoint.load_saved(os.path.join(workdir, "candidates"), cnet)
    if found is None:
        cvars = train_candidates(config, cnet, bvars, splits, log)
        checkpoint.save_model(os.path.join(workdir, "candidates"), cnet, cvars)
    else:
        cvars = found[1]
    cand_val = evaluation.accuracies(evaluation.predict(cnet, cvars, splits.val.x), splits.val.y)

    # 2. Architecture search per exit.
    snet, svars, search = search_all(s, cnet, cvars, workdir, log)

    # 3. Measured latency of every segment and head; FLOPs too.
    measured = measure_costs(
        snet, svars, splits.val.x, workdir, f.timing_rounds, f.timing_calls, log
    )
    names, head_ms, seg_ms = _head_seg_costs(snet, measured["signature_ms"])

    # 4. Thresholds on validation data + the insertion plan.
    crit, eps = config.exits.criterion, float(config.exits.epsilon)
    val_logits = evaluation.predict(snet, svars, splits.val.x)
    plan = flexdnn.plan_exits(
        val_logits, splits.val.y, names, head_ms, seg_ms, criterion=crit, epsilon=eps,
        calibration=config_lib.calibration_options(config),
    )  # fmt: skip
    log(f"insertion plan: kept {list(plan.kept)}, removed (in order) {list(plan.removed)}")
    fnet, fvars = flexdnn.keep_exits(snet, svars, plan.kept)
    final_dir = os.path.join(workdir, "final")
    if checkpoint.load_saved(final_dir, fnet) is None:
        checkpoint.save_model(final_dir, fnet, fvars, config.to_dict())

    # 5. Baselines: BranchyNet (its protocol: flexdnn.branchy_protocol) and FlexDNN-joint,
    # both with the extra budget FlexDNN's exits got; width-reduced backbones.
    n_search = min(f.search_examples or len(splits.train), len(splits.train))
    budget = extra_budget(config, len(splits.train), n_search, search)
    steps = joint_steps(budget, config.train.batch_size)
    bpos = list(f.branchy_positions) or branchy_positions(config, backbone, splits)
    branchy_dir = os.path.join(workdir, "branchy")
    bdir = os.path.join(workdir, "bundles")
    if f.branchy_protocol == "scratch":
        epochs = config.train.num_epochs + f.exit_epochs
        _train_workdir(_sub_config(config, exits=bpos, epochs=epochs), branchy_dir, log)
        bsteps = epochs * (len(splits.train) // config.train.batch_size)
        branchy = {
            "protocol": "scratch", "positions": bpos, "epochs": epochs, "steps": bsteps,
            "batch_size": config.train.batch_size, "examples": bsteps * config.train.batch_size,
            "note": "old protocol: joint training from scratch for backbone + candidate-exit "
            "epochs (not the backbone FlexDNN uses; a larger budget)",
        }  # fmt: skip
    else:
        bnet = training.make_net(_sub_config(config, exits=bpos), splits)
        branchy = joint_protocol(config, steps, "finetune", os.path.abspath(backbone_dir))
        branchy["positions"] = bpos
        _finetune_workdir(
            bnet, lambda: start_from(bnet, bvars, config.seed + 3), config, splits, branchy,
            branchy_dir, os.path.join(bdir, "branchynet"), log,
        )  # fmt: skip
    joint_dir, joint = os.path.join(workdir, "final_joint"), None
    if f.joint_variant:
        joint = joint_protocol(config, steps, "flexdnn_joint", os.path.abspath(final_dir))
        joint["exits"] = list(plan.kept)
        _finetune_workdir(
            fnet, lambda: fvars, config, splits, joint, joint_dir,
            os.path.join(bdir, "flexdnn_joint"), log,
        )  # fmt: skip
    lossy_dirs = {}
    for w in f.lossy_widths:
        d = os.path.join(workdir, f"lossy_w{w:g}")
        _train_workdir(_sub_config(config, exits=[], width_factor=float(w)), d, log)
        lossy_dirs[float(w)] = d

    # 6. Export everything; pick the lossy baseline at the backbone's accuracy (val).
    _export_workdir(final_dir, os.path.join(bdir, "flexdnn"), log)
    if f.joint_variant:
        _export_workdir(joint_dir, os.path.join(bdir, "flexdnn_joint"), log)
    _export_workdir(branchy_dir, os.path.join(bdir, "branchynet"), log)
    lossy_val = {}
    for w, d in lossy_dirs.items():
        _export_workdir(d, os.path.join(bdir, f"lossy_w{w:g}"), log)
        lnet, lvars = checkpoint.load_saved(d)
        lossy_val[w] = evaluation.accuracies(
            evaluation.predict(lnet, lvars, splits.val.x), splits.val.y
        )["final"]
    backbone_val = evaluation.accuracies(
        evaluation.predict(backbone, bvars, splits.val.x), splits.val.y
    )["final"]
    ok = [w for w, a in lossy_val.items() if a >= backbone_val - eps]
    lossy_w = min(ok) if ok else max(lossy_val, key=lossy_val.get) if lossy_val else None

    # 7. One interleaved benchmark run.
    systems = {
        "backbone": EarlyExitSystem(os.path.join(bdir, "flexdnn"), full=True),
        "flexdnn": EarlyExitSystem(os.path.join(bdir, "flexdnn")),
        "branchynet": EarlyExitSystem(os.path.join(bdir, "branchynet")),
    }
    if f.joint_variant:
        systems["flexdnn_joint"] = EarlyExitSystem(os.path.join(bdir, "flexdnn_joint"))
    for w in lossy_dirs:
        systems[f"lossy_w{w:g}"] = EarlyExitSystem(os.path.join(bdir, f"lossy_w{w:g}"), True)
    for sy in systems.values():
        sy.measure(splits.val.x[0], f.timing_rounds, f.timing_calls)
    # The early-exit bundles' thresholds minimise their measured time per frame: calibrated
    # once, written into the bundles, and what this benchmark and runtime.bench both run.
    for name in [n for n in ("flexdnn", "flexdnn_joint", "branchynet") if n in systems]:
        calibrate_bundle(systems[name].bundle.path, config, systems[name].exit_ms(), log=log)
    for sy in systems.values():
        sy.reload()
    limit = f.bench_frames or None
    sources = {"test": ("val", _head(splits.test, limit))}
    if config.video.enabled:
        # The test-split stream runtime.bench's --data=video:DATASET plays (seed offset 0).
        v = config.video
        vcfg = data_lib.VideoConfig(
            num_clips=v.num_clips, frames_per_clip=v.frames_per_clip, seed=v.seed
        )
        stream = data_lib.make_stream(splits.test, vcfg).as_dataset()
        sources["video"] = ("video_val", _head(stream, limit))
    bench = benchmark(systems, sources, crit, eps, f.bench_rounds, log)

    # 8. R re-measured on the test data with the thresholds the final model runs with.
    remeasured = {}
    for name in [n for n in ("flexdnn", "flexdnn_joint") if n in systems]:
        fsys = systems[name]
        for src, (_val, test) in sources.items():
            thr = bench[src]["systems"][name]["thresholds"]
            side = fsys.names[:-1]
            logits = fsys.ex.all_logits(test.x)
            passes = flexdnn.passes_matrix(logits, side, thr, crit)
            r = flexdnn.r_values(passes, range(len(side)), fsys.head_ms, fsys.seg_ms)
            remeasured.setdefault(name, {})[src] = {side[j]: v for j, v in r.items()}

    nc = costs.of(snet)
    candidates = []
    for j, e in enumerate(snet.exits):
        candidates.append(
            {
                "name": e.name,
                "position": e.after,
                "over_parameterized": {
                    "layers": [x.to_dict() for x in cnet.get_exit(e.name).layers],
                    "flops": costs.of(cnet).heads[e.name].flops,
                    "val_accuracy": cand_val[e.name],
                },
                "architecture": [x.to_dict() for x in e.layers],
                "search": search[e.name],
                "flops": nc.heads[e.name].flops,
                "latency_ms": head_ms[j],
                "segment_latency_ms": seg_ms[j],
                "segment_flops": measured["signature_flops"][segment_name(e.name)],
                "val_exit_rate_by_round": [r["exit_rates"].get(e.name) for r in plan.rounds],
                "R_by_round": [r["R"].get(e.name) for r in plan.rounds],
                "kept": e.name in plan.kept,
                "removed_at": plan.removed.index(e.name) + 1 if e.name in plan.removed else None,
            }
        )
    report = {
        "net": backbone.name,
        "dataset": config.data.name,
        "backbone_workdir": os.path.abspath(backbone_dir),
        "criterion": crit,
        "epsilon": eps,
        "calibration": config_lib.calibration_options(config),
        "delta": float(f.delta),
        "candidates": candidates,
        "final_segment_latency_ms": seg_ms[-1],
        "plan": {
            "kept": list(plan.kept),
            "removal_order": list(plan.removed),
            "rounds": list(plan.rounds),
            "thresholds": plan.thresholds,
            "data": "val split",
        },
        "R_remeasured_on_test": remeasured["flexdnn"],
        "R_remeasured_on_test_joint": remeasured.get("flexdnn_joint"),
        "protocols": protocols(config, branchy, bool(f.joint_variant)),
        "budgets": budgets(budget, branchy, joint if f.joint_variant else None),
        "baselines": {
            "branchynet": branchy,
            "lossy": {
                "widths": {f"{w:g}": a for w, a in lossy_val.items()},
                "chosen": None if lossy_w is None else f"lossy_w{lossy_w:g}",
                "backbone_val_accuracy": backbone_val,
                "rule": "narrowest width with val accuracy >= backbone - epsilon",
            },
        },  # fmt: skip
        "benchmark": bench,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    report["targets"] = targets(report)
    write_json_atomic(os.path.join(workdir, "report.json"), report)
    plot(report, os.path.join(workdir, "tradeoff.png"))
    for line in format_protocols(report).splitlines():
        log(line)
    return report


def _head(ds, limit):
    return ds if not limit else Dataset(ds.x[:limit], ds.y[:limit])


def branchy_positions(config, backbone, splits) -> list[int]:
    """Where BranchyNet puts exits: after the first two conv blocks for AlexNet, the
    zoo's defaults otherwise (LeNet: after conv1; VGG/Inception/ResNet: ~1/3 and 2/3)."""

    if config.model.name == "alexnet_branchy":
        return flexdnn.block_boundaries(backbone)[:2]
    return [e.after for e in training.make_net(_sub_config(config), splits).exits]
