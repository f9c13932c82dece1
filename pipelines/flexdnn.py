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
  branchy/       BranchyNet baseline (conv+dense heads, joint weighted training)
  lossy_w<w>/    width-reduced backbones (input-agnostic lossy baselines)
  bundles/       every model exported (export.bundle), runtime-verifiable
  report.json, tradeoff.png

The benchmark times every system in one interleaved run with the LiteRT
runtime on the test split and on a test-split video stream.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
from collections.abc import Callable, Mapping

import jax
import numpy as np

from export import convert
from export.bundle import export_bundle
from flexjax import checkpoint, costs, exits, flexdnn, training
from flexjax import config as config_lib
from flexjax import data as data_lib
from flexjax.data import Dataset
from flexjax.io import save_figure_atomic, write_json_atomic
from flexjax.models import init
from runtime import timing
from runtime.bundle import Bundle, BundleError
from runtime.executor import EarlyExitExecutor
from runtime.lite import Model
from runtime.names import FINAL, FULL, head_name, segment_name
from runtime.timing import time_stats

TARGETS = {"max_accuracy_loss": 0.01, "vs_backbone": 0.6, "vs_branchynet": 0.7}


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
        if old != json.loads(config.to_json()):
            raise ValueError(
                f"{workdir} holds a FlexDNN run with a different config; use a new --workdir"
            )
    return {"config": config, "splits": setup.splits, "backbone": backbone, "positions": positions}


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


def search_all(s, cnet, cvars, workdir, log):
    """Runs (or reloads) the architecture search of every candidate exit."""

    config, splits = s["config"], s["splits"]
    f = config.flexdnn
    net, variables = cnet, cvars
    results = {}
    for e in cnet.exits:
        d = os.path.join(workdir, "search", e.name)
        rpath = os.path.join(d, "result.json")
        found = checkpoint.load_saved(d) if os.path.exists(rpath) else None
        if found is not None:
            hnet, hvars = found
            with open(rpath) as fh:
                results[e.name] = json.load(fh)
        else:
            hnet0 = flexdnn.head_net(cnet, e.name)
            hvars0 = flexdnn.head_variables(cvars, e.name)
            xt = flexdnn.features(cnet, cvars, e.after, splits.train.x)
            xv = flexdnn.features(cnet, cvars, e.after, splits.val.x)
            log(f"searching {e.name} (position {e.after}, input {tuple(xt.shape[1:])})")
            res = flexdnn.search_exit(
                hnet0, hvars0, (xt, splits.train.y), (xv, splits.val.y),
                delta=f.delta, prune_fraction=f.prune_fraction, min_filters=f.min_filters,
                finetune_steps=f.finetune_steps, learning_rate=f.finetune_lr,
                max_trials=f.max_trials, batch_size=config.train.batch_size,
                seed=config.seed, log=log,
            )  # fmt: skip
            hnet, hvars = res.net, res.variables
            checkpoint.save_model(d + ".tmp-model", hnet, hvars)
            # The result file is written last: its presence marks the exit as done.
            if os.path.exists(d):
                shutil.rmtree(d)
            os.rename(d + ".tmp-model", d)
            results[e.name] = res.to_dict()
            write_json_atomic(rpath, results[e.name])
        net, variables = flexdnn.with_head(net, variables, e.name, hnet, hvars)
    return net, variables, results


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
# Benchmark: every system in one interleaved run.
# ---------------------------------------------------------------------------


class _EarlyExitSystem:
    """A bundle run with the runtime's early-exit executor, thresholds calibrated here."""

    def __init__(self, bundle_dir: str, full: bool = False):
        self.bundle = Bundle.from_dir(bundle_dir)
        self.ex = EarlyExitExecutor(self.bundle, num_threads=1)
        self.full = full
        self.names = [e.name for e in self.bundle.exits]
        m = self.bundle.manifest
        self.flops = {e["name"]: e["flops"] for e in m["exits"]}
        self.backbone_flops = m["costs"]["backbone_flops"]

    def measure(self, x_probe, rounds, calls) -> None:
        sigs = self.bundle.manifest["signatures"]
        inputs = {}
        h = x_probe[None].astype(np.float32)
        for e in self.bundle.exits:
            inputs[e.segment] = h
            h = self.ex.model.signature(e.segment)(np.ascontiguousarray(h))
            if e.head:
                inputs[e.head] = h
        inputs[FULL] = x_probe[None].astype(np.float32)
        self.sig_ms = flexdnn.signature_times(
            self.ex.model, {k: v for k, v in inputs.items() if k in sigs}, rounds=rounds,
            calls=calls,
        )  # fmt: skip
        ex = self.bundle.exits
        self.head_ms = [self.sig_ms[e.head] for e in ex if e.head]
        self.seg_ms = [self.sig_ms[e.segment] for e in ex]

    def exit_ms(self) -> dict[str, float]:
        side = self.names[:-1]
        return flexdnn.exit_costs(range(len(side)), self.head_ms, self.seg_ms, side)

    def calibrate(self, val_x, val_y, epsilon, criterion):
        self.val_logits = self.ex.all_logits(val_x)
        cal = exits.calibrate(
            self.val_logits, val_y, self.exit_ms(), criterion=criterion, epsilon=epsilon,
            names=self.names,
        )  # fmt: skip
        self.set_thresholds(cal.thresholds)
        return cal

    def set_thresholds(self, thresholds) -> None:
        self.thresholds = dict(thresholds)
        self.ex = EarlyExitExecutor(
            self.bundle, thresholds=self.thresholds or None, model=self.ex.model
        )

    def fn(self) -> Callable:
        if self.full:
            return lambda x: int(self.ex.run_full(x).argmax())
        return lambda x: self.ex.run(x).prediction


def _sweep(system: _EarlyExitSystem, test_logits, test_y, val_y, criterion) -> list[dict]:
    """Accuracy vs expected time per frame over calibration epsilons (val -> test)."""

    ms = system.exit_ms()
    out = []
    for eps in exits.EPSILONS:
        cal = exits.calibrate(
            system.val_logits, val_y, ms, criterion=criterion, epsilon=eps, names=system.names
        )
        st = exits.simulate(test_logits, test_y, cal.thresholds, criterion, ms, system.names)
        flops = sum(st.rates[n] * system.flops[n] for n in system.names)
        out.append(
            {
                "epsilon": eps,
                "accuracy": st.accuracy,
                "expected_ms": st.expected_cost,
                "flops_ratio": flops / system.backbone_flops,
                "exit_rates": st.rates,
            }
        )
    return out


def benchmark(systems: dict, sources: dict, criterion, epsilon, rounds, log) -> dict:
    """Calibrates, sweeps and times every system on every data source, interleaved."""

    out: dict = {}
    for src, (val, test) in sources.items():
        log(f"benchmark on {src}: {len(test.y)} frames, {len(systems)} systems, {rounds} rounds")
        rows: dict = {}
        for name, sys_ in systems.items():
            row: dict = {}
            if not sys_.full:
                cal = sys_.calibrate(val.x, val.y, epsilon, criterion)
                test_logits = sys_.ex.all_logits(test.x)
                row["thresholds"] = cal.thresholds
                row["sweep"] = _sweep(sys_, test_logits, test.y, val.y, criterion)
                row["test_logits"] = test_logits
            rows[name] = row
        fns = {n: s.fn() for n, s in systems.items()}
        xs = [systems[next(iter(systems))].ex.frame(x) for x in test.x]
        t = timing.interleaved(fns, xs, rounds=rounds, warmup=min(20, len(xs)), order="rotate")
        times = t.ns
        preds = {n: np.asarray(p, np.int64) for n, p in t.outputs.items()}
        for n, s in systems.items():
            row = rows[n]
            row["accuracy"] = float((preds[n] == test.y).mean())
            row["time_per_frame"] = time_stats(times[n])
            if not s.full:
                st = exits.simulate(
                    row.pop("test_logits"), test.y, s.thresholds, criterion, None, s.names
                )
                row["exit_rates"] = st.rates
                row["expected_flops"] = sum(st.rates[k] * s.flops[k] for k in s.names)
            else:
                row["expected_flops"] = s.backbone_flops
        base = rows["backbone"]["time_per_frame"]["mean_ms"]
        base_flops = rows["backbone"]["expected_flops"]
        for row in rows.values():
            row["ratio_vs_backbone"] = row["time_per_frame"]["mean_ms"] / base
            row["flops_ratio"] = row["expected_flops"] / base_flops
        out[src] = {"frames": len(xs), "rounds": rounds, "systems": rows}
    return out


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
    cand_val = training.accuracies(training.predict(cnet, cvars, splits.val.x), splits.val.y)

    # 2. Architecture search per exit.
    snet, svars, search = search_all(s, cnet, cvars, workdir, log)

    # 3. Measured latency of every segment and head; FLOPs too.
    measured = measure_costs(
        snet, svars, splits.val.x, workdir, f.timing_rounds, f.timing_calls, log
    )
    names, head_ms, seg_ms = _head_seg_costs(snet, measured["signature_ms"])

    # 4. Thresholds on validation data + the insertion plan.
    crit, eps = config.exits.criterion, float(config.exits.epsilon)
    val_logits = training.predict(snet, svars, splits.val.x)
    plan = flexdnn.plan_exits(
        val_logits, splits.val.y, names, head_ms, seg_ms, criterion=crit, epsilon=eps
    )
    log(f"insertion plan: kept {list(plan.kept)}, removed (in order) {list(plan.removed)}")
    fnet, fvars = flexdnn.keep_exits(snet, svars, plan.kept)
    final_dir = os.path.join(workdir, "final")
    if checkpoint.load_saved(final_dir, fnet) is None:
        checkpoint.save_model(final_dir, fnet, fvars, config.to_dict())

    # 5. Baselines: BranchyNet (same budget, joint) and width-reduced backbones.
    budget = config.train.num_epochs + f.exit_epochs
    bpos = list(f.branchy_positions) or branchy_positions(config, backbone, splits)
    branchy_dir = os.path.join(workdir, "branchy")
    _train_workdir(_sub_config(config, exits=bpos, epochs=budget), branchy_dir, log)
    lossy_dirs = {}
    for w in f.lossy_widths:
        d = os.path.join(workdir, f"lossy_w{w:g}")
        _train_workdir(_sub_config(config, exits=[], width_factor=float(w)), d, log)
        lossy_dirs[float(w)] = d

    # 6. Export everything; pick the lossy baseline at the backbone's accuracy (val).
    bdir = os.path.join(workdir, "bundles")
    _export_workdir(final_dir, os.path.join(bdir, "flexdnn"), log)
    _export_workdir(branchy_dir, os.path.join(bdir, "branchynet"), log)
    lossy_val = {}
    for w, d in lossy_dirs.items():
        _export_workdir(d, os.path.join(bdir, f"lossy_w{w:g}"), log)
        lnet, lvars = checkpoint.load_saved(d)
        lossy_val[w] = training.accuracies(
            training.predict(lnet, lvars, splits.val.x), splits.val.y
        )["final"]
    backbone_val = training.accuracies(
        training.predict(backbone, bvars, splits.val.x), splits.val.y
    )["final"]
    ok = [w for w, a in lossy_val.items() if a >= backbone_val - eps]
    lossy_w = min(ok) if ok else max(lossy_val, key=lossy_val.get) if lossy_val else None

    # 7. One interleaved benchmark run.
    systems = {
        "backbone": _EarlyExitSystem(os.path.join(bdir, "flexdnn"), full=True),
        "flexdnn": _EarlyExitSystem(os.path.join(bdir, "flexdnn")),
        "branchynet": _EarlyExitSystem(os.path.join(bdir, "branchynet")),
    }
    for w in lossy_dirs:
        systems[f"lossy_w{w:g}"] = _EarlyExitSystem(os.path.join(bdir, f"lossy_w{w:g}"), True)
    for sy in systems.values():
        sy.measure(splits.val.x[0], f.timing_rounds, f.timing_calls)
    limit = f.bench_frames or None
    sources = {"test": (splits.val, _head(splits.test, limit))}
    if config.video.enabled:
        v = config.video
        streams = {}
        for split, offset in (("val", 1000), ("test", 0)):
            vcfg = data_lib.VideoConfig(
                num_clips=v.num_clips, frames_per_clip=v.frames_per_clip, seed=v.seed + offset
            )
            streams[split] = data_lib.make_stream(getattr(splits, split), vcfg).as_dataset()
        sources["video"] = (streams["val"], _head(streams["test"], limit))
    bench = benchmark(systems, sources, crit, eps, f.bench_rounds, log)

    # 8. R re-measured on the test data with the thresholds the final model runs with.
    remeasured = {}
    fsys = systems["flexdnn"]
    for src, (_val, test) in sources.items():
        thr = bench[src]["systems"]["flexdnn"]["thresholds"]
        side = fsys.names[:-1]
        logits = fsys.ex.all_logits(test.x)
        passes = flexdnn.passes_matrix(logits, side, thr, crit)
        r = flexdnn.r_values(passes, range(len(side)), fsys.head_ms, fsys.seg_ms)
        remeasured[src] = {side[j]: v for j, v in r.items()}

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
        "R_remeasured_on_test": remeasured,
        "baselines": {
            "branchynet": {
                "positions": bpos,
                "epochs": budget,
                "note": "backbone epochs + candidate-exit epochs, joint training",
            },
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
    return report


def _head(ds, limit):
    return ds if not limit else Dataset(ds.x[:limit], ds.y[:limit])


def branchy_positions(config, backbone, splits) -> list[int]:
    """Where BranchyNet puts exits: after the first two conv blocks for AlexNet, the
    zoo's defaults otherwise (LeNet: after conv1; VGG/Inception/ResNet: ~1/3 and 2/3)."""

    if config.model.name == "alexnet_branchy":
        return flexdnn.block_boundaries(backbone)[:2]
    return [e.after for e in training.make_net(_sub_config(config), splits).exits]


def targets(report: dict) -> dict:
    """The issue's targets, met or missed, per data source."""
    out = {}
    for src, b in report["benchmark"].items():
        s = b["systems"]
        loss = s["backbone"]["accuracy"] - s["flexdnn"]["accuracy"]
        vs_b = (
            s["flexdnn"]["time_per_frame"]["mean_ms"] / s["backbone"]["time_per_frame"]["mean_ms"]
        )
        vs_br = (
            s["flexdnn"]["time_per_frame"]["mean_ms"] / s["branchynet"]["time_per_frame"]["mean_ms"]
        )
        r = report["R_remeasured_on_test"].get(src, {})
        out[src] = {
            "accuracy_loss_vs_backbone": loss,
            "accuracy_loss_ok": loss <= TARGETS["max_accuracy_loss"] + 1e-12,
            "time_vs_backbone": vs_b,
            "time_vs_backbone_ok": vs_b <= TARGETS["vs_backbone"],
            "time_vs_branchynet": vs_br,
            "time_vs_branchynet_ok": vs_br <= TARGETS["vs_branchynet"],
            "kept_R": r,
            "kept_R_above_1": all(v > 1 for v in r.values()),
        }
    return out


def plot(report: dict, path: str) -> None:
    """Accuracy vs time per frame: sweeps (lines), measured operating points (stars)."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib.pyplot as plt

    srcs = list(report["benchmark"])
    fig, axes = plt.subplots(1, len(srcs), figsize=(6 * len(srcs), 4.5), squeeze=False)
    colors = {"flexdnn": "tab:red", "branchynet": "tab:blue", "backbone": "black"}
    for ax, src in zip(axes[0], srcs):
        systems = report["benchmark"][src]["systems"]
        for name, row in systems.items():
            c = colors.get(name, "tab:green")
            if "sweep" in row:
                pts = row["sweep"]
                label = f"{name} (threshold sweep; expected from signature times)"
                ax.plot([p["expected_ms"] for p in pts], [p["accuracy"] for p in pts], "o-",
                        color=c, ms=3, lw=1, label=label)  # fmt: skip
            t = row["time_per_frame"]["mean_ms"]
            ax.plot([t], [row["accuracy"]], "*", color=c, ms=12, label=f"{name} (measured)")
        ax.set_xlabel("time per frame (ms, LiteRT, 1 thread)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{report['net']} on {report['dataset']}: {src}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=120)


def format_report(report: dict) -> str:
    lines = [
        f"FlexDNN on {report['net']} / {report['dataset']} "
        f"(delta={report['delta']}, epsilon={report['epsilon']})",
        f"{'exit':<10}{'pos':>4}{'MFLOPs':>9}{'ms':>8}{'R by round':>28}  kept",
    ]
    for c in report["candidates"]:
        rs = " ".join("-" if r is None else f"{r:.2f}" for r in c["R_by_round"])
        kept = "yes" if c["kept"] else f"removed #{c['removed_at']}"
        lines.append(
            f"{c['name']:<10}{c['position']:>4}{c['flops'] / 1e6:>9.3f}{c['latency_ms']:>8.4f}"
            f"  {rs:>26}  {kept}"
        )
    for src, b in report["benchmark"].items():
        lines.append(f"{src} ({b['frames']} frames, {b['rounds']} interleaved rounds):")
        for name, row in b["systems"].items():
            lines.append(
                f"  {name:<14} accuracy {row['accuracy']:.4f}  "
                f"{row['time_per_frame']['mean_ms']:.4f} ms/frame  "
                f"{row['ratio_vs_backbone']:.3f}x backbone  FLOPs {row['flops_ratio']:.3f}x"
            )
        t = report["targets"][src]

        def ok(key: str) -> str:
            return "ok" if t[key] else "MISSED"  # noqa: B023 - used in this iteration only

        lines.append(
            f"  targets: accuracy loss {t['accuracy_loss_vs_backbone']:+.4f} "
            f"({ok('accuracy_loss_ok')}), {t['time_vs_backbone']:.3f}x backbone "
            f"({ok('time_vs_backbone_ok')}), {t['time_vs_branchynet']:.3f}x BranchyNet "
            f"({ok('time_vs_branchynet_ok')}), kept R > 1: {ok('kept_R_above_1')}"
        )
    return "\n".join(lines)
