"""MCDNN's catalog on the pretrained EfficientNet-Lite family: build, export, measure.

`run(config, workdir)` (``python -m train.lite_catalog``; schema
`flexjax.config.lite_catalog_defaults`, example ``configs/clips_lite_catalog.py``):

1. `validate`: model names, resolutions (each must have decoded frames at or
   above it), weight formats (converter modes or litert-quantizer recipes,
   every rule checked against the quantizer's policy) -- before any work;
2. the real clips (`flexjax.data.clips`, through the cache): the test split at
   every ``clips.decode_resolutions`` size, the training split at the first
   (int8 calibration only); a variant at another size gets the frames of the
   smallest decoded size above it, resized (Pillow bilinear, antialiased);
3. approximations with a ``sensitivity`` key: their per-layer steps chosen on
   the val clips (`resolve_sensitivity`, `flexjax.sensitivity`; cached in
   ``sensitivity/``), then built like any other;
4. per variant (resumable: ``variants/<name>.tflite`` + ``.json``, reused when
   its spec and sha256 match): pretrained weights at its resolution
   (`flexjax.models.pretrained`), the ``full`` signature converted to fp32
   TFLite, then the converter's fp16 / dynamic / int8 mode or a
   litert-quantizer recipe (`export.quantize`) applied to the fp32 flatbuffer;
   top-1 of every test frame **in the LiteRT interpreter**;
5. agreement with the reference labels and with the original's top-1; LiteRT
   latency at batch 1 of every variant interleaved with the original in one
   run (`runtime.timing.interleaved`), load time (`runtime.mcdnn.time_load`),
   parameters, bytes on disk, FLOPs (`flexjax.costs`), energy from the
   documented model (`pipelines.mcdnn.energy_model`);
6. ``catalog.json``: ``tasks.imagenet.variants`` (one row per variant: its
   file, sha256 and numbers; what `runtime.ams.load_catalog` reads, numpy
   only) and ``targets`` (issue 15's memory / latency targets vs the original).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image

from export import convert, quantize
from flexjax import approx, costs, sensitivity
from flexjax.data import clips as clips_lib
from flexjax.distill_exits import distill_loss
from flexjax.io import sha256_file, write_json_atomic
from flexjax.models import pretrained
from flexjax.models.build import build
from pipelines.mcdnn import energy_model
from runtime import timing
from runtime.lite import Model
from runtime.mcdnn import time_load
from runtime.names import FINAL, FULL

CONVERTER_MODES = ("fp32", "fp16", "dynamic", "int8")  # export.convert.PRECISIONS
OPTIMIZERS = ("sgd", "adam")  # finetune.optimizer: sgd = momentum 0.9
TASK = "imagenet"
VARIANTS_DIR = "variants"
CATALOG = "catalog.json"
SCHEMA = "lite_catalog/1"
# Issue 15's targets vs the original (fp32 Lite0 at 224 px), measured in LiteRT.
MEMORY_TARGET, LATENCY_TARGET, MAX_DROP_POINTS = 10.0, 3.0, 2.0


def _short(model: str) -> str:
    return model.removeprefix("efficientnet_")


def variant_name(model: str, resolution: int, weights: str, approx_name: str | None = None) -> str:
    """``lite0_224_int8``, ``lite0_224_ep50_int8``: one name per variant."""
    if approx_name:
        return f"{_short(model)}_{resolution}_{approx_name}_{weights}"
    return f"{_short(model)}_{resolution}_{weights}"


SPARSE_TECHNIQUES = ("magnitude_prune", "magnitude_prune_parts")


def _approximations(c) -> dict[str, list[dict]]:
    """``approximations`` as name -> list of plain step dicts (shape checks only)."""
    out: dict[str, list[dict]] = {}
    names: set[str] = set()
    for i, a in enumerate(c.approximations):
        keys = set(a.keys()) if hasattr(a, "keys") else set()
        if keys not in ({"name", "steps"}, {"name", "sensitivity"}):
            raise ValueError(
                f"approximations[{i}] must be {{'name': ..., 'steps': [...]}} or "
                f"{{'name': ..., 'sensitivity': {{...}}}}, got {a!r}"
            )
        name = str(a["name"])
        if name in names or not name.isidentifier() or name in CONVERTER_MODES:
            raise ValueError(
                f"approximations[{i}] name {name!r} must be a new identifier "
                "(not a converter mode or an earlier approximation's)"
            )
        names.add(name)
        if "sensitivity" in keys:
            continue  # chosen per layer on the val clips by `_sensitivities` / `run`
        steps = approx.plain(a["steps"])
        if not isinstance(steps, list):
            raise ValueError(f"approximations[{i}] ({name}): steps must be a list, got {steps!r}")
        for j, step in enumerate(steps):
            if not isinstance(step, dict) or "technique" not in step:
                raise ValueError(
                    f"approximations[{i}] ({name}) step {j} must be a mapping with a "
                    f"'technique', got {step!r}"
                )
            approx.technique(step["technique"])  # unknown: ApproxError listing the valid ones
        out[name] = steps
    return out


def _sensitivities(c) -> dict[str, dict[str, Any]]:
    """``approximations`` entries with a ``sensitivity`` key: name -> checked settings.

    Their steps are chosen per layer by `flexjax.sensitivity.run_pass` on the
    val clips when the job runs (`resolve_sensitivity`).
    """
    out = {}
    for a in c.approximations:
        if hasattr(a, "keys") and "sensitivity" in a.keys():
            name = str(a["name"])
            try:
                out[name] = sensitivity.check_settings(approx.plain(a["sensitivity"]))
            except sensitivity.SensitivityError as e:
                raise ValueError(f"approximation {name!r}: {e}") from None
    return out


def apply_approximation(net, variables, steps: Sequence[Mapping[str, Any]], name: str):
    """`flexjax.approx.apply_recipe` with the approximation's name in every error."""
    try:
        return approx.apply_recipe(net, variables, steps)
    except (approx.ApproxError, TypeError) as e:
        raise approx.ApproxError(f"approximation {name!r}: {e}") from None


def _clip_config(c, resolution: int, *, train: bool, val: bool = False) -> clips_lib.ClipConfig:
    cl = c.clips
    return clips_lib.ClipConfig(
        train=cl.train if train else (), val=cl.val if val else (), test=cl.test,
        fps=float(cl.fps),
        max_frames=int(cl.max_frames), resolution=int(resolution), reference=cl.reference,
        reference_resolution=int(cl.reference_resolution),
    )  # fmt: skip


def validate(c) -> tuple[list[dict[str, Any]], dict[str, list[dict]]]:
    """The variants a config asks for (the original first) and its checked quantizer recipes.

    Raises:
      ValueError: an unknown model or weight format, a resolution without
        decoded frames at or above it, a malformed recipe or one the quantizer
        does not support for an op (`export.quantize.QuantizeError`), or bad clip names.
    """

    models = dict(clips_lib.REFERENCE_MODELS)  # name -> native resolution
    recipes: dict[str, list[dict]] = {}
    for i, r in enumerate(c.recipes):
        if not hasattr(r, "keys") or set(r.keys()) != {"name", "rules"}:
            raise ValueError(f"recipes[{i}] must be {{'name': ..., 'rules': [...]}}, got {r!r}")
        name = str(r["name"])
        if name in CONVERTER_MODES or name in recipes or not name.isidentifier():
            raise ValueError(
                f"recipes[{i}] name {name!r} must be a new identifier, not one of "
                f"{', '.join(CONVERTER_MODES)} or an earlier recipe's"
            )
        recipes[name] = quantize.check_recipe(list(r["rules"]), name)
    valid_weights = (*CONVERTER_MODES, *recipes)
    approximations = _approximations(c)
    sensitivities = _sensitivities(c)
    decode = sorted(int(d) for d in c.clips.decode_resolutions)
    if not decode:
        raise ValueError("clips.decode_resolutions is empty; e.g. (224,)")
    for d in decode:  # clip names, fps, reference: refused before any decoding
        _clip_config(c, d, train=True, val=True)

    def check(
        model: str, resolution: int, weights: str, where: str, approx_name: str | None = None
    ) -> dict[str, Any]:
        if model not in models:
            raise ValueError(f"{where}: unknown model {model!r}; valid: {', '.join(models)}")
        if weights not in valid_weights:
            raise ValueError(
                f"{where}: unknown weights {weights!r}; valid: converter modes "
                f"{', '.join(CONVERTER_MODES)} or recipes {', '.join(recipes) or '(none defined)'}"
            )
        if isinstance(resolution, bool) or not isinstance(resolution, int):
            raise ValueError(f"{where}: resolution must be an int, got {resolution!r}")
        if not 32 <= resolution <= decode[-1]:
            raise ValueError(
                f"{where}: resolution {resolution} px is out of range [32, {decode[-1]}] "
                "(the largest clips.decode_resolutions); add a decode resolution to go higher"
            )
        v = {"name": variant_name(model, resolution, weights, approx_name), "model": model,
             "resolution": resolution, "weights": weights}  # fmt: skip
        if approx_name is not None:
            if approx_name not in approximations and approx_name not in sensitivities:
                raise ValueError(
                    f"{where}: unknown approximation {approx_name!r}; valid: "
                    f"{', '.join([*approximations, *sensitivities]) or '(none defined)'}"
                )
            if approx_name in sensitivities and model != str(c.original.model):
                raise ValueError(
                    f"{where}: sensitivity approximation {approx_name!r} is chosen on the "
                    f"original ({c.original.model}); it cannot be applied to {model}"
                )
            v["approx"] = approx_name
        return v

    o = c.original
    out = [check(str(o.model), o.resolution, str(o.weights), "original")]
    grid = itertools.product(c.models, c.resolutions, c.weights)
    out += [check(str(m), r, str(w), "models x resolutions x weights") for m, r, w in grid]
    out += [check(str(m), models.get(str(m), 0), "fp32", "originals") for m in c.originals]
    for i, e in enumerate(c.extras):
        keys = set(e.keys()) if hasattr(e, "keys") else set()
        if keys not in ({"model", "resolution", "weights"},
                        {"model", "resolution", "weights", "approx"}):  # fmt: skip
            raise ValueError(
                f"extras[{i}] must be {{'model', 'resolution', 'weights'[, 'approx']}}, got {e!r}"
            )
        a = str(e["approx"]) if "approx" in keys else None
        out.append(check(str(e["model"]), e["resolution"], str(e["weights"]), f"extras[{i}]", a))
    seen: dict[str, dict] = {}
    for v in out:
        seen.setdefault(v["name"], v)
    if "int8" in c.weights and not c.clips.train:
        raise ValueError("int8 weights need clips.train (calibration frames); none given")
    variants = list(seen.values())
    if any(v.get("approx") in sensitivities for v in variants):
        if not c.clips.train or not c.clips.val:
            raise ValueError(
                "a sensitivity approximation needs clips.val (the layers are chosen on the "
                "val clips) and clips.train"
            )
    used = {(v["model"], v["approx"]) for v in variants if "approx" in v}
    if used and int(c.finetune.steps) > 0:
        if not c.clips.train:
            raise ValueError("finetune.steps > 0 needs clips.train (distillation frames)")
        if str(o.weights) != "fp32":
            raise ValueError("finetune: the teacher is the original, which must be fp32")
        if not c.clips.val:
            raise ValueError(
                "finetune.steps > 0 needs clips.val (the distilled weights are kept only if "
                "they agree more with the original there)"
            )
    ft = c.finetune
    if str(ft.optimizer) not in OPTIMIZERS:
        raise ValueError(
            f"finetune.optimizer must be one of {', '.join(OPTIMIZERS)}, got {ft.optimizer!r}"
        )
    if int(ft.resolution) != 0 and not 32 <= int(ft.resolution) <= decode[-1]:
        raise ValueError(
            f"finetune.resolution {ft.resolution} px must be 0 (each variant's own) or in "
            f"[32, {decode[-1]}] (the largest clips.decode_resolutions)"
        )
    # Every approximation applied for real (to each model using it, else the original's):
    # sites that name no layer, ranks above full rank, bad fractions -- before any work.
    used |= {(str(o.model), a) for a in approximations if a not in {n for _, n in used}}
    for model, name in sorted(used):
        if name in sensitivities:
            continue  # its steps exist only after the sensitivity pass (`run`)
        _approximated(model, name, approximations[name], int(ft.resolution) or int(o.resolution))
    return variants, recipes


_APPROXIMATED: dict[tuple[str, str, str, int], tuple] = {}


def _approximated(model: str, name: str, steps: list[dict], resolution: int):
    """The pretrained `model` at `resolution` with approximation `steps` applied (cached)."""
    key = (model, name, json.dumps(steps, sort_keys=True), resolution)
    if key not in _APPROXIMATED:
        net, variables = pretrained.load(model, resolution)
        _APPROXIMATED[key] = apply_approximation(net, variables, steps, name)
    return _APPROXIMATED[key]


# ---------------------------------------------------------------------------
# Frames.
# ---------------------------------------------------------------------------


def _resize(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, R, R, 3] -> [N, size, size, 3], Pillow bilinear (antialiased when shrinking)."""

    if frames.shape[1] == size:
        return frames
    out = [np.asarray(Image.fromarray(f).resize((size, size), Image.BILINEAR)) for f in frames]
    return np.stack(out).astype(np.uint8)


def _pick(n: int, k: int) -> np.ndarray:
    """`k` indices spread evenly over [0, n) (all of them if k is 0 or >= n)."""
    if k <= 0 or k >= n:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, k).round().astype(int))


def load_frames(
    c, resolutions: Sequence[int], need_calibration: bool, need_distill: bool = False
) -> dict[str, Any]:
    """Test (and calibration / distillation) frames at every resolution, with the reference labels.

    Distillation frames (``finetune.train_frames`` spread over the training
    clips) and the val frames that decide whether distilled weights are kept
    (``finetune.val_frames`` spread over ``clips.val``) stay uint8 at the first
    decode resolution.
    """
    need_train = need_calibration or need_distill
    decode = sorted(int(d) for d in c.clips.decode_resolutions)
    test: dict[int, np.ndarray] = {}
    labels = conf = None
    calib_src = distill = distill_res = val = val_labels = None
    info: dict[str, Any] = {}
    for i, d in enumerate(decode):
        cfg = _clip_config(c, d, train=need_train and i == 0, val=need_distill and i == 0)
        splits = clips_lib.load_clips(cfg)
        keep = _pick(len(splits.test), int(c.clips.test_frames))
        test[d] = splits.test.frames[keep]
        if labels is None:
            labels, conf = splits.test.labels[keep], splits.test.conf[keep]
            info = {"test_clips": list(splits.test.clips), "test_frames": int(len(keep)),
                    "clip_info": splits.info}  # fmt: skip
        elif not np.array_equal(labels, splits.test.labels[keep]):
            raise ValueError(f"the test clips' labels differ between decodes at {decode}")
        if need_train and i == 0:
            if len(splits.train) == 0:
                raise ValueError(f"the training clips {c.clips.train!r} have no frames")
            pick = _pick(len(splits.train), int(c.calibration_frames))
            calib_src = splits.train.frames[pick] if need_calibration else None
            if need_distill:
                info["distill_frames"] = int(min(len(splits.train), int(c.finetune.train_frames)))
                distill = splits.train.frames[_pick(len(splits.train), info["distill_frames"])]
                distill_res = d
                if len(splits.val) == 0:
                    raise ValueError(f"the val clips {c.clips.val!r} have no frames")
                val_pick = _pick(len(splits.val), int(c.finetune.val_frames))
                val, val_labels = splits.val.frames[val_pick], splits.val.labels[val_pick]
                info["val_clips"], info["val_frames"] = list(splits.val.clips), int(len(val))
    frames, calib = {}, {}
    for r in sorted(set(resolutions)):
        src = min(d for d in decode if d >= r)
        frames[r] = clips_lib.to_float(_resize(test[src], r))
        if calib_src is not None:
            calib[r] = clips_lib.to_float(_resize(calib_src, r))
    info["decode_resolutions"] = decode
    return {"test": frames, "labels": labels, "conf": conf, "calibration": calib, "info": info,
            "distill": distill, "distill_resolution": distill_res, "val": val,
            "val_labels": val_labels}  # fmt: skip


# ---------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------


def finetune(
    net, variables: dict, frames: np.ndarray, teacher: np.ndarray, s, log=print
) -> tuple[dict, dict[str, Any]]:
    """Distills an approximated net from the original's soft targets: ``(variables, info)``.

    ``s.steps`` steps of ``s.optimizer`` (``sgd``: momentum 0.9; ``adam``),
    cosine-decayed ``s.learning_rate``, on random batches of `frames` (float,
    at the net's fine-tuning resolution) against `teacher` logits, loss =
    ``T^2 KL(softmax(t/T) || softmax(s/T))``
    (`flexjax.distill_exits.distill_loss`). SGD is the default because its
    step is proportional to the gradient: a net that already matches the
    teacher (a lossless approximation) stays where it is, where Adam's
    normalized step moves every weight by about the learning rate per step
    whatever the gradient's size (the old setting, Adam with the student at 128
    px, changed a *lossless* Lite0's top-1 on 73% of the test frames in 30
    steps; BENCHMARKS.md). ``s.clip_norm`` > 0 clips
    each gradient's global norm first (SGD at lr 1e-3 alone diverged from a
    lossless Lite0 at 64 px: loss 0 -> 12 in 10 steps). BatchNorm runs in inference mode:
    its running statistics stay as they are (its scale and bias train, like
    every other parameter); dropout is off. Kernels that an approximation set
    to exact zeros (magnitude pruning: more than 1% zeros) stay zero: the
    mask is re-applied after every step.

    Raises:
      FloatingPointError: a non-finite loss.
    """
    steps = int(s.steps)
    if steps == 0:
        return variables, {"steps": 0}
    t0 = time.perf_counter()
    model = build(net)
    params = variables["params"]
    rest = {k: v for k, v in variables.items() if k != "params"}

    def mask_of(path, leaf):
        zeros = float(np.mean(np.asarray(leaf) == 0))
        named = getattr(path[-1], "key", None) == "kernel"
        return jnp.asarray(np.asarray(leaf) != 0, leaf.dtype) if named and zeros > 0.01 else 1.0

    masks = jax.tree_util.tree_map_with_path(mask_of, params)
    schedule = optax.cosine_decay_schedule(float(s.learning_rate), steps)
    name = str(s.get("optimizer", "adam"))
    if name not in OPTIMIZERS:
        raise ValueError(f"finetune.optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    opt = optax.sgd(schedule, momentum=0.9) if name == "sgd" else optax.adam(schedule)
    clip = float(s.get("clip_norm", 0.0))
    if clip > 0:  # a bound on every step: SGD at 1e-3 diverged from a lossless Lite0 at 64 px
        opt = optax.chain(optax.clip_by_global_norm(clip), opt)
    state = opt.init(params)
    temperature = float(s.temperature)

    def loss_fn(p, x, t):
        student = model.apply({**rest, "params": p}, x, train=False)[FINAL]
        return distill_loss(student, t, temperature)

    @jax.jit
    def step(p, state, x, t):
        loss, g = jax.value_and_grad(loss_fn)(p, x, t)
        updates, state = opt.update(g, state, p)
        p = jax.tree.map(lambda a, m: a * m, optax.apply_updates(p, updates), masks)
        return p, state, loss

    rng = np.random.default_rng(int(s.seed))
    n = len(frames)
    bs = min(int(s.batch_size), n)
    losses = []
    for i in range(steps):
        idx = np.sort(rng.choice(n, size=bs, replace=False))
        params, state, loss = step(params, state, frames[idx], teacher[idx])
        losses.append(float(loss))
        if not np.isfinite(losses[-1]):
            raise FloatingPointError(f"distillation loss is {losses[-1]} at step {i}")
    info = {"steps": steps, "batch_size": bs, "optimizer": name, "clip_norm": clip,
            "resolution": int(frames.shape[1]), "loss_first": losses[0], "loss_last": losses[-1],
            "loss_last5": float(np.mean(losses[-5:])),
            "seconds": round(time.perf_counter() - t0, 1),
            "bn": "inference mode (running statistics frozen; scale and bias trained)"}  # fmt: skip
    log(f"  distilled {steps} steps x {bs}: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({info['seconds']:.0f} s)")  # fmt: skip
    return {**variables, "params": jax.device_get(params)}, info


@functools.lru_cache(maxsize=16)
def _top1_fn(net):
    """A jitted top-1 of `net` (compiled once per net, e.g. for the val frames before and after)."""
    model = build(net)
    return jax.jit(lambda v, x: jnp.argmax(model.apply(v, x)[FINAL], axis=-1))


def _top1(net, variables: dict, frames: np.ndarray, batch: int = 16) -> np.ndarray:
    """JAX top-1 of `net` on `frames` (uint8 or float [0, 1], any square size), in batches."""
    apply = _top1_fn(net.replace(input_shape=tuple(frames.shape[1:])))

    def as_float(x: np.ndarray) -> np.ndarray:
        return clips_lib.to_float(x) if x.dtype == np.uint8 else x

    return np.concatenate(
        [np.asarray(apply(variables, as_float(frames[i : i + batch])))
         for i in range(0, len(frames), batch)]
    ).astype(np.int64)  # fmt: skip


def _is_sparse(steps: Sequence[Mapping[str, Any]]) -> bool:
    return any(st["technique"] in SPARSE_TECHNIQUES for st in steps)


# Float weights only: LiteRT 2.3.0's XNNPACK delegate refuses the converter's sparse int8
# FULLY_CONNECTED ("failed to delegate FULLY_CONNECTED node"), so integer variants of a
# magnitude-pruned net are stored dense (their zeros still compress: ``bytes_gzip``).
SPARSE_WEIGHTS = ("fp32", "fp16")


def _sparse_export(v: Mapping[str, Any], approximations) -> bool:
    """Whether a variant is exported with the converter's sparse tensor encoding."""
    return (
        "approx" in v and v["weights"] in SPARSE_WEIGHTS and _is_sparse(approximations[v["approx"]])
    )


class _Models:
    """Pretrained nets and their fp32 flatbuffers, built once per (model, resolution)."""

    def __init__(self, c=None, data=None, approximations=None, log=print):
        self._nets: dict[tuple[str, int], tuple] = {}
        self._fp32: dict[tuple[str, int], bytes] = {}
        self._c, self._data, self._log = c, data, log
        self._approximations = approximations or {}
        self._tuned: dict[tuple[str, str, int], tuple] = {}
        self._teacher: np.ndarray | None = None
        self._val_teacher: np.ndarray | None = None

    def set_approximations(self, approximations: Mapping[str, list[dict]]) -> None:
        """The approximations' steps (sensitivity ones are known only after their pass)."""
        self._approximations = dict(approximations)

    def teacher(self) -> np.ndarray:
        """The original's logits (JAX, fp32) on the distillation frames, computed once."""
        if self._teacher is None:
            o = self._c.original
            net, variables = self.net(str(o.model), int(o.resolution))
            x = clips_lib.to_float(_resize(self._data["distill"], int(o.resolution)))
            model = build(net)
            apply = jax.jit(lambda v, x: model.apply(v, x)[FINAL])
            self._teacher = np.concatenate(
                [np.asarray(apply(variables, x[i : i + 16])) for i in range(0, len(x), 16)]
            )
        return self._teacher

    def val_teacher(self) -> np.ndarray:
        """The original's top-1 (JAX, fp32) on the val frames, computed once."""
        if self._val_teacher is None:
            o = self._c.original
            net, variables = self.net(str(o.model), int(o.resolution))
            self._val_teacher = _top1(net, variables, _resize(self._data["val"], int(o.resolution)))
        return self._val_teacher

    def tune_resolution(self, v: Mapping[str, Any]) -> int:
        """Where an approximated variant is distilled: ``finetune.resolution`` or its own."""
        return int(self._c.finetune.resolution) or int(v["resolution"])

    def approximated(self, model: str, name: str, resolution: int) -> tuple:
        """``(net, variables, finetune info)``: approximation `name` of `model`, distilled.

        Distilled at `resolution` on the training-clip frames; the distilled
        weights replace the untuned ones only if their top-1 agrees with the
        original's on more val frames (`val_teacher`); the untuned ones win ties.
        """
        key = (model, name, resolution)
        if key not in self._tuned:
            ft = self._c.finetune
            steps = self._approximations[name]
            net, variables = _approximated(model, name, steps, resolution)
            if int(ft.steps) > 0:
                frames = clips_lib.to_float(_resize(self._data["distill"], resolution))
                tuned, info = finetune(net, variables, frames, self.teacher(), ft, self._log)
                val = _resize(self._data["val"], resolution)
                ref = self.val_teacher()
                before = float(np.mean(_top1(net, variables, val) == ref))
                after = float(np.mean(_top1(net, tuned, val) == ref))
                keep = after > before
                info["val_agreement_untuned"], info["val_agreement_tuned"] = before, after
                info["val_frames"], info["kept"] = int(len(ref)), "tuned" if keep else "untuned"
                self._log(
                    f"  val agreement with the original: untuned {before:.3f}, tuned "
                    f"{after:.3f} -> {info['kept']} kept"
                )
                variables = tuned if keep else variables
            else:
                info = {"steps": 0}
            self._tuned[key] = (net, variables, info)
        return self._tuned[key]

    def tuned(self, v: Mapping[str, Any]) -> tuple:
        """`approximated` for an approximated variant."""
        return self.approximated(v["model"], v["approx"], self.tune_resolution(v))

    def variant_net(self, v: Mapping[str, Any]):
        """The Net a variant exports (an approximation's at the variant's resolution)."""
        if "approx" not in v:
            return self.net(v["model"], v["resolution"])[0]
        net = self.tuned(v)[0]
        return net.replace(input_shape=(v["resolution"], v["resolution"], 3))

    def net(self, model: str, resolution: int):

        key = (model, resolution)
        if key not in self._nets:
            self._nets[key] = pretrained.load(model, resolution)
        return self._nets[key]

    def plans(self, net):

        return [p for p in convert.plan_signatures(net) if p.name == convert.FULL]

    def fp32(self, model: str, resolution: int) -> bytes:

        key = (model, resolution)
        if key not in self._fp32:
            net, variables = self.net(model, resolution)
            self._fp32[key] = convert.to_tflite(net, variables, self.plans(net))
        return self._fp32[key]

    def export(self, v: Mapping[str, Any], recipes, calibration) -> bytes:

        m, r, w = v["model"], v["resolution"], v["weights"]
        if "approx" in v:
            _, variables, _ = self.tuned(v)
            net = self.variant_net(v)
            plans = self.plans(net)
            if w in recipes:  # the quantizer reads a dense fp32 flatbuffer
                return quantize.quantize(convert.to_tflite(net, variables, plans), recipes[w], w)
            rep = {convert.FULL: calibration[r]} if w == "int8" else None
            return convert.to_tflite(
                net, variables, plans, precision=w, representative=rep,
                num_calibration=len(calibration.get(r, ())),
                sparsity=_sparse_export(v, self._approximations),
            )  # fmt: skip
        if w == "fp32":
            return self.fp32(m, r)
        if w in recipes:
            return quantize.quantize(self.fp32(m, r), recipes[w], w)
        net, variables = self.net(m, r)
        rep = {convert.FULL: calibration[r]} if w == "int8" else None
        return convert.to_tflite(
            net, variables, self.plans(net), precision=w, representative=rep,
            num_calibration=len(calibration.get(r, ())),
        )  # fmt: skip


def _spec(c, v: Mapping[str, Any], recipes, frames_info, approximations=None) -> dict[str, Any]:
    """What a variant's file and numbers depend on (a resumed row must match it)."""
    out = {
        **{k: v[k] for k in ("model", "resolution", "weights")},
        "rules": recipes.get(v["weights"]),
        "calibration_frames": int(c.calibration_frames) if v["weights"] == "int8" else None,
        "clips": {k: c.clips[k] for k in ("train", "test", "fps", "max_frames", "reference",
                                          "reference_resolution", "test_frames")},
        "decode_resolutions": frames_info["decode_resolutions"],
        "threads": int(c.bench.threads),
    }  # fmt: skip
    if "approx" in v:  # only approximated variants: the others' specs stay as they were
        out["approx"] = {"name": v["approx"], "steps": (approximations or {})[v["approx"]],
                         "finetune": c.finetune.to_dict(),
                         "distill_frames": frames_info.get("distill_frames"),
                         "val_clips": c.clips.val, "val_frames": frames_info.get("val_frames"),
                         "original": c.original.to_dict()}  # fmt: skip
    return out


def _predict(path: str, x: np.ndarray, threads: int) -> np.ndarray:

    sig = Model(path, num_threads=threads).signature(FULL)
    return np.array([int(np.argmax(sig(np.ascontiguousarray(f[None])))) for f in x], np.int64)


def build_variant(
    c, v, recipes, data, models: _Models, workdir: str, log=print, approximations=None
) -> dict:
    """Exports one variant (or reuses a matching one) and measures its top-1 on the test frames."""

    directory = os.path.join(workdir, VARIANTS_DIR)
    rel = os.path.join(VARIANTS_DIR, f"{v['name']}.tflite")
    path, row_path = os.path.join(workdir, rel), os.path.join(directory, f"{v['name']}.json")
    spec = _spec(c, v, recipes, data["info"], approximations)
    if os.path.isfile(path) and os.path.isfile(row_path):
        try:
            with open(row_path) as f:
                row = json.load(f)
        except (OSError, ValueError):
            row = {}  # damaged: rebuilt below
        if (
            isinstance(row, dict)
            and row.get("spec") == spec
            and row.get("sha256") == sha256_file(path)
        ):
            log(f"{v['name']}: reused ({row['bytes']:,} bytes)")
            return row
    t0 = time.perf_counter()
    buf = models.export(v, recipes, data["calibration"])
    export_s = time.perf_counter() - t0
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(buf)
    os.replace(tmp, path)
    pred = _predict(path, data["test"][v["resolution"]], int(c.bench.threads))
    net = models.variant_net(v)
    row = {
        **{k: v[k] for k in ("name", "model", "resolution", "weights")},
        "file": rel,
        "sha256": sha256_file(path),
        "bytes": os.path.getsize(path),
        "params": int(costs.of(net).backbone.params),
        "flops": int(2 * costs.multiply_adds(net)),
        "export_s": round(export_s, 2),
        "top1": pred.tolist(),
        "spec": spec,
    }
    if "approx" in v:
        _, variables, info = models.tuned(v)
        row["approx"] = v["approx"]
        row["ranks"] = approx.lite_ranks(net)
        row["kernel_zero_fraction"] = approx.zero_fraction(variables)
        row["sparse_export"] = _sparse_export(v, approximations)
        row["finetune"] = info
    write_json_atomic(row_path, row)
    log(f"{v['name']}: {row['bytes']:,} bytes, exported in {export_s:.1f} s")
    return row


# ---------------------------------------------------------------------------
# Per-layer approximations chosen by measured sensitivity.
# ---------------------------------------------------------------------------

SENSITIVITY_DIR = "sensitivity"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resolve_sensitivity(
    c, name: str, settings: Mapping[str, Any], data, models: _Models, workdir: str, log=print
) -> dict[str, Any]:
    """`flexjax.sensitivity.run_pass` on the original and the val frames, cached in the workdir.

    The per-layer table depends only on the candidates and the frames, so
    approximations that differ only in budget share it
    (``sensitivity/table_<key>.json``); the pass itself (moves, the bisection's
    checks, the chosen steps) is ``sensitivity/<name>.json``, reused when its
    key (settings, original, val clips and frames) matches.
    """
    o = c.original
    directory = os.path.join(workdir, SENSITIVITY_DIR)
    os.makedirs(directory, exist_ok=True)
    frames = data["val"]
    sha = hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()
    key = {"model": str(o.model), "resolution": int(o.resolution), "val_clips": c.clips.val,
           "fps": float(c.clips.fps), "max_frames": int(c.clips.max_frames),
           "val_frames": int(len(frames)), "reference": c.clips.reference,
           "frames_sha": sha}  # fmt: skip
    table_key = {**key, **{k: settings[k] for k in sensitivity.TABLE_KEYS}}
    pass_key = {**key, "settings": dict(settings)}
    pass_path = os.path.join(directory, f"{name}.json")
    if os.path.isfile(pass_path):
        try:
            with open(pass_path) as f:
                cached = json.load(f)
        except (OSError, ValueError):
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == json.loads(json.dumps(pass_key)):
            log(f"sensitivity {name}: reused ({cached['moves']} moves)")
            return cached
    net, variables = models.net(str(o.model), int(o.resolution))
    x = clips_lib.to_float(_resize(frames, int(o.resolution)))
    labels = np.asarray(data["val_labels"])
    table_path = os.path.join(directory, f"table_{_digest(table_key)}.json")
    table = None
    if os.path.isfile(table_path):
        try:
            with open(table_path) as f:
                table = json.load(f)
            log(f"sensitivity {name}: per-layer table reused ({len(table['rows'])} options)")
        except (OSError, ValueError, KeyError):
            table = None
    if table is None:
        n = len(_pick(len(x), settings["table_frames"]))
        log(f"sensitivity {name}: measuring every option alone on {n} of {len(x)} val frames")
        table = sensitivity.sensitivity_table(net, variables, x, labels, settings, log)
        write_json_atomic(table_path, table)
    result = sensitivity.run_pass(net, variables, x, labels, settings, log, table=table)
    result["key"] = pass_key
    result = json.loads(json.dumps(result))  # plain JSON types: equal to what a rerun reads
    write_json_atomic(pass_path, result)
    log(f"sensitivity {name}: {result['moves']} of {len(result['moves_list'])} moves chosen, "
        f"{result['val']['params'] / 1e6:.2f} M params ({result['seconds']:.0f} s)")  # fmt: skip
    return result


def summarize_pass(p: Mapping[str, Any], top: int = 12) -> dict[str, Any]:
    """What catalog.json keeps of a sensitivity pass: the most sensitive rows, the choice."""
    rows = sorted(p["table"]["rows"], key=lambda r: -r["kl"])
    chosen = sensitivity.assignment(p["moves_list"], p["moves"])
    return {
        "settings": p["settings"], "table_frames": p["table"]["frames"],
        "table_seconds": p["table"]["seconds"], "options": len(p["table"]["rows"]),
        "most_sensitive": rows[:top], "moves": p["moves"], "of_moves": len(p["moves_list"]),
        "chosen": sorted(chosen.values(), key=lambda r: r["knob"]),
        "steps": p["steps"], "val": p["val"], "base": p["base"], "checks": p["checks"],
        "seconds": p["seconds"], "params_original": p["params_original"],
    }  # fmt: skip


# ---------------------------------------------------------------------------
# Measurement and the catalog.
# ---------------------------------------------------------------------------


def measure(c, rows: list[dict], data, workdir: str) -> dict[str, Any]:
    """Adds agreement, latency (interleaved with the original), load time and energy to rows."""

    b = c.bench
    labels, sure = data["labels"], data["conf"] >= 0.5
    orig = rows[0]
    orig_top1 = np.asarray(orig["top1"])
    for r in rows:
        top1 = np.asarray(r["top1"])
        r["accuracy"] = float(np.mean(top1 == labels))  # agreement with the reference labels
        r["accuracy_conf_ge_0.5"] = (
            float(np.mean(top1[sure] == labels[sure])) if sure.any() else None
        )
        r["agreement_original"] = float(np.mean(top1 == orig_top1))
    threads = int(b.threads)
    sigs = {r["name"]: Model(os.path.join(workdir, r["file"]), num_threads=threads).signature(FULL)
            for r in rows}  # fmt: skip
    inputs = {
        r["name"]: [
            np.ascontiguousarray(x[None]) for x in data["test"][r["resolution"]][: b.frames]
        ]
        for r in rows
    }
    t = timing.interleaved(
        sigs, inputs, rounds=int(b.rounds), warmup=int(b.warmup), order="rotate",
        keep_outputs=False,
    )  # fmt: skip
    median, stats = t.median_round_ms(), t.stats()
    for r in rows:
        r["latency_ms"] = median[r["name"]]
        r["latency_p50_ms"] = stats[r["name"]]["p50_ms"]
        r["load_ms"] = time_load(
            os.path.join(workdir, r["file"]), repeats=int(b.load_repeats), threads=threads
        )["p50_ms"]
        r["energy_run_j"], r["energy_load_j"] = energy_model(r, c.energy)
        r["energy_source"] = "model"
    for r in rows:
        with open(os.path.join(workdir, r["file"]), "rb") as f:
            r["bytes_gzip"] = len(gzip.compress(f.read(), 6))  # the file in a gzip bundle
    for r in rows:
        r["memory_ratio_gzip"] = orig["bytes"] / r["bytes_gzip"]
        r["memory_ratio"] = orig["bytes"] / r["bytes"]  # > 1: smaller than the original
        r["latency_ratio"] = orig["latency_ms"] / r["latency_ms"]  # > 1: faster
        r["accuracy_drop_points"] = 100.0 * (orig["accuracy"] - r["accuracy"])
    return {"frames": len(next(iter(inputs.values()))), "rounds": int(b.rounds),
            "warmup": int(b.warmup), "threads": threads, "order": "rotate"}  # fmt: skip


def targets(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Issue 15's memory and latency targets: met or not, and the best variant within 2 points."""
    out = {}
    for key, goal in (("memory_ratio", MEMORY_TARGET), ("latency_ratio", LATENCY_TARGET)):
        ok = [r for r in rows[1:] if r["accuracy_drop_points"] <= MAX_DROP_POINTS]
        best = max(ok, key=lambda r: r[key], default=None)
        out[key] = {
            "target": goal,
            "max_drop_points": MAX_DROP_POINTS,
            "met": bool(best is not None and best[key] >= goal),
            "best_within_drop": None if best is None else
            {"name": best["name"], key: best[key], "drop_points": best["accuracy_drop_points"]},
            "best_overall": max(({"name": r["name"], key: r[key],
                                  "drop_points": r["accuracy_drop_points"]} for r in rows[1:]),
                                key=lambda d: d[key], default=None),
        }  # fmt: skip
    return out


def run(c, workdir: str, log=print) -> dict[str, Any]:
    """Builds, measures and writes the catalog (module docstring); returns what it wrote."""
    t_start = time.perf_counter()
    variants, recipes = validate(c)
    approximations = _approximations(c)
    sensitivities = {k: s for k, s in _sensitivities(c).items()
                     if any(v.get("approx") == k for v in variants)}  # fmt: skip
    os.makedirs(os.path.join(workdir, VARIANTS_DIR), exist_ok=True)
    need_calibration = any(v["weights"] == "int8" for v in variants)
    need_distill = bool(sensitivities) or (
        int(c.finetune.steps) > 0 and any("approx" in v for v in variants)
    )
    t0 = time.perf_counter()
    data = load_frames(c, [v["resolution"] for v in variants], need_calibration, need_distill)
    log(f"clips: {data['info']['test_frames']} test frames ({time.perf_counter() - t0:.1f} s)")
    models = _Models(c, data, None, log)
    passes = {}
    for name, settings in sensitivities.items():
        passes[name] = resolve_sensitivity(c, name, settings, data, models, workdir, log)
        approximations[name] = passes[name]["steps"]
    models.set_approximations(approximations)  # every approximation's steps now known
    rows = [
        build_variant(c, v, recipes, data, models, workdir, log, approximations) for v in variants
    ]
    bench = measure(c, rows, data, workdir)
    report = {
        "schema": SCHEMA,
        "tasks": {TASK: {"original": rows[0]["name"], "variants": rows}},
        "targets": targets(rows),
        "recipes": recipes,
        "approximations": approximations,
        "sensitivity": {k: summarize_pass(p) for k, p in passes.items()},
        "finetune": c.finetune.to_dict(),
        "data": {k: v for k, v in data["info"].items() if k != "clip_info"},
        "bench": bench,
        "energy": dict(c.energy),
        "load_average": list(os.getloadavg()),
        "cpus": os.cpu_count(),
        "wall_s": round(time.perf_counter() - t_start, 1),
    }
    write_json_atomic(os.path.join(workdir, CATALOG), report)
    return report


def format_report(report: Mapping[str, Any]) -> str:
    """The catalog as a Markdown table, then the targets."""
    rows = report["tasks"][TASK]["variants"]
    lines = [
        "| variant | params | bytes | MFLOPs | agreement | vs original top-1 | drop (pts) "
        "| ms (LiteRT, b=1) | latency x | memory x | gzip memory x | load ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f} M | {r['bytes'] / 2**20:.2f} MiB "
            f"| {r['flops'] / 1e6:.0f} | {r['accuracy']:.3f} | {r['agreement_original']:.3f} "
            f"| {r['accuracy_drop_points']:+.1f} | {r['latency_ms']:.2f} "
            f"| {r['latency_ratio']:.2f} | {r['memory_ratio']:.2f} "
            f"| {r['memory_ratio_gzip']:.2f} | {r['load_ms']:.1f} |"
        )
    for key, t in report["targets"].items():
        b = t["best_within_drop"]
        best = "none" if b is None else f"{b['name']} {b[key]:.2f}x at {b['drop_points']:+.1f} pts"
        lines.append(
            f"{key} >= {t['target']:g}x at <= {t['max_drop_points']:g} pts: "
            f"{'MET' if t['met'] else 'NOT met'} (best within the drop: {best})"
        )
    return "\n".join(lines)
