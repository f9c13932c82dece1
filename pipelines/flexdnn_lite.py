"""FlexDNN on a frozen ImageNet-pretrained EfficientNet-Lite over the real clips (issue 13.1).

`run(config, workdir)` is what ``python -m train.flexdnn`` calls for a config
with a ``lite`` section (`flexjax.config.flexdnn_lite_defaults`). Stages, each
one's output kept in the workdir (a rerun resumes; a workdir made with another
config is refused):

  features/          the frozen backbone's activations at every candidate (and
                     BranchyNet) position and its final logits, computed once
                     over the train frames (every tile, mirrored too, plus
                     ``lite.stills`` crops of still images), the val
                     and the test clips (`flexjax.feature_cache`)
  candidates/        over-parameterized exits (depthwise-separable blocks) at
                     every candidate block boundary, distilled from the
                     backbone's own softmax on the cached train features
  search/<exit>/     each exit searched on the cached features (filters, then
                     layers, fine-tuned with distillation after each step;
                     accepted while val agreement with the reference labels
                     stays within delta of the over-parameterized exit's)
  costs.json         measured ms of every segment_k / exit_k TFLite signature
  final/             the kept exits after the R plan (calibrated on the val clips)
  branchy/           the frozen-protocol BranchyNet baseline: conv 1x1 -> pool ->
                     dense heads at ~1/3 and 2/3 of the blocks, distilled on the
                     same cached features for as many steps as a FlexDNN exit got
                     (distillation + every search fine-tuning step)
  bundles/flexdnn, bundles/branchynet   flexjax bundles, thresholds calibrated
                     on the val clips against measured ms (what runtime.bench runs)
  frames_test.npz    the test clips, reference labels (``--data=npz:...``);
  frames_test_backbone.npz  the same frames labelled by the backbone's own top-1
  report.json, report.txt

Accuracy is agreement with the reference model's top-1 (`flexjax.data.clips`);
agreement with the backbone's own top-1 is reported beside it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from flexjax import checkpoint, costs, feature_cache, flexdnn
from flexjax import config as config_lib
from flexjax import distill_exits as de
from flexjax import exits as exits_lib
from flexjax.data import clips as clips_lib
from flexjax.data import stills
from flexjax.data.datasets import Dataset, Splits
from flexjax.io import write_json_atomic
from flexjax.models import pretrained
from flexjax.spec import FINAL, Exit, Net
from pipelines.flexdnn import measure_costs, search_or_load
from pipelines.flexdnn_bench import EarlyExitSystem, benchmark, equal_accuracy_targets, sweep
from runtime.bundle import Bundle, BundleError
from runtime.names import head_name, segment_name

HEADS = ("separable", "conv")
TEST_FRAMES = "frames_test.npz"
TEST_FRAMES_BACKBONE = "frames_test_backbone.npz"
SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------
# Checks (nothing is written before all of them passed).
# ---------------------------------------------------------------------------


def clip_configs(config) -> tuple[clips_lib.ClipConfig, clips_lib.ClipConfig]:
    """``(train, evaluation)`` clip configs: train clips with tiles, val + test centre crops."""
    c = config.lite.clips
    common = dict(
        max_frames=int(c.max_frames), resolution=int(config.lite.image_size),
        reference=c.reference, reference_resolution=int(c.reference_resolution),
    )  # fmt: skip
    train = clips_lib.ClipConfig(
        train=tuple(c.train), val=(), test=(), fps=float(c.train_fps),
        tiles=tuple(tuple(t) for t in c.train_tiles), **common,
    )  # fmt: skip
    evaluation = clips_lib.ClipConfig(
        train=(), val=tuple(c.val), test=tuple(c.test), fps=float(c.fps), **common
    )
    return train, evaluation


def candidate_positions(config, net: Net) -> list[int]:
    """``flexdnn.positions`` (each an MBConv block boundary) or every ``lite.every``-th one.

    Raises:
      FlexDNNError: a position that is not a block boundary of the backbone.
    """
    blocks = feature_cache.block_positions(net)
    f, lite = config.flexdnn, config.lite
    if f.positions:
        out = []
        for p in f.positions:
            if int(p) not in blocks:
                raise flexdnn.FlexDNNError(
                    f"candidate position {p} does not exist: exits sit at the MBConv block "
                    f"boundaries of {net.name}: {blocks}"
                )
            out.append(int(p))
        if sorted(set(out)) != out:
            raise flexdnn.FlexDNNError(
                f"flexdnn.positions must be strictly increasing, got {list(f.positions)}"
            )
        return out
    try:
        picked = feature_cache.every_kth_block(net, int(lite.every), skip_first=lite.skip_first)
    except ValueError as e:
        raise flexdnn.FlexDNNError(f"lite.every / lite.skip_first: {e}") from None
    # The deepest block reads almost what the classifier reads: no exit there.
    picked = [p for p in picked if p != blocks[-1]]
    if not picked:
        raise flexdnn.FlexDNNError("lite.every / lite.skip_first leave no candidate position")
    return picked


def branchy_positions(config, net: Net) -> list[int]:
    """``flexdnn.branchy_positions`` or the block boundaries at ~1/3 and 2/3 of the blocks."""
    blocks = feature_cache.block_positions(net)
    if config.flexdnn.branchy_positions:
        out = sorted(int(p) for p in config.flexdnn.branchy_positions)
        bad = [p for p in out if p not in blocks]
        if bad:
            raise flexdnn.FlexDNNError(
                f"flexdnn.branchy_positions: position {bad[0]} does not exist; MBConv block "
                f"boundaries of {net.name}: {blocks}"
            )
        return out
    n = len(blocks)
    return sorted({blocks[max(0, round(n / 3) - 1)], blocks[max(0, round(2 * n / 3) - 1)]})


def prepare(config, workdir: str) -> dict:
    """Validates everything (config, backbone name, positions, clip splits) before any work."""
    config = config_lib.validate(config, config_lib.flexdnn_lite_defaults)
    flexdnn.validate(config)
    lite = config.lite
    if lite.backbone not in pretrained.PACKAGES:
        raise flexdnn.FlexDNNError(
            f"lite.backbone {lite.backbone!r} is not a pretrained model; valid: "
            f"{', '.join(sorted(pretrained.PACKAGES))}"
        )
    if lite.head not in HEADS:
        raise flexdnn.FlexDNNError(
            f"lite.head must be one of {', '.join(HEADS)}; got {lite.head!r}"
        )
    if config.exits.criterion not in exits_lib.CRITERIA:
        raise flexdnn.FlexDNNError(
            f"exits.criterion must be one of {', '.join(exits_lib.CRITERIA)}; "
            f"got {config.exits.criterion!r}"
        )
    if lite.calibrate_on not in ("reference", "backbone"):
        raise flexdnn.FlexDNNError(
            f"lite.calibrate_on must be reference or backbone; got {lite.calibrate_on!r}"
        )
    for split in SPLITS:
        if not tuple(getattr(lite.clips, split)):
            raise flexdnn.FlexDNNError(
                f"lite.clips.{split} names no clip; every split needs at least one"
            )
    train_cfg, eval_cfg = clip_configs(config)  # ValueError: unknown clip, bad tile, ...
    every = set(train_cfg.train) | set(eval_cfg.val) | set(eval_cfg.test)
    if len(every) != len(train_cfg.train) + len(eval_cfg.val) + len(eval_cfg.test):
        raise flexdnn.FlexDNNError("a clip is in two of lite.clips.train / val / test")
    net = pretrained.efficientnet_lite(
        lite.backbone, num_classes=1000, image_size=int(lite.image_size)
    )
    positions = candidate_positions(config, net)
    bpos = branchy_positions(config, net)
    saved = os.path.join(workdir, "config.json")
    if os.path.exists(saved):
        with open(saved) as fh:
            old = json.load(fh)
        if old != json.loads(config.to_json()):
            raise ValueError(
                f"{workdir} holds a FlexDNN run with a different config; use a new --workdir"
            )
    return {"config": config, "positions": positions, "branchy_positions": bpos}


# ---------------------------------------------------------------------------
# Stages.
# ---------------------------------------------------------------------------


def load_frames(config, log) -> dict:
    """The clips: train (tiles, mirrored when ``lite.flips``), val and test, with labels."""
    train_cfg, eval_cfg = clip_configs(config)
    t0 = time.monotonic()
    tr = clips_lib.load_clips(train_cfg)
    ev = clips_lib.load_clips(eval_cfg)
    for name, split in (("train", tr.train), ("val", ev.val), ("test", ev.test)):
        if not len(split):
            raise flexdnn.FlexDNNError(f"the {name} clips yield no frame (lite.clips.max_frames?)")
    x_train = tr.train.frames
    if config.lite.flips:
        x_train = np.concatenate([x_train, x_train[:, :, ::-1]])
    decoded = sorted({*tr.decoded, *ev.decoded})
    log(
        f"clips ({time.monotonic() - t0:.0f} s, decoded {decoded or 'none: all cached'}): "
        f"train {len(x_train)} samples ({len(tr.train)} tiles x "
        f"{2 if config.lite.flips else 1}), val {len(ev.val)}, test {len(ev.test)} frames"
    )
    return {"train": x_train, "val": ev.val, "test": ev.test,
            "train_frames": int(len(set(zip(tr.train.clip, tr.train.frame)))),
            "train_tiles": int(len(tr.train))}  # fmt: skip


def with_stills(config, x_train: np.ndarray, log) -> np.ndarray:
    """`x_train` plus ``lite.stills`` random crops of still images (`flexjax.data.stills`)."""
    n = int(config.lite.get("stills", 0))
    if not n:
        return x_train
    crops = stills.load_stills(n, int(config.lite.image_size))
    log(f"train: + {n} crops of {len(stills.still_paths())} still images (lite.stills)")
    return np.concatenate([x_train, crops])


def candidate_net(config, backbone: Net, positions) -> Net:
    shapes = backbone.shapes()
    f = config.flexdnn
    heads = []
    for p in positions:
        if config.lite.head == "separable":
            layers = flexdnn.separable_head(
                shapes[p][1], backbone.num_classes, int(f.head_features), int(f.head_convs)
            )
        else:
            layers = flexdnn.candidate_head(
                shapes[p][1], backbone.num_classes, int(f.head_features), int(f.head_convs)
            )
        heads.append(Exit(p, layers))
    return backbone.replace(exits=tuple(heads), name=f"{backbone.name}_flexdnn")


def _settings(config, steps: int) -> de.DistillSettings:
    lite = config.lite
    return de.DistillSettings(
        steps=int(steps), batch_size=int(lite.distill_batch_size),
        learning_rate=float(lite.distill_learning_rate), temperature=float(lite.temperature),
        seed=int(config.seed),
    )  # fmt: skip


def search_all(config, cnet, cvars, cache, val_labels, workdir, log):
    """Searches (or reloads) every candidate exit on the cached features."""
    f, lite = config.flexdnn, config.lite
    teacher = cache.logits("train")
    yt = teacher.argmax(-1).astype(np.int32)
    separable = lite.head == "separable"

    def search_one(e):
        xt = np.asarray(cache.features("train", e.after))
        xv = np.asarray(cache.features("val", e.after))
        log(f"searching {e.name} (position {e.after}, input {tuple(xt.shape[1:])})")
        return flexdnn.search_exit(
            flexdnn.head_net(cnet, e.name), flexdnn.head_variables(cvars, e.name),
            (xt, yt), (xv, val_labels), delta=float(f.delta),
            prune_fraction=float(f.prune_fraction), min_filters=int(f.min_filters),
            finetune_steps=int(f.finetune_steps), learning_rate=float(f.finetune_lr),
            max_trials=int(f.max_trials), batch_size=int(lite.distill_batch_size),
            seed=int(config.seed), log=log,
            prune=flexdnn.prune_separable if separable else None,
            sites=flexdnn.separable_sites if separable else None,
            teacher=teacher, distill_weight=float(lite.distill_weight),
            temperature=float(lite.temperature),
        )  # fmt: skip

    return search_or_load(cnet, cvars, workdir, search_one)


def export_config(config) -> ml_collections.ConfigDict:
    """The training-config sections `export.bundle` reads (data, video, exits, calibration)."""
    _, eval_cfg = clip_configs(config)
    c = ml_collections.ConfigDict()
    data = {k: v for k, v in eval_cfg.to_dict().items() if k != "files"}
    c.data = ml_collections.ConfigDict({"name": "clips", **data})
    c.video = ml_collections.ConfigDict({"enabled": False})
    c.exits = ml_collections.ConfigDict(
        {"criterion": config.exits.criterion, "epsilon": float(config.exits.epsilon)}
    )
    c.calibration = config.calibration
    c.lite = config.lite
    return c


def export_bundle(config, net, variables, splits, out, log) -> None:
    """A flexjax bundle, thresholds calibrated on the val clips against measured ms."""
    # lazy: TensorFlow (through the converter) is slow to import
    from export.bundle import MEASURED_MS, calibrate, export_model
    from export.staging import rewrite_manifest
    from pipelines.flexdnn_bench import EarlyExitSystem

    ecfg = export_config(config)
    e = config.lite.export
    export_model(
        ecfg, net, variables, out, source=os.path.abspath(out), precision="fp32",
        parity_examples=min(int(e.parity_examples), len(splits.test.x)),
        # every sweep point of the benchmark (exits.EPSILONS) plus the config's own
        epsilons=sorted({*exits_lib.EPSILONS, *map(float, e.epsilons)}), splits=splits,
        overwrite=True, log=log,
    )  # fmt: skip
    sy = EarlyExitSystem(out)
    f = config.flexdnn
    sy.measure(splits.val.x[0], int(f.timing_rounds), int(f.timing_calls))
    manifest = json.loads(json.dumps(sy.bundle.manifest))
    n = int(manifest["test"]["examples"])
    calibrate(
        manifest, sy.ex, ecfg, splits, exit_costs=sy.exit_ms(), cost=MEASURED_MS,
        epsilons=[r["epsilon"] for r in manifest["calibrations"]],
        test_logits=sy.ex.all_logits(splits.test.x[:n]),
    )  # fmt: skip
    rewrite_manifest(out, manifest)
    thr = manifest["calibration"]["thresholds"]
    log(f"calibrated {os.path.basename(out)} on measured ms: {thr}")


def _save_npz(path: str, x: np.ndarray, y: np.ndarray) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)


def _agreements(net, variables, cache, labels: dict) -> dict:
    """Per split, each exit's agreement with the reference and with the backbone's top-1."""
    out = {}
    for split in ("val", "test"):
        logits = de.exit_logits(net, variables, cache, split)
        out[split] = {
            "frames": int(len(labels[split])),
            "reference": de.agreement(logits, labels[split]),
            "backbone": de.agreement(logits, logits[FINAL].argmax(-1)),
        }
    return out


def equal_accuracy(
    bench_rows: dict, backbone_accuracy: float, backbone_ms: float, own_backbone_ms: dict
) -> dict:
    """Expected ms per frame read off each system's threshold sweep at backbone - 0.5/1/2 points.

    Sweep points are the bundle's calibrations (val) simulated on the test
    frames, costed with the measured signature times; a system whose best
    point stays below the target accuracy gets None. The backbone's is its
    measured ``full`` signature time. Each system's signatures are timed in a
    run of their own, so ``<name>_vs_backbone`` divides by the sum of that
    system's own segments (its backbone, timed in the same run): the ratio
    to trust under a noisy load.
    """
    out = {}
    for points in (0.5, 1.0, 2.0):
        target = backbone_accuracy - points / 100.0
        row = {"target_accuracy": target, "backbone": backbone_ms}
        for name, r in bench_rows.items():
            if "sweep" not in r:
                continue
            ok = [p["expected_ms"] for p in r["sweep"] if p["accuracy"] >= target - 1e-12]
            row[name] = min(ok) if ok else None
            row[f"{name}_vs_backbone"] = min(ok) / own_backbone_ms[name] if ok else None
        out[f"-{points:g}"] = row
    return out


def run(config, workdir: str, log: Callable[[str], None] = print) -> dict:
    """Every stage of the job (module docstring); returns the report."""
    t_start = time.monotonic()
    s = prepare(config, workdir)
    config = s["config"]
    f, lite = config.flexdnn, config.lite
    os.makedirs(workdir, exist_ok=True)
    write_json_atomic(os.path.join(workdir, "config.json"), json.loads(config.to_json()))

    # Wall and process CPU seconds (all threads) of every stage (a resumed stage counts its
    # reload), in report["timing"]: under a shared load the CPU time is the one to compare.
    stages: dict[str, float] = {}
    stages_cpu: dict[str, float] = {}
    mark = [time.monotonic(), time.process_time()]

    def lap(stage: str) -> None:
        now, cpu = time.monotonic(), time.process_time()
        stages[stage] = stages.get(stage, 0.0) + now - mark[0]
        stages_cpu[stage] = stages_cpu.get(stage, 0.0) + cpu - mark[1]
        mark[:] = [now, cpu]

    # 1. Backbone, clips, the feature cache.
    backbone, bvars = pretrained.load(lite.backbone, int(lite.image_size))
    lap("backbone_load")
    data = load_frames(config, log)
    lap("clips")
    val, test = data["val"], data["test"]
    positions = s["positions"]
    bpos = s["branchy_positions"]
    frames = {"train": with_stills(config, data["train"], log), "val": val.frames,
              "test": test.frames}  # fmt: skip
    t0 = time.monotonic()
    cache = feature_cache.build(
        backbone, bvars, frames, sorted({*positions, *bpos}), os.path.join(workdir, "features"),
        batch_size=int(lite.feature_batch), log=log,
    )  # fmt: skip
    feature_s = time.monotonic() - t0
    del frames, data["train"]
    labels = {"val": val.labels.astype(np.int64), "test": test.labels.astype(np.int64)}
    backbone_top1 = {sp: cache.logits(sp).argmax(-1) for sp in ("val", "test")}
    lap("feature_cache")

    # 2. Candidate exits distilled on the cached train features.
    cnet = candidate_net(config, backbone, positions)
    cdir = os.path.join(workdir, "candidates")
    found = checkpoint.load_saved(cdir, cnet)
    if found is None:
        log(f"distilling {len(cnet.exits)} candidate exits at {positions} "
            f"({lite.distill_steps} steps each)")  # fmt: skip
        cvars, closs = de.train_heads(cnet, bvars, cache, _settings(config, lite.distill_steps),
                                      log=log)  # fmt: skip
        checkpoint.save_model(cdir, cnet, cvars, json_files={"losses.json": closs})
    else:
        cvars = found[1]
    cand_acc = _agreements(cnet, cvars, cache, labels)
    lap("distill_candidates")

    # 3. The search, on the cached features.
    # The val labels the search, the thresholds and the plan read (lite.calibrate_on).
    cal_val = labels["val"] if lite.calibrate_on == "reference" else backbone_top1["val"]
    snet, svars, search = search_all(config, cnet, cvars, cache, cal_val, workdir, log)
    lap("search")

    # 4. Measured costs of every segment and head signature.
    x_probe = clips_lib.to_float(val.frames[:1])
    measured = measure_costs(snet, svars, x_probe, workdir, int(f.timing_rounds),
                             int(f.timing_calls), log)  # fmt: skip
    sig = measured["signature_ms"]
    names = [e.name for e in snet.exits]
    head_ms = [sig[head_name(n)] for n in names]
    seg_ms = [sig[segment_name(n)] for n in names] + [sig[segment_name(FINAL)]]
    lap("measured_costs")

    # 5. Thresholds on the val clips + the R plan.
    crit, eps = config.exits.criterion, float(config.exits.epsilon)
    val_logits = de.exit_logits(snet, svars, cache, "val")
    plan = flexdnn.plan_exits(
        val_logits, cal_val, names, head_ms, seg_ms, criterion=crit, epsilon=eps,
        calibration=config_lib.calibration_options(config),
    )  # fmt: skip
    log(f"insertion plan: kept {list(plan.kept)}, removed (in order) {list(plan.removed)}")
    fnet, fvars = flexdnn.keep_exits(snet, svars, plan.kept)
    final_dir = os.path.join(workdir, "final")
    if checkpoint.load_saved(final_dir, fnet) is None:
        checkpoint.save_model(final_dir, fnet, fvars, export_config(config).to_dict())
    lap("plan")

    # 6. BranchyNet (frozen protocol): its heads on the same cached features, same steps.
    branchy_steps = int(lite.distill_steps) + int(f.max_trials) * int(f.finetune_steps)
    bnet = de.attach(backbone, bpos, de.head_layers("conv_pool_dense", backbone.num_classes,
                                                    int(lite.branchy_features)))  # fmt: skip
    branchy_dir = os.path.join(workdir, "branchy")
    found = checkpoint.load_saved(branchy_dir, bnet)
    if found is None:
        log(f"distilling BranchyNet heads at {bpos} ({branchy_steps} steps each)")
        brvars, _ = de.train_heads(bnet, bvars, cache, _settings(config, branchy_steps), log=log)
        checkpoint.save_model(branchy_dir, bnet, brvars, export_config(config).to_dict())
    else:
        brvars = found[1]
    branchy_acc = _agreements(bnet, brvars, cache, labels)
    lap("branchynet")

    # 7. Bundles (val-calibrated on measured ms) and the benchmark's frames.
    splits = Splits(
        Dataset(clips_lib.to_float(val.frames[:1]), cal_val[:1]),  # not read: fp32, no cuts
        Dataset(clips_lib.to_float(val.frames), cal_val),
        Dataset(clips_lib.to_float(test.frames), labels["test"]),
        backbone.num_classes, tuple(backbone.input_shape), "clips",
    )  # fmt: skip
    bdir = os.path.join(workdir, "bundles")
    t0 = time.monotonic()
    for name, (n, v) in {"flexdnn": (fnet, fvars), "branchynet": (bnet, brvars)}.items():
        out = os.path.join(bdir, name)
        if not _bundle_current(out, n):
            export_bundle(config, n, v, splits, out, log)
    export_s = time.monotonic() - t0
    lap("export")
    _save_npz(os.path.join(workdir, TEST_FRAMES), splits.test.x, splits.test.y)
    _save_npz(os.path.join(workdir, TEST_FRAMES_BACKBONE), splits.test.x, backbone_top1["test"])

    # 8. One interleaved LiteRT run: backbone (full), FlexDNN, BranchyNet on the test clips.
    systems = {
        "backbone": EarlyExitSystem(os.path.join(bdir, "flexdnn"), full=True),
        "flexdnn": EarlyExitSystem(os.path.join(bdir, "flexdnn")),
        "branchynet": EarlyExitSystem(os.path.join(bdir, "branchynet")),
    }
    for sy in systems.values():
        sy.measure(splits.val.x[0], int(f.timing_rounds), int(f.timing_calls))
    lap("bench_signature_times")
    limit = int(f.bench_frames) or len(splits.test.y)
    test_ds = Dataset(splits.test.x[:limit], splits.test.y[:limit])
    bench = benchmark(systems, {"test": ("val", test_ds)}, crit, eps, int(f.bench_rounds), log)
    lap("bench_interleaved")
    rows = bench["test"]["systems"]

    # Agreement with the backbone's own top-1, same thresholds, same frames.
    top1 = backbone_top1["test"][:limit]
    for name, sy in systems.items():
        if sy.full:
            pred = sy.ex.all_logits(test_ds.x)[FINAL].argmax(-1)
            rows[name]["backbone_agreement"] = float((pred == top1).mean())
        else:
            logits = sy.ex.all_logits(test_ds.x)
            st = exits_lib.simulate(logits, top1, rows[name]["thresholds"], crit, None, sy.names)
            rows[name]["backbone_agreement"] = st.accuracy
            rows[name]["sweep_backbone"] = sweep(sy, "val", logits, top1, crit)

    # 9. R of every kept exit re-measured on the test clips with the shipped thresholds.
    fsys = systems["flexdnn"]
    side = fsys.names[:-1]
    thr = rows["flexdnn"]["thresholds"]
    passes = flexdnn.passes_matrix(fsys.ex.all_logits(test_ds.x), side, thr, crit)
    r_test = flexdnn.r_values(passes, range(len(side)), fsys.head_ms, fsys.seg_ms)
    r_test = {side[j]: v for j, v in r_test.items()}

    backbone_ms = systems["backbone"].sig_ms.get("full", float(sum(fsys.seg_ms)))
    own = {n: float(sum(sy.seg_ms)) for n, sy in systems.items() if not sy.full}
    eq = equal_accuracy(rows, rows["backbone"]["accuracy"], backbone_ms, own)
    bb_rows = {n: {"sweep": r["sweep_backbone"]} for n, r in rows.items() if "sweep_backbone" in r}
    eq_bb = equal_accuracy(bb_rows, 1.0, backbone_ms, own)
    candidates = []
    nc = costs.of(snet)
    for j, e in enumerate(snet.exits):
        candidates.append({
            "name": e.name, "position": e.after,
            "over_parameterized": {
                "layers": [x.to_dict() for x in cnet.get_exit(e.name).layers],
                "flops": costs.of(cnet).heads[e.name].flops,
                "test_reference_agreement": cand_acc["test"]["reference"][e.name],
                "test_backbone_agreement": cand_acc["test"]["backbone"][e.name],
                "val_reference_agreement": cand_acc["val"]["reference"][e.name],
            },
            "architecture": [x.to_dict() for x in e.layers],
            "search": search[e.name],
            "flops": nc.heads[e.name].flops,
            "latency_ms": head_ms[j],
            "segment_latency_ms": seg_ms[j],
            "R_by_round": [r["R"].get(e.name) for r in plan.rounds],
            "kept": e.name in plan.kept,
            "removed_at": plan.removed.index(e.name) + 1 if e.name in plan.removed else None,
        })  # fmt: skip
    report: dict[str, Any] = {
        "net": backbone.name,
        "dataset": "clips",
        "criterion": crit,
        "epsilon": eps,
        "delta": float(f.delta),
        "calibration": config_lib.calibration_options(config),
        "data": {
            "train_samples": int(cache.index["frames"]["train"]),
            "train_frames": data["train_frames"],
            "train_tiles": data["train_tiles"],
            "train_mirrored": bool(lite.flips),
            "train_stills": int(lite.get("stills", 0)),
            "val_frames": int(len(val)),
            "test_frames": int(len(test)),
            "clips": {sp: list(getattr(lite.clips, sp)) for sp in SPLITS},
            "fps": {"train": float(lite.clips.train_fps), "val_test": float(lite.clips.fps)},
            "reference": lite.clips.reference,
        },  # fmt: skip
        "backbone_agreement_with_reference": {
            sp: float((backbone_top1[sp] == labels[sp]).mean()) for sp in ("val", "test")
        },
        "candidates": candidates,
        "final_segment_latency_ms": seg_ms[-1],
        "plan": {
            "kept": list(plan.kept),
            "removal_order": list(plan.removed),
            "rounds": list(plan.rounds),
            "thresholds": plan.thresholds,
            "data": "val clips (reference labels)",
        },  # fmt: skip
        "R_remeasured_on_test": {"test": r_test},
        "branchynet": {
            "protocol": "frozen pretrained backbone; conv1x1-pool-dense heads distilled on the "
            "same cached features (KL at T) for distill_steps + max_trials * finetune_steps steps",
            "positions": bpos,
            "steps": branchy_steps,
            "agreement": branchy_acc,
        },
        "benchmark": bench,
        "calibrated_on": f"val clips, {lite.calibrate_on} labels",
        "equal_accuracy_expected_ms": eq,
        "equal_accuracy_backbone_agreement_expected_ms": eq_bb,
        "signature_ms": {n: sy.sig_ms for n, sy in systems.items()},
        "timing": {
            "feature_cache_s": feature_s,
            "export_s": export_s,
            "stages_s": stages,
            "stages_cpu_s": stages_cpu,
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
    }
    report["targets"] = targets(report)
    lap("agreement_R_report")
    report["job_seconds"] = time.monotonic() - t_start
    report["load_average"] = list(os.getloadavg())
    write_json_atomic(os.path.join(workdir, "report.json"), report)
    text = format_report(report)
    with open(os.path.join(workdir, "report.txt.tmp"), "w") as fh:
        fh.write(text + "\n")
    os.replace(os.path.join(workdir, "report.txt.tmp"), os.path.join(workdir, "report.txt"))
    return report


def _bundle_current(out: str, net: Net) -> bool:
    try:
        b = Bundle.from_dir(out)
    except (BundleError, FileNotFoundError, ValueError):
        return False
    return (
        b.manifest.get("net") == net.to_dict()
        and b.manifest.get("calibration", {}).get("cost") == "measured_ms"
    )


def targets(report: dict) -> dict:
    """The issue's targets for this job, met or missed (single operating point, test clips)."""
    s = report["benchmark"]["test"]["systems"]
    ms = {n: r["time_per_frame"]["mean_ms"] for n, r in s.items()}
    r = report["R_remeasured_on_test"]["test"]
    loss = s["backbone"]["accuracy"] - s["flexdnn"]["accuracy"]
    return {
        "accuracy_loss_vs_backbone": loss,
        "accuracy_loss_ok": loss <= 0.01 + 1e-12,
        "time_vs_backbone": ms["flexdnn"] / ms["backbone"],
        "time_vs_backbone_ok": ms["flexdnn"] / ms["backbone"] <= 0.6,
        "time_vs_branchynet": ms["flexdnn"] / ms["branchynet"],
        "time_vs_branchynet_ok": ms["flexdnn"] / ms["branchynet"] <= 0.72,
        "branchynet_accuracy_loss_vs_backbone": s["backbone"]["accuracy"]
        - s["branchynet"]["accuracy"],
        "kept_R_on_test": r,
        "kept_R_above_1": bool(r) and all(v > 1 for v in r.values()),
        "exits_kept": len(r),
        # The interleaved threshold-sweep comparison (runtime.equal_accuracy), per reference.
        "equal_accuracy": _equal_accuracy_targets(report["benchmark"]["test"]),
    }


def _equal_accuracy_targets(bench: dict) -> dict:
    """`flexdnn_bench.equal_accuracy_targets` for every reference the benchmark compared on."""
    eq = bench.get("equal_accuracy")
    if not eq:
        return {}
    return {ref: equal_accuracy_targets(eq, ref) for ref in eq.get("headline", {})}


def format_report(report: dict) -> str:
    d = report["data"]
    lines = [
        f"FlexDNN on a frozen {report['net']} over the real clips (delta={report['delta']}, "
        f"epsilon={report['epsilon']}, criterion={report['criterion']}, "
        f"calibration={report['calibration']['method']})",
        f"data: train {d['train_samples']} samples ({d['train_frames']} frames, "
        f"{d['train_tiles']} tiles{', mirrored' if d['train_mirrored'] else ''}), "
        f"val {d['val_frames']}, test {d['test_frames']} frames; labels: {d['reference']} top-1",
        "backbone agreement with the reference: "
        + ", ".join(f"{k} {v:.3f}" for k, v in report["backbone_agreement_with_reference"].items()),
        f"{'exit':<9}{'pos':>4}{'MFLOPs':>8}{'ms':>8}  {'test agr ref/bb (over-param)':>28}"
        f"  {'R by round':<18} kept",
    ]
    for c in report["candidates"]:
        o = c["over_parameterized"]
        rs = " ".join("-" if r is None else f"{r:.2f}" for r in c["R_by_round"])
        kept = "yes" if c["kept"] else f"removed #{c['removed_at']}"
        lines.append(
            f"{c['name']:<9}{c['position']:>4}{c['flops'] / 1e6:>8.2f}{c['latency_ms']:>8.3f}"
            f"  {o['test_reference_agreement']:>13.3f} / {o['test_backbone_agreement']:.3f}"
            f"        {rs:<18} {kept}"
        )
    br = report["branchynet"]
    lines.append(
        f"BranchyNet ({br['steps']} steps/head at {br['positions']}) test agreement ref/bb: "
        + ", ".join(
            f"{n} {br['agreement']['test']['reference'][n]:.3f}/"
            f"{br['agreement']['test']['backbone'][n]:.3f}"
            for n in br["agreement"]["test"]["reference"] if n != FINAL
        )
    )  # fmt: skip
    b = report["benchmark"]["test"]
    lines.append(f"test clips ({b['frames']} frames, {b['rounds']} interleaved rounds, LiteRT, "
                 "1 thread):")  # fmt: skip
    for name, row in b["systems"].items():
        lines.append(
            f"  {name:<11} agreement ref {row['accuracy']:.4f} bb {row['backbone_agreement']:.4f}"
            f"  {row['time_per_frame']['mean_ms']:.3f} ms/frame  "
            f"{row['ratio_vs_backbone']:.3f}x backbone"
        )
    rows_eq = [("reference", k, row) for k, row in report["equal_accuracy_expected_ms"].items()]
    rows_eq += [
        ("backbone top-1", k, row)
        for k, row in report.get("equal_accuracy_backbone_agreement_expected_ms", {}).items()
    ]
    on = report.get("calibrated_on", "val clips, reference labels")
    lines.append(f"equal accuracy (expected ms from the sweeps calibrated on the {on}, on test):")
    for metric, k, row in rows_eq:

        def fmt(v):
            return "none reaches it" if v is None else f"{v:.3f}"

        def ratio(v):
            return "-" if v is None else f"{v:.3f}x"

        lines.append(
            f"  {metric}: backbone {k} pt (>= {row['target_accuracy']:.4f}): backbone "
            f"{row['backbone']:.3f}, flexdnn {fmt(row.get('flexdnn'))} "
            f"({ratio(row.get('flexdnn_vs_backbone'))}), branchynet "
            f"{fmt(row.get('branchynet'))} ({ratio(row.get('branchynet_vs_backbone'))}) ms"
        )
    t = report["targets"]

    def ok(key: str) -> str:
        return "ok" if t[key] else "MISSED"

    lines.append(
        f"targets: accuracy loss {t['accuracy_loss_vs_backbone']:+.4f} ({ok('accuracy_loss_ok')}),"
        f" {t['time_vs_backbone']:.3f}x backbone ({ok('time_vs_backbone_ok')}, <= 0.6),"
        f" {t['time_vs_branchynet']:.3f}x BranchyNet ({ok('time_vs_branchynet_ok')}, <= 0.72),"
        f" exits kept {t['exits_kept']}, R on test "
        + (", ".join(f"{k} {v:.2f}" for k, v in t["kept_R_on_test"].items()) or "-")
        + f" ({ok('kept_R_above_1')})"
    )
    for ref, e in t.get("equal_accuracy", {}).items():

        def x(v):
            return "-" if v is None else f"{v:.3f}x"

        def verdict(v):
            return {True: "ok", False: "MISSED", None: "undetermined"}[v]

        ms = ", ".join(f"{n} {v:.3f}" if v else f"{n} not reached" for n, v in e["ms"].items())
        lines.append(
            f"interleaved equal accuracy ({ref}, backbone - {e['drop'] * 100:g} pt): ms {ms}"
            f"; FlexDNN {x(e['time_vs_backbone'])} backbone "
            f"({verdict(e['time_vs_backbone_ok'])}), {x(e['time_vs_branchynet'])} BranchyNet "
            f"({verdict(e['time_vs_branchynet_ok'])})"
        )
    st = report.get("timing", {}).get("stages_s", {})
    cpu = report.get("timing", {}).get("stages_cpu_s", {})
    if st:
        lines.append(
            "stages, wall / process CPU s: "
            + ", ".join(f"{k} {v:.0f}/{cpu.get(k, float('nan')):.0f}" for k, v in st.items())
        )
    lines.append(
        f"job {report['job_seconds']:.0f} s, load average "
        + " ".join(f"{x:.1f}" for x in report["load_average"])
    )
    return "\n".join(lines)
