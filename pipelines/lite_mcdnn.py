"""MCDNN on the EfficientNet-Lite catalog: tasks and sharing, specialization, AMS (issue 15, 2-4).

`run(config, workdir)` (``python -m train.lite_mcdnn``; schema
`flexjax.config.lite_mcdnn_defaults`, example ``configs/clips_lite_mcdnn.py``):

1. **catalog**: the real lite catalog (`pipelines.lite_catalog`): read from
   ``catalog_dir`` or built / resumed under ``<workdir>/catalog``;
2. **tasks and sharing** (item 2): the 1000-way task plus coarse tasks that
   group ImageNet class ids (`check_tasks`); Lite0's stem (positions
   0 .. L-2, the pooled 1280-d features) is frozen and shared, each task has
   one dense head (the coarse ones fitted on cached features of the training
   and validation clips). Exported as ``shared/`` (``stem.tflite``, one
   ``head_<task>.tflite`` each, ``shared.json``) and run by
   `runtime.mcdnn.SharedStem`; per-task accuracy = agreement with the test
   clips' reference labels mapped to the task; the time per frame of the shared
   stem + heads vs one full model per task, interleaved in one LiteRT run;
3. **specialization** (item 3): on one real clip, the skew detector
   (`runtime.skew`) reads the general model's LiteRT top-1 frame by frame;
   when the last ``window`` results are (n, p)-dominated, a cheap Lite0 stem
   (lower resolution, int8) is retargeted: its penultimate features of the
   frames seen so far (forwarded at specialization time, timed) and of the
   training clips' frames (pre-forwarded offline) train an (n + 1)-way head
   (`flexjax.specialize.fit_last_layer`, timed, JIT compilation included); the
   rest of the clip runs the cascade (specialized first, the general model on
   "other"), timed interleaved with the general model alone. With
   ``specialize.min_other`` > 0 the general model keeps running after the
   detection until the clip itself has shown that many frames outside the
   dominant classes (`specialization_point`, at most ``max_wait`` frames), so
   the head learns the clip's own "other"; the detection-time head is fitted
   too and both are scored on the same frames;
4. **AMS over a day** (item 4): every catalog variant is an option of every
   app (task), with its measured latency / bytes / load time / energy and its
   accuracy on that task; `runtime.ams` serves day traces (one per seed) under
   each energy budget with every policy, and the offline optimum; targets
   and the Fig. 11 analogue (``fig11.png``); the Pareto plots per task
   (``pareto_<task>.png``: agreement vs bytes / FLOPs / latency / energy).
   pace gets a prior on the day's request rate: the mean rate of past days
   (`PACE_HISTORY_SEEDS`, never a reported seed).

Writes ``report.json`` (and the stage files named above) in `workdir`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from export import convert
from flexjax import config as config_lib
from flexjax import specialize
from flexjax.data import clips as clips_lib
from flexjax.io import sha256_file, write_json_atomic
from flexjax.models import layer_name, pretrained
from flexjax.spec import FINAL, Net, dense
from pipelines import lite_catalog
from pipelines.mcdnn_report import plot_fig11, plot_pareto
from runtime import ams
from runtime import traces as traces_lib
from runtime.lite import Model
from runtime.mcdnn import SharedStem, time_interleaved
from runtime.names import FULL, SHARED_MANIFEST
from runtime.skew import scan, skew_init, skew_update

IMAGENET = "imagenet"  # the 1000-way task: Lite0's own classifier
NUM_CLASSES = clips_lib.IMAGENET_CLASSES
STEM_MODEL = "efficientnet_lite0"
REPORT = "report.json"
SPEC_WEIGHTS = ("fp32", "int8")
FIT_EXAMPLES = 1024  # rows the specialized head is fitted on (a fixed shape: compiled once)
# Issue 15's AMS targets (at budgets where Best-Model serves under half the requests).
AMS_SERVED_X, AMS_MAX_REGRET, AMS_WINS = 4.0, 0.05, 4
# pace's prior on the day's request rate: the mean rate of these past days (trace seeds that
# are never among the reported ones; chosen on validation seeds 10-29, BENCHMARKS.md)
PACE_HISTORY_SEEDS = tuple(range(100, 120))
PACE_OPTIONS = {"prior_days": 1.0}


# ---------------------------------------------------------------------------
# Config.
# ---------------------------------------------------------------------------


def parse_ids(spec: Any, where: str) -> tuple[int, ...]:
    """Class ids from ints and ``"lo-hi"`` / ``"a,b"`` strings, each checked against 0..999.

    Raises:
      ValueError: an id out of range, a malformed range, an empty group.
    """
    items = [spec] if isinstance(spec, (int, str)) else list(spec)
    out: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError(f"{where}: class id {item!r} is not an int")
        if isinstance(item, int):
            out.append(item)
            continue
        if not isinstance(item, str):
            raise ValueError(f"{where}: class id {item!r} is not an int or a 'lo-hi' range")
        for part in (p.strip() for p in item.split(",") if p.strip()):
            lo, dash, hi = part.partition("-")
            try:
                a, b = (int(lo), int(hi)) if dash else (int(part), int(part))
            except ValueError:
                raise ValueError(
                    f"{where}: {part!r} is not a class id or a 'lo-hi' range"
                ) from None
            if b < a:
                raise ValueError(f"{where}: range {part!r} is empty (hi < lo)")
            out.extend(range(a, b + 1))
    bad = [i for i in out if not 0 <= i < NUM_CLASSES]
    if bad:
        raise ValueError(
            f"{where}: class id {bad[0]} is out of range; ImageNet ids are 0..{NUM_CLASSES - 1}"
        )
    if not out:
        raise ValueError(f"{where}: no class ids")
    return tuple(sorted(set(out)))


def check_tasks(tasks: Sequence[Any]) -> dict[str, dict[str, tuple[int, ...]]]:
    """``{task: {group: ids}}`` for the coarse tasks (the 1000-way task is implicit).

    Raises:
      ValueError: a malformed entry, a bad or repeated name, an empty task,
        class ids out of 0..999, or a class in two groups of one task.
    """
    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for i, t in enumerate(tasks):
        if not hasattr(t, "keys") or set(t.keys()) != {"name", "groups"}:
            raise ValueError(f"tasks[{i}] must be {{'name': ..., 'groups': {{...}}}}, got {t!r}")
        name = str(t["name"])
        if not name.isidentifier() or name in out or name == IMAGENET:
            raise ValueError(
                f"tasks[{i}]: name {name!r} must be a new identifier other than {IMAGENET!r}"
            )
        groups = t["groups"]
        if not hasattr(groups, "items") or not groups:
            raise ValueError(f"task {name!r}: groups must be a non-empty {{group: ids}} mapping")
        seen: dict[int, str] = {}
        parsed: dict[str, tuple[int, ...]] = {}
        for g, ids in groups.items():
            g = str(g)
            if g == "other":
                raise ValueError(f"task {name!r}: 'other' is implicit (every class in no group)")
            parsed[g] = parse_ids(ids, f"task {name!r} group {g!r}")
            for c in parsed[g]:
                if c in seen:
                    raise ValueError(f"task {name!r}: class {c} is in groups {seen[c]!r} and {g!r}")
                seen[c] = g
        if len(seen) >= NUM_CLASSES:
            raise ValueError(f"task {name!r}: its groups cover every class; nothing is 'other'")
        out[name] = parsed
    return out


def task_lut(groups: Mapping[str, Sequence[int]] | None) -> np.ndarray:
    """int32 [1000]: ImageNet class -> the task's class (group index; "other" = len(groups))."""
    if groups is None:  # the 1000-way task
        return np.arange(NUM_CLASSES, dtype=np.int32)
    lut = np.full(NUM_CLASSES, len(groups), np.int32)
    for k, ids in enumerate(groups.values()):
        lut[np.asarray(ids)] = k
    return lut


def task_classes(groups: Mapping[str, Sequence[int]] | None) -> list[str]:
    return [str(i) for i in range(NUM_CLASSES)] if groups is None else [*groups, "other"]


def validate(config: ml_collections.ConfigDict):
    """``(config, catalog_config, tasks)``, every value checked before any work.

    Raises:
      ValueError: bad keys / values, a bad catalog config, task groups with
        ids out of range, a budget that is not a finite non-negative number
        of joules or multiple of Original's need.
    """
    c = config_lib.validate(config, config_lib.lite_mcdnn_defaults)
    cat = config_lib.validate(config_lib.load(c.catalog_config), config_lib.lite_catalog_defaults)
    lite_catalog.validate(cat)
    o = cat.original
    if o.model != STEM_MODEL or o.weights != "fp32":
        raise ValueError(
            f"the catalog's original must be {STEM_MODEL} fp32 (its stem is shared), got "
            f"{o.model} {o.weights}"
        )
    tasks = check_tasks(c.tasks)
    for split in ("train", "val", "test"):
        c.clips[split] = ",".join(_names(c.clips[split]))
    if not _names(c.clips.test) or not (_names(c.clips.train) or _names(c.clips.val)):
        raise ValueError("clips.test and clips.train or clips.val must name clips")
    _clip_config(c.clips, int(o.resolution), train=True)  # unknown clips: refused here
    s = c.specialize
    _clip_config({**c.clips.to_dict(), "fps": s.fps, "max_frames": s.max_frames},
                 int(o.resolution), train=False, test=(s.clip,))  # fmt: skip
    if s.weights not in SPEC_WEIGHTS:
        raise ValueError(f"specialize.weights must be one of {SPEC_WEIGHTS}, got {s.weights!r}")
    if not 32 <= s.resolution <= o.resolution:
        raise ValueError(
            f"specialize.resolution {s.resolution} must be in [32, {o.resolution}] (the original's)"
        )
    if not 1 <= s.n < NUM_CLASSES or s.steps < 1 or c.heads.steps < 1:
        raise ValueError("specialize.n must be in [1, 999] and specialize.steps, heads.steps >= 1")
    if not 0.0 < s.other_fraction < 1.0:
        raise ValueError(f"specialize.other_fraction must be in (0, 1), got {s.other_fraction}")
    a = c.ams
    if not a.energy or not a.seeds:
        raise ValueError("ams.energy and ams.seeds must not be empty")
    for i, e in enumerate(a.energy):
        try:
            ams.cli.energy_budget(str(e))
        except ValueError as err:
            raise ValueError(
                f"ams.energy[{i}] = {e!r}: an energy budget is joules or a multiple of "
                f"Original's need like '0.3x' (finite, >= 0): {err}"
            ) from None
    if len(set(a.seeds)) != len(a.seeds):
        raise ValueError(f"ams.seeds must be distinct, got {list(a.seeds)}")
    traces_lib.make_day(["a"], **{k: a.trace[k] for k in ("hours", "mean_rate", "bursts")})
    return c, cat, tasks


def _names(v: Any) -> tuple[str, ...]:
    items = v.split(",") if isinstance(v, str) else list(v)
    return tuple(str(n).strip() for n in items if str(n).strip())


def _clip_config(cl, resolution: int, *, train: bool, test=None) -> clips_lib.ClipConfig:
    return clips_lib.ClipConfig(
        train=_names(cl["train"]) + _names(cl["val"]) if train else (),
        val=(), test=_names(cl["test"]) if test is None else tuple(test),
        fps=float(cl["fps"]), max_frames=int(cl["max_frames"]), resolution=int(resolution),
        reference=cl["reference"], reference_resolution=int(cl["reference_resolution"]),
    )  # fmt: skip


def _spread(n: int, k: int) -> np.ndarray:
    """`k` indices spread evenly over [0, n) (all of them if k >= n)."""
    return np.arange(n) if k >= n else np.unique(np.linspace(0, n - 1, k).round().astype(int))


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, R, R, 3] -> [N, size, size, 3] (Pillow bilinear, antialiased; the catalog's)."""
    if frames.shape[1] == size:
        return frames
    out = [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames]
    return np.stack(out).astype(np.uint8)


# ---------------------------------------------------------------------------
# Stage 1: the catalog.
# ---------------------------------------------------------------------------


def catalog_stage(c, cat, workdir: str, log=print) -> tuple[dict, str]:
    """The lite catalog's ``catalog.json`` and its directory (built / resumed if needed)."""
    directory = c.catalog_dir or os.path.join(workdir, "catalog")
    path = os.path.join(directory, lite_catalog.CATALOG)
    if not os.path.isfile(path):
        if c.catalog_dir:
            raise FileNotFoundError(
                f"catalog_dir {c.catalog_dir} has no {lite_catalog.CATALOG} "
                "(run python -m train.lite_catalog there, or leave catalog_dir empty)"
            )
        t0 = time.perf_counter()
        lite_catalog.run(cat, directory, log=log)
        log(f"catalog built in {time.perf_counter() - t0:.0f} s")
    with open(path) as f:
        report = json.load(f)
    if lite_catalog.TASK not in report.get("tasks", {}):
        raise ValueError(f"{path} is not a lite catalog (no tasks.{lite_catalog.TASK})")
    return report, directory


# ---------------------------------------------------------------------------
# Stage 2: tasks and sharing.
# ---------------------------------------------------------------------------


def _task_net(net: Net, task: str, k: int) -> Net:
    layers = (*net.layers[:-1], dense(k, use_bias=True))
    return net.replace(layers=layers, num_classes=k, exits=(), name=f"{net.name}_{task}")


@jax.jit
def _softmax_fit_step(params, opt, feats, targets, lr):
    def loss(p):
        return optax.softmax_cross_entropy(feats @ p[0] + p[1], targets).mean()

    g = jax.grad(loss)(params)
    upd, opt = optax.adam(lr).update(g, opt, params)
    return optax.apply_updates(params, upd), opt


def fit_head(feats: np.ndarray, targets: np.ndarray, steps: int, lr: float) -> tuple:
    """A dense head ``(kernel, bias)`` fitted full-batch (Adam) to soft `targets` [N, k]."""
    k = targets.shape[1]
    prior = np.log(np.clip(targets.mean(0), 1e-4, None)).astype(np.float32)
    params = (jnp.zeros((feats.shape[1], k), jnp.float32), jnp.asarray(prior))
    opt = optax.adam(lr).init(params)
    f, t = jnp.asarray(feats, jnp.float32), jnp.asarray(targets, jnp.float32)
    for _ in range(int(steps)):
        params, opt = _softmax_fit_step(params, opt, f, t, lr)
    return np.asarray(params[0]), np.asarray(params[1])


def _grouped_probs(logits: np.ndarray, lut: np.ndarray, k: int) -> np.ndarray:
    p = np.asarray(jax.nn.softmax(jnp.asarray(logits), -1))
    out = np.zeros((len(p), k), np.float32)
    for j in range(k):
        out[:, j] = p[:, lut == j].sum(1)
    return out


def sharing_stage(c, cat, tasks, workdir: str, log=print) -> dict[str, Any]:
    """Item 2: heads per task on Lite0's frozen stem, SharedStem vs separate models."""
    res = int(cat.original.resolution)
    net, variables = pretrained.load(STEM_MODEL, res)
    t0 = time.perf_counter()
    splits = clips_lib.load_clips(_clip_config(c.clips, res, train=True))
    log(f"clips: {len(splits.train)} training + {len(splits.test)} test frames "
        f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    x_train = clips_lib.to_float(splits.train.frames)
    x_test = clips_lib.to_float(splits.test.frames)
    t0 = time.perf_counter()
    f_train = specialize.penultimate(net, variables, x_train, batch=16)
    f_test = specialize.penultimate(net, variables, x_test, batch=16)
    feat_s = time.perf_counter() - t0
    last = layer_name(len(net.layers) - 1)
    w, b = (np.asarray(variables["params"][last][k]) for k in ("kernel", "bias"))
    logits_train = f_train @ w + b
    logits_test = f_test @ w + b
    heads = {IMAGENET: (w, b)}
    all_tasks = {IMAGENET: None, **tasks}
    acc: dict[str, dict[str, float]] = {}
    fit_s = {}
    for t, groups in all_tasks.items():
        lut = task_lut(groups)
        k = len(task_classes(groups))
        if groups is not None:
            onehot = np.eye(k, dtype=np.float32)[lut[splits.train.labels]]
            teacher = _grouped_probs(logits_train, lut, k)
            t1 = time.perf_counter()
            dw = float(c.heads.distill_weight)
            heads[t] = fit_head(
                f_train, (1.0 - dw) * onehot + dw * teacher, int(c.heads.steps),
                float(c.heads.learning_rate),
            )  # fmt: skip
            fit_s[t] = time.perf_counter() - t1
        y = lut[splits.test.labels]
        grouped = _grouped_probs(logits_test, lut, k).argmax(1)
        acc[t] = {"grouped_1000way": float(np.mean(grouped == y)),
                  "majority_class": float(np.mean(y == np.bincount(y).argmax()))}  # fmt: skip
    # Export: the stem once, a head per task, and one full model per task (the baseline).
    directory = os.path.join(workdir, "shared")
    os.makedirs(directory, exist_ok=True)
    k_stem = len(net.layers) - 1
    stem_plan = convert.SignaturePlan(
        "stem", "segment", 0, k_stem, FINAL, "x", "activation", tuple(net.input_shape),
        (f_train.shape[1],),
    )  # fmt: skip
    t0 = time.perf_counter()
    files = {"stem.tflite": convert.to_tflite(net, variables, [stem_plan])}
    full_paths = {}
    for t, groups in all_tasks.items():
        k = len(task_classes(groups))
        tnet = net if groups is None else _task_net(net, t, k)
        params = {**variables["params"], last: {"kernel": heads[t][0], "bias": heads[t][1]}}
        tvars = {**variables, "params": params}
        plan = convert.SignaturePlan(
            "head", "segment", k_stem, len(tnet.layers), FINAL, "x", "logits",
            (f_train.shape[1],), (k,),
        )  # fmt: skip
        files[f"head_{t}.tflite"] = convert.to_tflite(tnet, tvars, [plan])
        full = [p for p in convert.plan_signatures(tnet) if p.name == FULL]
        full_paths[t] = os.path.join(directory, f"full_{t}.tflite")
        with open(full_paths[t], "wb") as f:
            f.write(convert.to_tflite(tnet, tvars, full))
    for name, buf in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(buf)
    export_s = time.perf_counter() - t0
    manifest = {
        "stem": "stem.tflite",
        "stem_positions": [0, k_stem],
        "heads": {t: f"head_{t}.tflite" for t in all_tasks},
        "files": {n: sha256_file(os.path.join(directory, n)) for n in files},
        "classes": {t: task_classes(g) for t, g in all_tasks.items() if g is not None},
        "groups": {t: {g: list(ids) for g, ids in gs.items()} for t, gs in tasks.items()},
    }
    write_json_atomic(os.path.join(directory, SHARED_MANIFEST), manifest)
    threads = int(c.bench.threads)
    shared = SharedStem(directory, num_threads=threads)
    preds = shared.run_batch(x_test)
    fulls = {t: Model(p, num_threads=threads).signature(FULL) for t, p in full_paths.items()}
    separate_pred = {
        t: np.array([int(np.argmax(s(np.ascontiguousarray(x[None])))) for x in x_test])
        for t, s in fulls.items()
    }
    for t, groups in all_tasks.items():
        y = task_lut(groups)[splits.test.labels]
        acc[t]["shared"] = float(np.mean(preds[t] == y))
        acc[t]["separate"] = float(np.mean(separate_pred[t] == y))
        acc[t]["shared_vs_separate_top1"] = float(np.mean(preds[t] == separate_pred[t]))
    xs = [np.ascontiguousarray(x[None]) for x in x_test[: int(c.bench.frames)]]
    stats = time_interleaved(
        {"separate": lambda x: [s(x) for s in fulls.values()], "shared": shared.run},
        xs, rounds=int(c.bench.rounds), warmup=int(c.bench.warmup),
    )  # fmt: skip
    sep_bytes = sum(os.path.getsize(p) for p in full_paths.values())
    return {
        "tasks": {t: task_classes(g) if g is not None else f"{NUM_CLASSES} classes"
                  for t, g in all_tasks.items()},  # fmt: skip
        "frames": {"train": len(splits.train), "test": len(splits.test),
                   "train_clips": list(splits.train.clips), "test_clips": list(splits.test.clips)},
        "accuracy": acc,
        "time_per_frame_ms": {k: v["mean_ms"] for k, v in stats.items()},
        "time_p50_ms": {k: v["p50_ms"] for k, v in stats.items()},
        "speedup": stats["separate"]["mean_ms"] / stats["shared"]["mean_ms"],
        "bytes": {"separate": sep_bytes, "shared": sum(len(b) for b in files.values())},
        "features_s": feat_s,
        "head_fit_s": fit_s,
        "export_s": export_s,
        "bench": {"frames": len(xs), "rounds": int(c.bench.rounds), "threads": threads},
        "_features": (f_train, logits_train),  # for the specialization stage (not written)
        "_train_frames": splits.train.frames,
    }  # fmt: skip


# ---------------------------------------------------------------------------
# Stage 3: specialization on a real clip.
# ---------------------------------------------------------------------------


def _stem_model(resolution: int, weights: str, calibration: np.ndarray) -> tuple[bytes, Net, dict]:
    net, variables = pretrained.load(STEM_MODEL, resolution)
    k = len(net.layers) - 1
    plan = convert.SignaturePlan(
        "stem", "segment", 0, k, FINAL, "x", "activation", tuple(net.input_shape),
        tuple(net.shapes()[k - 1][1]),
    )  # fmt: skip
    rep = {"stem": calibration} if weights == "int8" else None
    buf = convert.to_tflite(
        net, variables, [plan], precision=weights, representative=rep,
        num_calibration=len(calibration),
    )  # fmt: skip
    return buf, net, variables


def training_rows(
    clip_y: np.ndarray, pool_y: np.ndarray, other: int, other_fraction: float, seed: int
) -> np.ndarray:
    """Rows of ``concat(clip, pool)`` the specialized head is fitted on.

    Every frame of the clip seen so far (in-class or "other", as the general
    model labelled it: the "other" frames of the clip itself are what the head
    must learn to send back) and every in-class pool frame; pool "other"
    frames are added until "other" is `other_fraction` of the rows.
    """
    rng = np.random.default_rng(seed)
    n = len(clip_y)
    pool_other = n + np.flatnonzero(pool_y == other)
    keep = [np.arange(n), n + np.flatnonzero(pool_y != other)]
    inside = int((clip_y != other).sum() + (pool_y != other).sum())
    want = int(round(inside * other_fraction / (1.0 - other_fraction))) - int(
        (clip_y == other).sum()
    )
    if want > 0 and len(pool_other):
        keep.append(rng.choice(pool_other, size=min(want, len(pool_other)), replace=False))
    return np.sort(np.concatenate(keep))


def specialization_point(
    gen_top1: np.ndarray, classes: Sequence[int], first: int, min_other: int, max_wait: int
) -> int:
    """The frame after which the head is fitted: the detection (`first`) or later.

    With ``min_other > 0`` the general model keeps running after the skew is
    detected until the frames seen so far hold `min_other` frames it labels
    outside `classes` (the clip's own negatives), at most `max_wait` frames
    past `first` (0: no limit), and never past the clip's second-to-last frame.
    """
    last = len(gen_top1) - 2
    if min_other <= 0 or first >= last:
        return min(first, last)
    outside = np.cumsum(~np.isin(gen_top1, np.asarray(classes)))
    ok = np.flatnonzero(outside[first:] >= min_other)
    ready = first + int(ok[0]) if len(ok) else last
    if max_wait > 0:
        ready = min(ready, first + max_wait)
    return min(ready, last)


def seen_rows(gen_top1: np.ndarray, classes: Sequence[int], ready: int, window: int) -> np.ndarray:
    """Frames 0..`ready` the head is fitted on: the last `window` and every earlier "other" one.

    Bounded by window + the clip's "other" frames, so the forward pass at
    specialization time does not grow with the wait.
    """
    idx = np.arange(ready + 1)
    recent = idx >= ready + 1 - window
    other = ~np.isin(gen_top1[: ready + 1], np.asarray(classes))
    return idx[recent | other]


def drift_stream(
    gen_top1: np.ndarray,
    start: int,
    head: Callable[[int], int],
    respecialize: Callable[[int, tuple[int, ...]], Callable[[int], int]],
    detector: tuple[int, int, float],
    check_every: int,
    check_window: int,
    check_fail: int,
) -> dict[str, Any]:
    """The clip from frame `start` on with MCDNN-style re-checks (pure given its callables).

    `head(i)` is the specialized model's answer on frame i (a class, or -1 for
    "other": the cascade then runs the general model, whose answers are
    `gen_top1`). Every `check_every`-th specialized frame is also run by the
    general model (a spot check); when `check_fail` of the last
    `check_window` spot checks disagree, the specialization is dropped: the
    general model serves and feeds a fresh skew detector (`detector` =
    window, n, p) until it fires again, and `respecialize(i, classes)` gives
    the new head. Returns the predictions and what each frame cost (runs of
    the cheap model and of the general model).
    """
    pred, cheap_runs, general_runs = [], 0, 0
    checks: list[bool] = []
    events: list[dict[str, Any]] = []
    det = None
    since = 0
    for i in range(start, len(gen_top1)):
        if det is None:  # specialized
            k = head(i)
            cheap_runs += 1
            p = int(gen_top1[i]) if k < 0 else k
            general_runs += int(k < 0)
            since += 1
            if check_every > 0 and since % check_every == 0:
                general_runs += int(k >= 0)  # a fallback frame already ran the general model
                checks.append(p == int(gen_top1[i]))
                if len(checks) >= check_window and (
                    sum(not ok for ok in checks[-check_window:]) >= check_fail
                ):
                    events.append({"frame": i, "event": "drift: back to the general model"})
                    det, checks = skew_init(*detector), []
            pred.append(p)
            continue
        p = int(gen_top1[i])
        general_runs += 1
        det, verdict = skew_update(det, p)
        pred.append(p)
        if verdict is not None and i + 1 < len(gen_top1):
            head = respecialize(i, tuple(verdict))
            events.append({"frame": i, "event": f"re-specialized on {list(verdict)}"})
            det, since = None, 0
    return {"pred": np.asarray(pred, np.int64), "cheap_runs": cheap_runs,
            "general_runs": general_runs, "events": events}  # fmt: skip


def specialization_stage(c, cat, catalog_dir: str, catalog: dict, shared: dict, workdir: str,
                         log=print) -> dict[str, Any]:  # fmt: skip
    """Item 3: skew on a real clip, retargeting on pre-forwarded features, the cascade."""
    s = c.specialize
    res = int(cat.original.resolution)
    threads = int(c.bench.threads)
    clip_cfg = _clip_config(
        {**c.clips.to_dict(), "fps": s.fps, "max_frames": s.max_frames}, res, train=False,
        test=(s.clip,),
    )  # fmt: skip
    frames = clips_lib.load_clips(clip_cfg).test
    labels = frames.labels
    x_gen = clips_lib.to_float(frames.frames)
    rows = catalog["tasks"][lite_catalog.TASK]["variants"]
    orig = next(r for r in rows if r["name"] == catalog["tasks"][lite_catalog.TASK]["original"])
    general = Model(os.path.join(catalog_dir, orig["file"]), num_threads=threads).signature(FULL)
    gen_top1 = np.array([int(np.argmax(general(np.ascontiguousarray(x[None])))) for x in x_gen])
    counts = np.bincount(labels, minlength=NUM_CLASSES)
    top = np.argsort(-counts)[:5]
    out: dict[str, Any] = {
        "clip": s.clip, "frames": int(len(labels)),
        "reference_top5": {str(int(k)): int(counts[k]) for k in top if counts[k]},
        "general": orig["name"], "window": int(s.window), "n": int(s.n), "p": float(s.p),
    }  # fmt: skip
    _, verdicts = scan(skew_init(int(s.window), int(s.n), float(s.p)), gen_top1.tolist())
    first = next((i for i, d in enumerate(verdicts) if d is not None), None)
    if first is None or first + 1 >= len(labels):
        out["detected"] = False
        return out
    classes = list(verdicts[first])
    names = clips_lib.imagenet_class_names()
    out.update(detected=True, detected_classes=classes,
               detected_names=[names[k].split(",")[0] for k in classes],
               detected_after_frames=first + 1)  # fmt: skip
    # The cheap stem, exported once (offline), and the pre-forwarded training-clip features.
    train_frames = shared["_train_frames"]
    calib = clips_lib.to_float(
        _resize(train_frames[_spread(len(train_frames), int(s.calibration_frames))],
                int(s.resolution))
    )  # fmt: skip
    buf, cnet, cvars = _stem_model(int(s.resolution), s.weights, calib)
    stem_path = os.path.join(workdir, "specialize", f"stem_{s.resolution}_{s.weights}.tflite")
    os.makedirs(os.path.dirname(stem_path), exist_ok=True)
    with open(stem_path, "wb") as f:
        f.write(buf)
    stem = Model(stem_path, num_threads=threads).signature("stem")

    def feats(frames_u8: np.ndarray) -> np.ndarray:
        x = clips_lib.to_float(_resize(frames_u8, int(s.resolution)))
        return np.stack([stem(np.ascontiguousarray(xi[None]))[0] for xi in x])

    t0 = time.perf_counter()
    pool_feats = feats(train_frames)
    preforward_offline_s = time.perf_counter() - t0
    fit_kw = dict(steps=int(s.steps), batch_size=int(s.batch_size),
                  learning_rate=float(s.learning_rate), seed=int(s.seed))  # fmt: skip
    # The fitter is compiled before the stream starts (offline, like the pre-forwarding): its
    # input is always FIT_EXAMPLES rows (the balanced set drawn with replacement; the fit
    # samples minibatches with replacement anyway), so a specialization never recompiles.
    spec_net, spec_vars = specialize.retarget_head(cnet, cvars, classes)
    t0 = time.perf_counter()
    dummy = np.zeros((FIT_EXAMPLES, pool_feats.shape[1]), np.float32)
    jax.block_until_ready(
        specialize.fit_last_layer(spec_net, spec_vars, dummy, np.zeros(FIT_EXAMPLES, np.int32),
                                  **fit_kw)
    )  # fmt: skip
    compile_s = time.perf_counter() - t0
    last = layer_name(len(spec_net.layers) - 1)
    other = len(classes)
    cl = np.asarray(classes)

    def specialize_at(ready: int, cls=None) -> dict[str, Any]:
        """Specialization (timed): forward the frames seen by `ready`, fit the head."""
        cls = classes if cls is None else list(cls)
        seen = seen_rows(gen_top1, cls, ready, int(s.window))
        t0 = time.perf_counter()
        clip_feats = feats(frames.frames[seen])
        forward_s = time.perf_counter() - t0
        clip_y = specialize.specialized_labels(gen_top1[seen], cls)
        # training-clip frames labelled by the general model (its 1000-way logits on them)
        p_y = specialize.specialized_labels(shared["_features"][1].argmax(1), cls)
        xs = np.concatenate([clip_feats, pool_feats])
        ys = np.concatenate([clip_y, p_y])
        keep = training_rows(clip_y, p_y, len(cls), float(s.other_fraction), int(s.seed))
        t0 = time.perf_counter()
        rows = np.random.default_rng(int(s.seed)).choice(keep, FIT_EXAMPLES)
        snet, svars = specialize.retarget_head(cnet, cvars, cls)
        fitted = specialize.fit_last_layer(snet, svars, xs[rows], ys[rows], **fit_kw)
        jax.block_until_ready(fitted)
        fit_s = time.perf_counter() - t0
        return {"ready": int(ready), "seen": seen, "clip_other": int((clip_y == len(cls)).sum()),
                "classes": cls,
                "keep": keep, "forward_s": forward_s, "fit_s": fit_s,
                "kern": np.asarray(fitted["params"][last]["kernel"]),
                "bias": np.asarray(fitted["params"][last]["bias"])}  # fmt: skip

    ready = specialization_point(gen_top1, classes, first, int(s.min_other), int(s.max_wait))
    fits = {"negatives": specialize_at(ready)}
    if ready != first:  # the detection-time head (the previous rule), on the same frames
        fits["at_detection"] = specialize_at(first)
    sp = fits["negatives"]
    kern, bias, keep = sp["kern"], sp["bias"], sp["keep"]
    forward_s, fit_s = sp["forward_s"], sp["fit_s"]
    # --- the cascade on the rest of the clip ---
    after = np.arange(ready + 1, len(labels))
    x_cheap = clips_lib.to_float(_resize(frames.frames[after], int(s.resolution)))

    def cascade(i: int) -> int:
        h = stem(np.ascontiguousarray(x_cheap[i][None]))
        k = int(np.argmax(h[0] @ kern + bias))
        if k == other:
            return int(np.argmax(general(np.ascontiguousarray(x_gen[after[i]][None]))))
        return int(cl[k])

    def general_only(i: int) -> int:
        return int(np.argmax(general(np.ascontiguousarray(x_gen[after[i]][None]))))

    h_after = feats(frames.frames[after])
    y_after = labels[after]
    variants = {}
    for name, f in fits.items():
        out_k = np.array([int(np.argmax(h @ f["kern"] + f["bias"])) for h in h_after])
        fb = out_k == other
        pred = np.where(fb, gen_top1[after], cl[np.minimum(out_k, other - 1)])
        variants[name] = {
            "specialized_after_frames": f["ready"] + 1, "clip_frames_fitted": int(len(f["seen"])),
            "clip_other_frames_fitted": f["clip_other"],
            "specialize_s": f["forward_s"] + f["fit_s"],
            "cascade_accuracy": float(np.mean(pred == y_after)),
            "fallback_rate": float(fb.mean()),
            "cascade_vs_general_top1": float(np.mean(pred == gen_top1[after])),
        }  # fmt: skip
        if name == "negatives":
            spec_out, fallback, cas_pred = out_k, fb, pred
    # The whole clip as served: the general model up to the specialization, the cascade after.
    whole = np.concatenate([gen_top1[: ready + 1], cas_pred])

    def cheap_only(i: int) -> int:
        h = stem(np.ascontiguousarray(x_cheap[i][None]))
        return int(np.argmax(h[0] @ kern + bias))

    idx = list(range(len(after)))[: max(int(c.bench.frames), 1) * 3]
    stats = time_interleaved(
        {"general": general_only, "cascade": cascade, "specialized": cheap_only}, idx,
        rounds=int(c.bench.rounds), warmup=int(c.bench.warmup),
    )  # fmt: skip
    if int(s.check_every) > 0:  # MCDNN's re-checks: spot checks, drop and re-specialize on drift
        h_all = feats(frames.frames)
        respec_s: list[float] = []

        def head_of(f):
            kk, bb, n_cls = f["kern"], f["bias"], len(f["classes"])
            cls_arr = np.asarray(f["classes"])

            def head(i: int) -> int:
                k = int(np.argmax(h_all[i] @ kk + bb))
                return -1 if k == n_cls else int(cls_arr[k])

            return head

        def respecialize(i: int, cls: tuple[int, ...]):
            f = specialize_at(i, cls)
            respec_s.append(f["forward_s"] + f["fit_s"])
            return head_of(f)

        d = drift_stream(gen_top1, ready + 1, head_of(sp), respecialize,
                         (int(s.window), int(s.n), float(s.p)), int(s.check_every),
                         int(s.check_window), int(s.check_fail))  # fmt: skip
        g_ms0, ch_ms = stats["general"]["mean_ms"], stats["specialized"]["mean_ms"]
        n_all = len(labels)
        out["rechecks"] = {
            "check_every": int(s.check_every), "check_window": int(s.check_window),
            "check_fail": int(s.check_fail), "events": d["events"],
            "respecialize_s": respec_s,
            "stream_accuracy": float(np.mean(d["pred"] == y_after)),
            "stream_vs_general_top1": float(np.mean(d["pred"] == gen_top1[after])),
            "whole_clip_accuracy": float(np.mean(
                np.concatenate([gen_top1[: ready + 1], d["pred"]]) == labels)),
            "cheap_runs": d["cheap_runs"], "general_runs": d["general_runs"] + ready + 1,
            "whole_clip_ms_per_frame": ((d["general_runs"] + ready + 1) * g_ms0
                                        + d["cheap_runs"] * ch_ms) / n_all,
        }  # fmt: skip
    out["rule"] = {"min_other": int(s.min_other), "max_wait": int(s.max_wait),
                   "specialized_after_frames": int(ready + 1)}  # fmt: skip
    out["heads"] = variants
    g_ms, c_ms = stats["general"]["mean_ms"], stats["cascade"]["mean_ms"]
    out["whole_clip"] = {
        "frames": int(len(labels)),
        "general_accuracy": float(np.mean(gen_top1 == labels)),
        "served_accuracy": float(np.mean(whole == labels)),
        "general_ms_per_frame": g_ms,
        "served_ms_per_frame": ((ready + 1) * g_ms + len(after) * c_ms) / len(labels),
    }  # fmt: skip
    out.update({
        "specialized": {"stem": os.path.relpath(stem_path, workdir),
                        "resolution": int(s.resolution),
                        "weights": s.weights, "bytes": os.path.getsize(stem_path),
                        "classes": [*map(int, classes), "other"]},
        "train_examples": int(len(keep)),
        "specialize_seconds": {
            "forward_seen_frames_s": forward_s, "seen_frames": int(ready + 1),
            "clip_frames_fitted": int(len(sp["seen"])),
            "fit_s": fit_s, "total_s": forward_s + fit_s, "fit_examples": FIT_EXAMPLES,
            "compile_fitter_offline_s": compile_s,
            "preforward_training_clips_offline_s": preforward_offline_s,
            "preforwarded_frames": int(len(pool_feats)),
        },
        "target_s": 1.0,
        "target_met": bool(forward_s + fit_s <= 1.0),
        "stream": {
            "frames": int(len(after)),
            "general_accuracy": float(np.mean(gen_top1[after] == y_after)),
            "cascade_accuracy": float(np.mean(cas_pred == y_after)),
            "specialized_alone_in_class": float(
                np.mean(spec_out == specialize.specialized_labels(gen_top1[after], classes))
            ),
            "fallback_rate": float(fallback.mean()),
            "cascade_vs_general_top1": float(np.mean(cas_pred == gen_top1[after])),
            "reference_in_dominant": float(np.mean(np.isin(y_after, cl))),
        },
        "time_per_frame_ms": {k: v["mean_ms"] for k, v in stats.items()},
        "time_p50_ms": {k: v["p50_ms"] for k, v in stats.items()},
        "cascade_speedup": stats["general"]["mean_ms"] / stats["cascade"]["mean_ms"],
        "bench": {"frames": len(idx), "rounds": int(c.bench.rounds), "threads": threads},
    })  # fmt: skip
    return out


# ---------------------------------------------------------------------------
# Stage 4: AMS over a day.
# ---------------------------------------------------------------------------


def ams_catalog(c, cat, catalog: dict, catalog_dir: str, tasks, workdir: str) -> str:
    """Writes ``ams_catalog.json``: every catalog variant as an option of every app (task)."""
    rows = catalog["tasks"][lite_catalog.TASK]["variants"]
    names = [r["name"] for r in rows]
    exclude = _names(c.ams.exclude)
    bad = [e for e in exclude if e not in names]
    if bad:
        raise ValueError(f"ams.exclude names {bad[0]!r}, not a catalog variant; valid: {names}")
    original = catalog["tasks"][lite_catalog.TASK]["original"]
    if original in exclude:
        raise ValueError(f"ams.exclude may not drop the original {original!r}")
    decode = sorted(int(d) for d in cat.clips.decode_resolutions)
    labels = lite_catalog.load_frames(cat, [decode[0]], False)["labels"]
    out = {"schema": 1, "source": os.path.abspath(os.path.join(catalog_dir, lite_catalog.CATALOG)),
           "tasks": {}}  # fmt: skip
    for t, groups in {IMAGENET: None, **tasks}.items():
        lut = task_lut(groups)
        variants = []
        for r in rows:
            if r["name"] in exclude:
                continue
            top1 = np.asarray(r["top1"])
            if len(top1) != len(labels):
                raise ValueError(f"{r['name']}: {len(top1)} predictions for {len(labels)} labels")
            variants.append({
                **{k: r[k] for k in ("name", "latency_ms", "load_ms", "bytes", "flops",
                                     "energy_run_j", "energy_load_j", "file")},
                "accuracy": float(np.mean(lut[top1] == lut[labels])),
            })  # fmt: skip
        out["tasks"][t] = {"original": original, "classes": len(task_classes(groups)),
                           "variants": variants}  # fmt: skip
    path = os.path.join(workdir, "ams_catalog.json")
    write_json_atomic(path, out)
    return path


def ams_stage(c, cat, catalog: dict, catalog_dir: str, tasks, workdir: str, log=print) -> dict:
    """Item 4: every policy and the optimum over one day per seed, per energy budget."""
    path = ams_catalog(c, cat, catalog, catalog_dir, tasks, workdir)
    cats = ams.load_catalog(path, cloud=False)
    a = c.ams
    tr_kw = {k: a.trace[k] for k in ("hours", "mean_rate", "bursts")}
    policies = list(ams.POLICIES)
    pace_kw = {**PACE_OPTIONS, "prior_rate": history_rate(list(cats.apps), a.seeds, tr_kw)}
    log(f"AMS: pace's prior rate {pace_kw['prior_rate']:.4f} requests/s (past days)")
    runs: list[dict] = []
    fig_rep = None
    for energy in a.energy:
        for seed in a.seeds:
            tr = traces_lib.make_day(list(cats.apps), seed=int(seed), **tr_kw)
            budgets = ams.resolve_budgets(
                cats, tr, energy=str(energy), memory_mb=float(a.memory_mb), money=0.0,
                latency_ms=float(a.latency_ms),
            )  # fmt: skip
            rep, _ = ams.run(cats, tr, budgets, policies, options={"pace": pace_kw})
            if fig_rep is None:
                fig_rep = rep
                traces_lib.save(tr, os.path.join(workdir, "trace.json"))
            runs.append({"energy": str(energy), "seed": int(seed), "report": rep})
            p = rep["policies"]
            log(f"AMS {energy} seed {seed}: " + ", ".join(
                f"{n} {p[n]['served_fraction']:.1%}" for n in policies))  # fmt: skip
    write_json_atomic(os.path.join(workdir, "ams.json"), {"runs": runs})
    plot_fig11(fig_rep, os.path.join(workdir, "fig11.png"))
    plot_budgets(runs, os.path.join(workdir, "fig11_budgets.png"))
    fronts = plot_task_fronts(path, workdir)
    return {"catalog": os.path.relpath(path, workdir), "apps": list(cats.apps), "pareto": fronts,
            "best_model_variants": fig_rep["best_model_variants"],
            "pace_options": {**pace_kw, "history_seeds": history_seeds(a.seeds)},
            "summary": summarize_ams(runs, str(a.energy[0]))}  # fmt: skip


def plot_task_fronts(ams_catalog_path: str, workdir: str) -> dict[str, str]:
    """The Pareto plots per task (issue 15): ``pareto_<task>.png``, agreement vs bytes / FLOPs
    / LiteRT latency / modelled energy per run, from the options AMS schedules (the labeller
    excluded as configured); returns task -> file name."""
    with open(ams_catalog_path) as f:
        tasks = json.load(f)["tasks"]
    out = {}
    for t, task in tasks.items():
        out[t] = f"pareto_{t}.png"
        plot_pareto(
            task["variants"],
            f"Lite catalog, task {t} ({task['classes']} classes; original {task['original']})",
            os.path.join(workdir, out[t]),
            ylabel="agreement with the reference (LiteRT)",
        )
    return out


def history_seeds(seeds: Sequence[int]) -> list[int]:
    """The past days' trace seeds: `PACE_HISTORY_SEEDS` minus the reported `seeds`."""
    reported = set(map(int, seeds))
    return [s for s in PACE_HISTORY_SEEDS if s not in reported]


def history_rate(apps: Sequence[str], seeds: Sequence[int], tr_kw: Mapping[str, Any]) -> float:
    """Mean total requests/s of the past days (`history_seeds`; never a reported seed)."""
    days = [traces_lib.make_day(list(apps), seed=s, **tr_kw) for s in history_seeds(seeds)]
    return float(np.mean([len(d) / d.day_s for d in days])) if days else 0.0  # 0: no prior


def summarize_ams(runs: Sequence[Mapping[str, Any]], headline: str) -> dict[str, Any]:
    """Per budget: served / regret per policy (mean over seeds); the targets; pace vs mcdnn."""
    by_budget: dict[str, list[Mapping]] = {}
    for r in runs:
        by_budget.setdefault(r["energy"], []).append(r)
    out: dict[str, Any] = {"headline_budget": headline, "budgets": {}}
    for energy, rs in by_budget.items():
        rows = []
        for r in rs:
            rep = r["report"]
            opt = rep["offline_optimum"].get("expected_correct") or 0.0
            bm = rep["policies"]["best_model"]["served"]
            row = {
                "seed": r["seed"],
                "requests": rep["requests"],
                "optimum_correct": opt,
                "optimum_served": rep["offline_optimum"].get("served"),
                "best_model_served_fraction": rep["policies"]["best_model"]["served_fraction"],
            }
            for n, p in rep["policies"].items():
                row[n] = {
                    "served": p["served"],
                    "served_fraction": p["served_fraction"],
                    "expected_correct": p["expected_correct"],
                    "served_x_best_model": p["served"] / bm if bm else None,
                    "regret_fraction": (opt - p["expected_correct"]) / opt if opt else None,
                }
            rows.append(row)  # fmt: skip
        wins = sum(r["pace"]["expected_correct"] > r["mcdnn"]["expected_correct"] for r in rows)
        under_half = [r for r in rows if r["best_model_served_fraction"] < 0.5]
        targets = {}
        for n in ("mcdnn", "pace"):
            targets[n] = {
                "seeds_where_best_model_under_half": len(under_half),
                "served_x_best_model_min": min(
                    (r[n]["served_x_best_model"] or 0.0 for r in under_half), default=None
                ),
                "regret_fraction_max": max(
                    (r[n]["regret_fraction"] or 0.0 for r in under_half), default=None
                ),
            }
            t = targets[n]
            t["met"] = bool(
                under_half
                and t["served_x_best_model_min"] >= AMS_SERVED_X
                and t["regret_fraction_max"] <= AMS_MAX_REGRET
            )
        out["budgets"][energy] = {
            "seeds": rows, "pace_beats_mcdnn": int(wins), "of": len(rows), "targets": targets,
        }  # fmt: skip
    # Ours is the default only if it beats Algorithm 1 in >= 4 of 5 seeds at every budget.
    out["default_policy"] = (
        "pace"
        if all(b["pace_beats_mcdnn"] >= AMS_WINS * b["of"] / 5 for b in out["budgets"].values())
        else "mcdnn"
    )
    return out


def plot_budgets(runs: Sequence[Mapping[str, Any]], path: str) -> None:
    """Served fraction and expected correct answers per policy vs the energy budget (seed mean)."""
    # lazy: plots only; matplotlib is slow to import (pyplot after choosing the Agg backend)
    import matplotlib

    matplotlib.use("Agg")
    # lazy: plots only
    import matplotlib.pyplot as plt

    from flexjax.io import save_figure_atomic

    budgets = sorted({r["energy"] for r in runs}, key=lambda e: float(e.rstrip("x") or 0))
    pols = list(runs[0]["report"]["policies"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in [*pols, "optimum"]:
        served, correct = [], []
        for e in budgets:
            rs = [r["report"] for r in runs if r["energy"] == e]
            if n == "optimum":
                served.append(np.mean([(r["offline_optimum"].get("served_fraction") or 0)
                                       for r in rs]))  # fmt: skip
                correct.append(np.mean([(r["offline_optimum"].get("expected_correct") or 0)
                                        / r["requests"] for r in rs]))  # fmt: skip
            else:
                served.append(np.mean([r["policies"][n]["served_fraction"] for r in rs]))
                correct.append(np.mean([r["policies"][n]["expected_correct"] / r["requests"]
                                        for r in rs]))  # fmt: skip
        axes[0].plot(budgets, served, "o-", label=n)
        axes[1].plot(budgets, correct, "o-", label=n)
    axes[0].set_ylabel("fraction of requests served")
    axes[1].set_ylabel("expected correct answers / request")
    for ax in axes:
        ax.set_xlabel("energy budget (x Original's need for the day)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("AMS on the EfficientNet-Lite catalog (mean over trace seeds)")
    fig.tight_layout()
    save_figure_atomic(fig, path, dpi=110)


# ---------------------------------------------------------------------------
# The job.
# ---------------------------------------------------------------------------


def run(config: ml_collections.ConfigDict, workdir: str, log=print) -> dict[str, Any]:
    """Every stage (module docstring); writes and returns ``report.json``'s content."""
    c, cat, tasks = validate(config)
    os.makedirs(workdir, exist_ok=True)
    load0 = list(os.getloadavg())
    t_start = time.perf_counter()
    catalog, catalog_dir = catalog_stage(c, cat, workdir, log)
    t0 = time.perf_counter()
    shared = sharing_stage(c, cat, tasks, workdir, log)
    log(f"sharing: {shared['speedup']:.2f}x vs separate models "
        f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
    t0 = time.perf_counter()
    spec = specialization_stage(c, cat, catalog_dir, catalog, shared, workdir, log)
    log(f"specialization ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    ams_rep = ams_stage(c, cat, catalog, catalog_dir, tasks, workdir, log)
    log(f"AMS ({time.perf_counter() - t0:.0f} s)")
    report = {
        "schema": "lite_mcdnn/1",
        "catalog_dir": os.path.abspath(catalog_dir),
        "groups": {t: {g: list(ids) for g, ids in gs.items()} for t, gs in tasks.items()},
        "sharing": {k: v for k, v in shared.items() if not k.startswith("_")},
        "specialization": spec,
        "ams": ams_rep,
        "wall_s": time.perf_counter() - t_start,
        "load_average": {"start": load0, "end": list(os.getloadavg())},
        "cpus": os.cpu_count(),
    }
    write_json_atomic(os.path.join(workdir, REPORT), report)
    return report


def format_report(r: Mapping[str, Any]) -> str:
    """The report as text: sharing, specialization (Table 3 analogue), AMS (Fig. 11 analogue)."""
    sh = r["sharing"]
    lines = ["== tasks and sharing (Lite0 stem shared, one head per task) =="]
    for t, a in sh["accuracy"].items():
        lines.append(
            f"{t:<10} shared {a['shared']:.3f}  separate {a['separate']:.3f}  "
            f"grouped 1000-way {a['grouped_1000way']:.3f}  majority {a['majority_class']:.3f}"
        )
    tp = sh["time_per_frame_ms"]
    lines.append(
        f"per frame: separate {tp['separate']:.2f} ms, shared {tp['shared']:.2f} ms -> "
        f"{sh['speedup']:.2f}x; bytes {sh['bytes']['separate']:,} -> {sh['bytes']['shared']:,}"
    )
    sp = r["specialization"]
    lines.append(f"== specialization on {sp['clip']} ({sp['frames']} frames) ==")
    if not sp.get("detected"):
        lines.append(f"no (n={sp['n']}, p={sp['p']}) skew detected")
    else:
        ss, st = sp["specialize_seconds"], sp["stream"]
        lines.append(
            f"skew {sp['detected_names']} after {sp['detected_after_frames']} frames; "
            f"specialize {ss['total_s']:.2f} s (forward {ss['forward_seen_frames_s']:.2f} + fit "
            f"{ss['fit_s']:.2f}; fitter compiled offline in {ss['compile_fitter_offline_s']:.2f}) "
            "-> target <= 1 s "
            f"{'MET' if sp['target_met'] else 'missed'}"
        )
        t = sp["time_per_frame_ms"]
        lines.append(
            f"cascade acc {st['cascade_accuracy']:.3f} vs general {st['general_accuracy']:.3f}; "
            f"fallback {st['fallback_rate']:.1%}; "
            f"{t['cascade']:.2f} vs {t['general']:.2f} ms/frame "
            f"({sp['cascade_speedup']:.2f}x)"
        )
        for name, h in sp.get("heads", {}).items():
            lines.append(
                f"  head {name}: fitted after {h['specialized_after_frames']} frames "
                f"({h['clip_other_frames_fitted']} of the clip's 'other'), "
                f"{h['specialize_s']:.2f} s; cascade {h['cascade_accuracy']:.3f}, "
                f"fallback {h['fallback_rate']:.1%} (on the same {st['frames']} frames)"
            )
        if "whole_clip" in sp:
            w = sp["whole_clip"]
            lines.append(
                f"whole clip: served {w['served_accuracy']:.3f} vs general "
                f"{w['general_accuracy']:.3f}; {w['served_ms_per_frame']:.2f} vs "
                f"{w['general_ms_per_frame']:.2f} ms/frame"
            )
    s = r["ams"]["summary"]
    lines.append(f"== AMS (default policy: {s['default_policy']}) ==")
    for e, b in s["budgets"].items():
        rows = b["seeds"]
        pols = [k for k in rows[0] if isinstance(rows[0][k], dict)]
        served = ", ".join(
            f"{n} {np.mean([x[n]['served_fraction'] for x in rows]):.1%}" for n in pols
        )
        regret = ", ".join(
            f"{n} {np.mean([x[n]['regret_fraction'] or 0 for x in rows]):.1%}" for n in pols
        )
        lines.append(f"{e}: served {served}; regret {regret}; pace beats Algorithm 1 in "
                     f"{b['pace_beats_mcdnn']}/{b['of']} seeds")  # fmt: skip
        for n, t in b["targets"].items():
            lines.append(
                f"  {n}: >= {AMS_SERVED_X:g}x Best-Model and regret <= {AMS_MAX_REGRET:.0%} where "
                f"Best-Model < 50% ({t['seeds_where_best_model_under_half']} seeds): "
                f"{'MET' if t['met'] else 'missed'} (min {t['served_x_best_model_min']}, "
                f"max regret {t['regret_fraction_max']})"
            )
    return "\n".join(lines)
