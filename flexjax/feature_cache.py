"""A frozen backbone's activations at chosen positions, computed once and kept on disk.

Exits trained on a frozen backbone (BranchyNet-style distilled heads for
Edgent, FlexDNN's candidate exits) only ever read the backbone's activation
at their position and its final logits. `build` runs the backbone (jitted,
batched, inference mode) once over the frames of each split and writes

  <directory>/index.json          key, positions, shapes, frames per split, backbone digest
  <directory>/<split>_pNN.npy     float32 [N, *shape]: output of backbone position NN
  <directory>/<split>_logits.npy  float32 [N, num_classes]: the backbone's final logits

The key is the sha256 of (format, the net's spec, the digest of its
variables, the positions, the digest of every split's frames): a rerun with
the same inputs reads the files (memory-mapped) and runs nothing; any change
(another backbone, other weights, other frames or positions) rebuilds the
cache. The directory is written as a temporary sibling and renamed, so a
failed build leaves the old cache (or nothing) in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from flexjax.models.build import build as build_module
from flexjax.spec import Net

FORMAT = 1
INDEX = "index.json"
BLOCK_KINDS = ("mbconv", "residual", "inception")  # a composite block is one position


def block_positions(net: Net) -> list[int]:
    """Backbone positions that end a block (mbconv / residual / inception), in order."""
    return [i for i, layer in enumerate(net.layers) if layer.kind in BLOCK_KINDS]


def every_kth_block(net: Net, every: int, *, skip_first: int = 0) -> list[int]:
    """Every `every`-th block boundary (counting from the last), after the first `skip_first`.

    Counting from the last block keeps the deepest boundary, where an exit is most accurate.

    Raises:
      ValueError: `every` < 1, or no block is left.
    """
    if every < 1:
        raise ValueError(f"every must be >= 1; got {every}")
    blocks = block_positions(net)[skip_first:]
    picked = sorted(blocks[::-1][::every])
    if not picked:
        raise ValueError(f"{net.name or 'the net'} has no block boundary after {skip_first}")
    return picked


def check_positions(net: Net, positions: Sequence[int]) -> tuple[int, ...]:
    """`positions` sorted, each a backbone position that can hold an exit.

    Raises:
      ValueError: a position outside ``0 .. L-2`` (its valid range named) or a duplicate.
    """
    last = len(net.layers) - 2
    pos = tuple(int(p) for p in positions)
    bad = [p for p in pos if not 0 <= p <= last]
    if bad:
        raise ValueError(
            f"position {bad[0]} does not exist; exits hang off backbone positions 0..{last} "
            f"(blocks: {block_positions(net)})"
        )
    if len(set(pos)) != len(pos):
        raise ValueError(f"positions must be distinct; got {list(pos)}")
    return tuple(sorted(pos))


def variables_digest(variables: Mapping[str, Any]) -> str:
    """sha256 of every leaf of `variables` (path, dtype, shape, bytes), in sorted path order."""
    h = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for path, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def frames_digest(frames: np.ndarray) -> str:
    a = np.ascontiguousarray(frames)
    return hashlib.sha256(f"{a.dtype}|{a.shape}|".encode() + a.tobytes()).hexdigest()


def _as_float(frames: np.ndarray) -> np.ndarray:
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / np.float32(255.0)
    return np.asarray(frames, np.float32)


@dataclasses.dataclass(frozen=True)
class FeatureCache:
    """A built cache: `features(split, position)` and `logits(split)` read its arrays."""

    directory: str
    index: dict

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(self.index["positions"])

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.index["frames"])

    def _path(self, split: str, what: str) -> str:
        if split not in self.index["frames"]:
            raise ValueError(f"no split {split!r} in the cache; valid: {', '.join(self.splits)}")
        return os.path.join(self.directory, f"{split}_{what}.npy")

    def features(self, split: str, position: int) -> np.ndarray:
        """float32 [N, *shape] (memory-mapped): the output of backbone `position` on `split`."""
        if position not in self.positions:
            raise ValueError(f"position {position} is not cached; cached: {list(self.positions)}")
        return np.load(self._path(split, f"p{position:02d}"), mmap_mode="r")

    def logits(self, split: str) -> np.ndarray:
        """float32 [N, num_classes]: the backbone's final logits on `split`."""
        return np.load(self._path(split, "logits"))


def _key(net: Net, weights: str, positions: Sequence[int], frames: Mapping[str, str]) -> str:
    blob = json.dumps(
        {"format": FORMAT, "net": net.to_dict(), "weights": weights,
         "positions": list(positions), "frames": dict(sorted(frames.items()))},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(blob.encode()).hexdigest()


def open_cache(directory: str, key: str | None = None) -> FeatureCache | None:
    """The cache in `directory` if it is complete (and has `key` when given), else None."""
    try:
        with open(os.path.join(directory, INDEX)) as f:
            index = json.load(f)
    except (OSError, ValueError):
        return None
    if index.get("format") != FORMAT or (key is not None and index.get("key") != key):
        return None
    cache = FeatureCache(directory, index)
    for split in cache.splits:
        for what in [f"p{p:02d}" for p in cache.positions] + ["logits"]:
            if not os.path.isfile(cache._path(split, what)):
                return None
    return cache


def build(
    net: Net,
    variables: Mapping[str, Any],
    frames: Mapping[str, np.ndarray],
    positions: Sequence[int],
    directory: str,
    *,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
) -> FeatureCache:
    """Runs `net`'s backbone once over each split's frames; caches the activations.

    Args:
      net: the backbone (its exits, if any, are ignored).
      variables: its frozen variables.
      frames: split name -> uint8 [N, H, W, C] (or float32 in [0, 1]) at ``net.input_shape``.
      positions: backbone positions whose outputs are kept (`check_positions`).
      directory: the cache directory (rebuilt when stale, reused when current).
      batch_size: frames per jitted call (the last batch is padded: one compiled shape).

    Returns:
      The `FeatureCache`.

    Raises:
      ValueError: a bad position, frames that do not fit the net, or batch_size < 1.
    """
    positions = check_positions(net, positions)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1; got {batch_size}")
    for split, x in frames.items():
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(net.input_shape):
            raise ValueError(
                f"{split} frames have shape {x.shape}; the net takes [N, "
                f"{', '.join(map(str, net.input_shape))}]"
            )
    weights = variables_digest(variables)
    digests = {s: frames_digest(x) for s, x in frames.items()}
    key = _key(net, weights, positions, digests)
    cached = open_cache(directory, key)
    if cached is not None:
        log(f"feature cache {directory}: current, reused")
        return cached

    bare = Net(net.input_shape, net.num_classes, net.layers, (), net.name)
    module = build_module(bare)
    bounds = [*positions, len(net.layers) - 1]
    segments = []  # (start, stop): positions [start, stop) per jitted call
    start = 0
    for p in bounds:
        segments.append((start, p + 1))
        start = p + 1
    fns = [
        jax.jit(lambda v, h, a=a, b=b: module.apply(v, h, start=a, stop=b, heads=False))
        for a, b in segments
    ]
    parent = os.path.dirname(os.path.abspath(directory)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".features-", dir=parent)
    try:
        shapes = {}
        for split, x in frames.items():
            outs: dict[str, list[np.ndarray]] = {f"p{p:02d}": [] for p in positions}
            outs["logits"] = []
            for i in range(0, len(x), batch_size):
                xb = _as_float(x[i : i + batch_size])
                n = len(xb)
                if n < batch_size:
                    xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
                h = xb
                for (_, b), fn, p in zip(segments, fns, bounds):
                    res = fn(dict(variables), h)
                    if b == len(net.layers):
                        outs["logits"].append(np.asarray(res["final"][:n], np.float32))
                    else:
                        h = res["activation"]
                        outs[f"p{p:02d}"].append(np.asarray(h[:n], np.float32))
            for what, parts in outs.items():
                arr = (
                    np.concatenate(parts)
                    if parts
                    else np.zeros((0, *_shape_of(net, what)), np.float32)
                )
                np.save(os.path.join(tmp, f"{split}_{what}.npy"), arr)
                shapes[what] = list(arr.shape[1:])
            log(f"feature cache: {split} ({len(x)} frames) through {len(positions)} positions")
        shapes_of = net.shapes()
        index = {
            "format": FORMAT,
            "key": key,
            "net": net.name,
            "weights_sha256": weights,
            "input_shape": list(net.input_shape),
            "positions": list(positions),
            "shapes": {f"p{p:02d}": list(shapes_of[p][1]) for p in positions},
            "num_classes": net.num_classes,
            "frames": {s: int(len(x)) for s, x in frames.items()},
            "frames_sha256": digests,
        }
        with open(os.path.join(tmp, INDEX), "w") as f:
            json.dump(index, f, indent=2)
        if os.path.lexists(directory):
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return FeatureCache(directory, index)


def _shape_of(net: Net, what: str) -> tuple[int, ...]:
    if what == "logits":
        return (net.num_classes,)
    return tuple(net.shapes()[int(what[1:])][1])
