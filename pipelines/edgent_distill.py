"""Edgent's train and export stages for a pretrained backbone with distilled exit heads.

Used by `pipelines.edgent` when the config sets ``distill.backbone`` (e.g.
``efficientnet_lite0``): instead of training ``model_config``, the stage

1. loads the ImageNet-pretrained backbone at ``distill.image_size``
   (`flexjax.models.pretrained`) and the real clips, labelled by the
   reference model (`flexjax.data.clips`);
2. runs the frozen backbone once over every split and caches its activations
   at the exit positions and its final logits (`flexjax.feature_cache`,
   ``features/`` beside ``train/``, which is written atomically as a whole);
3. distills one BranchyNet-style head per exit position from the backbone's
   own softmax at temperature T on the train split (`flexjax.distill_exits`),
   the heads fixed in advance (not FlexDNN-searched); ``distill.stills`` = N
   appends N random crops of still images (`flexjax.data.stills`) to that
   split, so the heads see scenes besides the train clips';
4. writes ``train/`` as an ordinary workdir (net + variables, ``config.json``
   with the data/exits sections export reads, ``report.json`` with each exit's
   agreement with the reference labels and with the backbone's own top-1).

Export then writes the bundle with partition signatures at the block
boundaries (every ``distill.cut_every``-th; `export.partitions`), thresholds
calibrated on the val clips, and ``frames_test.npz`` (the test clips) for the
benchmark.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import ml_collections
import numpy as np

from flexjax import checkpoint, exits, feature_cache
from flexjax import distill_exits as de
from flexjax.data import clips as clips_lib
from flexjax.data import stills
from flexjax.data.datasets import Dataset, Splits
from flexjax.models import pretrained
from flexjax.spec import FINAL, Net

TEST_FRAMES = "frames_test.npz"  # in the job's workdir: the benchmark's frames


def clip_config(config: ml_collections.ConfigDict) -> clips_lib.ClipConfig:
    """The `ClipConfig` of ``distill.clips`` at ``distill.image_size``."""
    c = config.distill.clips
    return clips_lib.ClipConfig(
        train=tuple(c.train), val=tuple(c.val), test=tuple(c.test), fps=float(c.fps),
        max_frames=int(c.max_frames), resolution=int(config.distill.image_size),
        reference=c.reference, reference_resolution=int(c.reference_resolution),
    )  # fmt: skip


def train_clip_config(config: ml_collections.ConfigDict) -> clips_lib.ClipConfig:
    """The train split's `ClipConfig`: ``distill.train_fps`` / ``train_tiles`` over the clips'.

    ``train_tiles`` is flat: ``(scale, y, x, scale, y, x, ...)`` (every number in [0, 1]).

    Only the distillation data changes; val and test (thresholds, scores) stay as
    `clip_config` loads them.
    """
    d, base = config.distill, clip_config(config)
    return dataclasses.replace(
        base, val=(), test=(),
        fps=base.fps if d.train_fps == -1 else float(d.train_fps),
        tiles=tuple(tuple(float(v) for v in d.train_tiles[i : i + 3])
                    for i in range(0, len(d.train_tiles), 3)) or base.tiles,
    )  # fmt: skip


def _augmented(config: ml_collections.ConfigDict, loaded) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(train frames, clip of each, counts)`` the heads distill on (train split only)."""
    d = config.distill
    train = loaded.train
    if d.train_fps != -1 or d.train_tiles:
        train = clips_lib.load_clips(train_clip_config(config)).train
    frames, clip = train.frames, np.asarray(train.clip)
    if d.flip:  # mirrored copies: the backbone's own output on them is the target
        frames = np.concatenate([frames, frames[:, :, ::-1]])
        clip = np.concatenate([clip, clip])
    counts = {train.clips[i]: int(n) for i, n in zip(*np.unique(clip, return_counts=True))}
    if d.stills:  # crops of still images: one more "clip" (a group for balance_clips)
        crops = stills.load_stills(int(d.stills), int(d.image_size))
        frames = np.concatenate([frames, crops])
        clip = np.concatenate([clip, np.full(len(crops), len(train.clips), clip.dtype)])
        counts["stills"] = len(crops)
    return frames, clip, counts


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError (one line) for a ``distill`` section the stages cannot run."""
    d = config.distill
    if d.backbone not in pretrained.PACKAGES:
        raise ValueError(
            f"distill.backbone {d.backbone!r} is not a pretrained model; valid: "
            f"{', '.join(sorted(pretrained.PACKAGES))}"
        )
    if d.head not in de.HEADS:
        raise ValueError(f"distill.head must be one of {', '.join(de.HEADS)}; got {d.head!r}")
    if d.criterion not in exits.CRITERIA:
        raise ValueError(
            f"distill.criterion must be one of {', '.join(exits.CRITERIA)}; got {d.criterion!r}"
        )
    if not (d.train_fps == -1 or d.train_fps >= 0):
        raise ValueError(f"distill.train_fps must be -1 (= clips.fps) or >= 0; got {d.train_fps}")
    if len(d.train_tiles) % 3:
        raise ValueError(
            f"distill.train_tiles must be (scale, y, x) triples, flat; got {len(d.train_tiles)} "
            "numbers"
        )
    if d.train_tiles:
        train_clip_config(config)  # a zero scale: ClipConfig's one-line error
    if isinstance(d.stills, bool) or not isinstance(d.stills, int) or d.stills < 0:
        raise ValueError(f"distill.stills must be an integer >= 0 (0 = none); got {d.stills!r}")
    if d.stills:
        stills.still_paths()  # opencv-doc missing: MissingSourceError, one line
    cfg = clip_config(config)
    for split in ("train", "val", "test"):
        if not getattr(cfg, split):
            raise ValueError(f"distill.clips.{split} names no clip; every split needs one")
    net = pretrained.efficientnet_lite(d.backbone, num_classes=1000, image_size=d.image_size)
    exit_positions(config, net)
    cut_positions(config, net)


def exit_positions(config: ml_collections.ConfigDict, net: Net) -> tuple[int, ...]:
    """The exit positions: ``distill.positions`` or every k-th block boundary."""
    d = config.distill
    if d.positions:
        return feature_cache.check_positions(net, d.positions)
    last_block = feature_cache.block_positions(net)[-1]
    blocks = [p for p in feature_cache.every_kth_block(net, d.exit_every, skip_first=d.exit_skip)]
    # The deepest block reads almost what the final head reads: no exit there.
    picked = tuple(p for p in blocks if p != last_block)
    if not picked:
        raise ValueError("distill.exit_every / exit_skip leave no exit position")
    return picked


def cut_positions(config: ml_collections.ConfigDict, net: Net) -> list[int]:
    """Interior partition points: after every ``cut_every``-th block (and after each exit)."""
    blocks = feature_cache.block_positions(net)
    after = [p + 1 for p in blocks[::-1][:: config.distill.cut_every]]
    return sorted({*after, *(p + 1 for p in exit_positions(config, net))})


def _export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The training-config sections `export.bundle` reads (data, video, exits)."""
    c = ml_collections.ConfigDict()
    c.data = ml_collections.ConfigDict(
        {"name": "clips", **{k: v for k, v in clip_config(config).to_dict().items()
                             if k != "files"}}
    )  # fmt: skip
    c.video = ml_collections.ConfigDict({"enabled": False})
    c.exits = ml_collections.ConfigDict(
        {"criterion": config.distill.criterion, "epsilon": float(config.distill.epsilon)}
    )
    c.distill = config.distill
    return c


def _splits(loaded: clips_lib.ClipSplits) -> Splits:
    def ds(frames: clips_lib.ClipFrames) -> Dataset:
        return Dataset(clips_lib.to_float(frames.frames), frames.labels.astype(np.int32))

    return Splits(ds(loaded.train), ds(loaded.val), ds(loaded.test), loaded.num_classes,
                  loaded.input_shape, "clips")  # fmt: skip


def train(
    config: ml_collections.ConfigDict, train_dir: str, features_dir: str,
    log: Callable[[str], None],
) -> dict:  # fmt: skip
    """Steps 1-4 of the module docstring; returns the training report."""
    d = config.distill
    backbone, variables = pretrained.load(d.backbone, d.image_size)
    loaded = clips_lib.load_clips(clip_config(config))
    log(
        f"clips at {d.image_size} px labelled by {d.clips.reference}: train {len(loaded.train)}, "
        f"val {len(loaded.val)}, test {len(loaded.test)} frames"
    )
    positions = exit_positions(config, backbone)
    frames = {s: getattr(loaded, s).frames for s in ("train", "val", "test")}
    frames["train"], train_clip, counts = _augmented(config, loaded)
    log(f"distillation frames: {len(frames['train'])} ({counts}; flip {d.flip}, "
        f"clip-balanced {d.balance_clips}, stills {d.stills})")  # fmt: skip
    cached = positions
    features = d.head_features
    if d.head == "mimic":  # the backbone's pooled features are the heads' second target
        pool, _ = de.classifier(backbone)
        cached = (*positions, pool)
        features = int(backbone.shapes()[-1][0][-1])
    cache = feature_cache.build(backbone, variables, frames, cached, features_dir, log=log)
    net = de.attach(backbone, positions, de.head_layers(d.head, backbone.num_classes, features))
    settings = de.DistillSettings(
        steps=d.steps, batch_size=d.batch_size, learning_rate=float(d.learning_rate),
        temperature=float(d.temperature), seed=0,
    )  # fmt: skip
    weights = de.group_balanced(train_clip) if d.balance_clips else None
    variables, losses = de.train_heads(net, variables, cache, settings, log=log, weights=weights)
    report = evaluate(net, variables, cache, loaded)
    report["distillation_frames"] = {
        "frames": int(len(frames["train"])), "per_clip": counts, "flip": bool(d.flip),
        "balanced": bool(d.balance_clips), "stills": int(d.stills),
    }  # fmt: skip
    report["losses"] = losses
    report["heads"] = "BranchyNet-style, distilled from the backbone's softmax (not searched)"
    report["feature_cache"] = {k: cache.index[k] for k in ("positions", "shapes", "frames")}
    checkpoint.save_model(
        train_dir, net, variables, _export_config(config).to_dict(),
        json_files={"report.json": report},
    )  # fmt: skip
    return report


def evaluate(net: Net, variables: Any, cache: feature_cache.FeatureCache, loaded) -> dict:
    """Each exit's agreement with the reference labels and with the backbone's top-1."""
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        logits = de.exit_logits(net, variables, cache, split)
        labels = getattr(loaded, split).labels
        out[split] = {
            "frames": int(len(labels)),
            "reference": de.agreement(logits, labels),
            "backbone": de.agreement(logits, logits[FINAL].argmax(-1)),
        }
    test = out["test"]
    return {
        "final_accuracy": test["reference"][FINAL],
        "exits": [
            {
                "name": e.name,
                "position": e.after,
                "accuracy": test["reference"][e.name],
                "backbone_agreement": test["backbone"][e.name],
            }
            for e in net.exits
        ],  # fmt: skip
        "accuracy": out,
        "accuracy_means": "top-1 agreement on the test clips with the reference model's labels "
        "(accuracy) and with the backbone's own final top-1 (backbone_agreement)",
    }


def export(config: ml_collections.ConfigDict, train_dir: str, bundle_dir: str, root: str,
           log: Callable[[str], None]) -> dict:  # fmt: skip
    """The bundle (partitions at the cut points) and the benchmark's test frames."""
    # lazy: TensorFlow (through the converter) is slow to import
    from export.bundle import export_model

    net, variables = checkpoint.load(train_dir)
    loaded = clips_lib.load_clips(clip_config(config))
    splits = _splits(loaded)
    e = config.export
    manifest = export_model(
        _export_config(config), net, variables, bundle_dir, source=os.path.abspath(train_dir),
        precision=e.precision, parity_examples=e.parity_examples,
        epsilons=[float(x) for x in e.epsilons], partitions=True,
        cuts=cut_positions(config, net), splits=splits, overwrite=True, log=log,
    )  # fmt: skip
    path = os.path.join(root, TEST_FRAMES)
    tmp = path + ".tmp.npz"
    np.savez(tmp, x=splits.test.x, y=splits.test.y)
    os.replace(tmp, path)
    return manifest


def test_frames(root: str) -> str:
    """The benchmark's ``--data`` for a distilled job in `root`."""
    return f"npz:{os.path.join(root, TEST_FRAMES)}"
