"""Exports Edgent's latency sweep: single-layer signatures over layer configurations.

  python -m export.sweep --out=bundles/sweep [--size=full|smoke|lite|lite_smoke] [--seed=0] \
      [--overwrite]

`runtime.profile` times every signature on a target and `export.latency_fit`
fits Edgent's per-layer-kind linear regressions on those times. The sweep
holds, in ``sweep.tflite``, one signature per configuration (randomly
initialised weights: latency does not depend on their values):

* ``conv``: input size, input channels, kernel 1/3/5, stride 1/2, filters;
* ``relu``, ``lrn``, ``dropout``: feature maps and vectors of many sizes;
* ``max_pool`` (window 2/3, stride 1/2, SAME/VALID);
* ``dense``: input and output sizes;
* ``probe``: a relu on one element, whose time is the interpreter's
  per-invocation overhead (subtracted from every layer sample);

(sizes ``lite`` / ``lite_smoke``: EfficientNet-Lite's kinds instead: pointwise
and stem ``conv``, depthwise ``dwconv``, ``mbconv`` blocks, ``rescale``,
``global_pool``, ``dense``), and ``load_NN.tflite`` models of growing size (one
dense layer each) for the model-loading regression. Configurations are drawn with a fixed seed from
ranges that cover the zoo's CIFAR / MNIST networks; the fit holds some out.
The manifest (``format: flexjax-sweep``) lists every signature with the
layer descriptor the latency model reads (`runtime.latency_model`) and every
file's sha256; the directory is staged and renamed into place.
"""

from __future__ import annotations

import datetime
import os
import sys
import time

import jax
import numpy as np

from export import convert, partitions
from export.staging import Staged, write_manifest
from flexjax import models, spec
from flexjax.spec import FINAL
from runtime import args as args_lib

SIZES = ("full", "smoke", "lite", "lite_smoke")
FORMAT = "flexjax-sweep"
MODEL_FILE = "sweep.tflite"
# (count per kind, loading model weights in floats) per size.
_COUNTS = {
    "full": {"conv": 48, "relu": 12, "lrn": 12, "dropout": 8, "max_pool": 16, "dense": 24},
    "smoke": {"conv": 4, "relu": 3, "lrn": 3, "dropout": 3, "max_pool": 3, "dense": 4},
    # EfficientNet-Lite's kinds, at its sizes (lite0 at 224 px down to smoke sizes).
    "lite": {"conv": 16, "dwconv": 16, "mbconv": 24, "rescale": 4, "global_pool": 4, "dense": 4},
    "lite_smoke": {"conv": 4, "dwconv": 4, "mbconv": 4, "rescale": 3, "global_pool": 3, "dense": 4},
}
_LOAD_FLOATS = {
    "full": (4_096, 65_536, 262_144, 1_048_576, 2_097_152, 4_194_304),
    "smoke": (4_096, 262_144),
    "lite": (65_536, 1_048_576, 4_194_304),
    "lite_smoke": (4_096, 262_144),
}


def _configs(size: str, seed: int) -> list[tuple[str, tuple[int, ...], object]]:
    """``[(name, input_shape, layer)]`` drawn reproducibly from the sweep ranges."""

    if size.startswith("lite"):
        return _lite_configs(size, seed)
    rng = np.random.default_rng(seed)
    counts = _COUNTS[size]
    out = []

    def image() -> tuple[int, int, int]:
        h = int(rng.choice([4, 7, 14, 28]))
        return (h, h, int(rng.choice([8, 16, 32, 64, 96, 128, 192])))

    for i in range(counts["conv"]):
        h = int(rng.choice([4, 7, 14, 28]))
        cin = int(rng.choice([1, 3, 16, 32, 64, 96, 128, 192]))
        k = int(rng.choice([1, 3, 5]))
        s = int(rng.choice([1, 1, 2]))
        f = int(rng.choice([8, 16, 32, 64, 96, 128, 192, 256]))
        out.append((f"conv_{i:03d}", (h, h, cin), spec.conv(f, k, s)))
    for kind, make in (("relu", spec.relu), ("lrn", spec.lrn), ("dropout", spec.dropout)):
        for i in range(counts[kind]):
            shape = image() if i % 4 else (int(rng.choice([64, 192, 512, 2048])),)
            if kind == "lrn":
                shape = image()
            out.append((f"{kind}_{i:03d}", shape, make()))
    for i in range(counts["max_pool"]):
        w = int(rng.choice([2, 3]))
        layer = spec.max_pool(w, int(rng.choice([1, 2])), str(rng.choice(["SAME", "VALID"])))
        out.append((f"max_pool_{i:03d}", image(), layer))
    for i in range(counts["dense"]):
        n_in = int(rng.choice([64, 96, 192, 384, 512, 1024, 2048, 4096]))
        n_out = int(rng.choice([10, 32, 64, 96, 192, 384, 512]))
        out.append((f"dense_{i:03d}", (n_in,), spec.dense(n_out)))
    out.append(("probe", (1, 1, 1), spec.relu()))
    return out


def _mbconv(rng, h: int, cin: int) -> tuple[object, int]:
    """A random MBConv block on ``(h, h, cin)`` (expansion 1 or 6, kernel 3/5, stride 1/2)."""
    expand = int(rng.choice([1, 6, 6]))
    k = int(rng.choice([3, 5]))
    s = int(rng.choice([1, 1, 2])) if h > 7 else 1
    cout = cin if s == 1 and rng.random() < 0.5 else int(rng.choice([16, 24, 40, 80, 112, 192]))
    mid = cin * expand
    body = []
    if expand != 1:
        body += [spec.conv(mid, 1, use_bias=False), spec.batch_norm(), spec.relu6()]
    body += [spec.conv(mid, k, s, groups=mid, use_bias=False), spec.batch_norm(), spec.relu6(),
             spec.conv(cout, 1, use_bias=False), spec.batch_norm()]  # fmt: skip
    return spec.mbconv(body, skip=s == 1 and cin == cout), cout


def _lite_configs(size: str, seed: int) -> list[tuple[str, tuple[int, ...], object]]:
    """EfficientNet-Lite's layer kinds over lite0's ranges (7-112 px maps, 16-1280 channels)."""
    rng = np.random.default_rng(seed)
    counts = _COUNTS[size]
    big = size == "lite"
    sides = [7, 14, 28, 56, 112] if big else [2, 4, 8, 16]
    out = []

    def side(channels: int) -> int:
        # Wide maps are shallow and narrow maps deep in a MobileNet: keep sizes realistic.
        ok = [h for h in sides if h * h * channels <= (112 * 112 * 96 if big else 16 * 16 * 96)]
        return int(rng.choice(ok or sides[:1]))

    for i in range(counts["conv"]):  # pointwise (and the 3x3 stem)
        stem = i % 8 == 0
        cin = 3 if stem else int(rng.choice([16, 24, 40, 80, 96, 144, 240, 480, 672, 1152]))
        f = 32 if stem else int(rng.choice([16, 24, 40, 80, 112, 192, 320, 480, 1152, 1280]))
        h = sides[-1] * (2 if big and stem else 1) if stem else side(max(cin, f))
        layer = spec.conv(f, 3 if stem else 1, 2 if stem else 1, use_bias=False)
        out.append((f"conv_{i:03d}", (h, h, cin), layer))
    for i in range(counts["dwconv"]):
        c = int(rng.choice([32, 96, 144, 240, 480, 672, 1152]))
        k, st = int(rng.choice([3, 5])), int(rng.choice([1, 1, 2]))
        layer = spec.conv(c, k, st, groups=c, use_bias=False)
        out.append((f"dwconv_{i:03d}", (side(c),) * 2 + (c,), layer))
    for i in range(counts["mbconv"]):
        cin = int(rng.choice([16, 24, 40, 80, 112, 192]))
        h = side(cin * 6)
        layer, _ = _mbconv(rng, h, cin)
        out.append((f"mbconv_{i:03d}", (h, h, cin), layer))
    for i in range(counts["rescale"]):
        h = int(rng.choice(sides))
        out.append((f"rescale_{i:03d}", (h, h, 3), spec.rescale(1.99, -0.99)))
    for i in range(counts["global_pool"]):
        c = int(rng.choice([64, 320, 1280]))
        out.append((f"global_pool_{i:03d}", (side(c),) * 2 + (c,), spec.global_pool()))
    for i in range(counts["dense"]):
        n_in = int(rng.choice([24, 80, 192, 320, 1280]))
        out.append((f"dense_{i:03d}", (n_in,), spec.dense(int(rng.choice([10, 1000])))))
    out.append(("probe", (1, 1, 1), spec.relu()))
    return out


def _one_layer_net(layer, input_shape):
    """A valid `Net` whose position 0 is `layer` (a tiny classifier follows it)."""

    tail = [spec.dense(2)]
    out = spec.infer_shapes([layer], input_shape)[0][1]
    if len(out) == 3:
        tail = [spec.global_pool(), *tail]
    return spec.Net(tuple(input_shape) if len(input_shape) == 3 else (1, 1, 1), 2, (layer, *tail))


def _flat_input_net(layer, n_in: int):
    # Dense/flat layers: the net's image input is (1, 1, n_in) flattened first.
    return spec.Net((1, 1, n_in), 2, (spec.flatten(), layer, spec.dense(2)))


def build_parts(size: str, seed: int):
    """``(parts for convert.to_tflite_many, manifest rows)`` of the sweep."""

    parts, rows = [], []
    key = jax.random.PRNGKey(seed)
    for name, shape, layer in _configs(size, seed):
        if len(shape) == 3:
            net, start = _one_layer_net(layer, shape), 0
        else:
            net, start = _flat_input_net(layer, shape[0]), 1
        shapes = net.shapes()
        key, sub = jax.random.split(key)
        variables = models.init(net, sub)
        plan = convert.SignaturePlan(
            name, "segment", start, start + 1, FINAL, "x", "activation",
            tuple(shapes[start][0]), tuple(shapes[start][1]),
        )  # fmt: skip
        parts.append((net, variables, [plan]))
        row = partitions.layer_rows((layer,), tuple(shapes[start][0]))[0]
        rows.append({"signature": name, "row": row})
    return parts, rows


def _loading_models(size: str, seed: int, directory: str) -> list[dict]:
    out = []
    for i, floats in enumerate(_LOAD_FLOATS[size]):
        n_in = 256
        n_out = max(2, floats // n_in)
        net = spec.Net((1, 1, n_in), n_out, (spec.flatten(), spec.dense(n_out)))
        variables = models.init(net, jax.random.PRNGKey(seed + i))
        plan = convert.SignaturePlan(
            "load", "segment", 0, 2, FINAL, "x", "logits", (1, 1, n_in), (n_out,)
        )
        buf = convert.to_tflite(net, variables, [plan])
        name = f"load_{i:02d}.tflite"
        with open(os.path.join(directory, name), "wb") as f:
            f.write(buf)
        out.append({"file": name, "signature": "load", "bytes": len(buf)})
    return out


def export_sweep(out: str, *, size: str = "full", seed: int = 0, overwrite: bool = False,
                 log=print) -> dict:  # fmt: skip
    """Writes the sweep bundle to `out`; returns its manifest.

    Raises:
      ValueError: unknown size. FileExistsError: `out` exists without `overwrite`.
    """

    if size not in SIZES:
        raise ValueError(f"unknown sweep size {size!r}; valid: {', '.join(SIZES)}")
    t0 = time.perf_counter()
    staged = Staged(out, overwrite)
    try:
        parts, rows = build_parts(size, seed)
        buf = convert.to_tflite_many(parts)
        with open(os.path.join(staged.dir, MODEL_FILE), "wb") as f:
            f.write(buf)
        loading = _loading_models(size, seed, staged.dir)
        manifest = {
            "format": FORMAT,
            "schema_version": 1,
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "size": size,
            "seed": seed,
            "model": MODEL_FILE,
            "layers": rows,
            "probe": "probe",
            "loading": loading,
            "files": {},
        }
        write_manifest(staged.dir, manifest)
        staged.commit()
    except BaseException:
        staged.abort()
        raise
    log(
        f"sweep: {len(rows)} single-layer signatures + {len(loading)} loading models "
        f"written to {staged.out} in {time.perf_counter() - t0:.1f} s"
    )
    return manifest


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m export.sweep`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m export.sweep", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="sweep bundle directory to create")
    p.add_argument("--size", default="full", choices=SIZES)
    p.add_argument("--seed", type=args_lib.seed(), default=0)
    p.add_argument("--overwrite", action="store_true")
    return p


def main(argv=None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    export_sweep(args.out, size=args.size, seed=args.seed, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
