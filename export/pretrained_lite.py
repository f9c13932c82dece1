"""Exports the pretrained EfficientNet-Lite models' ``full`` graph, checks and times it.

  python -m export.pretrained_lite --out=runs/lite [--models=efficientnet_lite0,...]
      [--image_size=N] [--threads=1,2] [--runs=30] [--rounds=3] [--clips=test]

Per model: load the ImageNet weights (`flexjax.models.pretrained`), convert the
``full`` signature to fp32 TFLite (`export.convert`), check it is GPU-delegate
clean (`runtime.tflite_model`) and agrees with JAX on the check photos shipped
by opencv-doc (top-1 and max |delta logit|), then time batch-1 inference in
the LiteRT interpreter at each thread count (wall time, and the process's CPU
time per frame). Timing rounds interleave models and thread counts so that
load on the machine affects all of them alike; the load average is recorded.
With ``--clips=SPLIT`` it also runs every exported model on that split of
the real clips (`flexjax.data.load_clips`, default `ClipConfig`, decoded at the
model's own resolution) and reports its top-1 agreement with the reference
labels (EfficientNet-Lite2's top-1 at 260 px).
Writes ``<out>/<model>_<size>.tflite`` and ``<out>/report.json``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence

import numpy as np

from export import convert
from flexjax import costs
from flexjax.data import clips as clips_lib
from flexjax.io import write_json_atomic
from flexjax.models import pretrained
from runtime import args as args_lib
from runtime import tflite_model
from runtime.lite import Model
from runtime.profile import Target, time_signature

CHECK_PHOTOS, PHOTOS_DIR = pretrained.CHECK_PHOTOS, pretrained.PHOTOS_DIR


def export_and_check(name: str, out: str, image_size: int | None = None) -> dict:
    """Writes ``<out>/<name>_<size>.tflite`` (fp32, ``full`` only) and checks it against JAX."""
    net, variables = pretrained.load(name, image_size)
    size = net.input_shape[0]
    plans = [p for p in convert.plan_signatures(net) if p.name == convert.FULL]
    buf = convert.to_tflite(net, variables, plans)
    path = os.path.join(out, f"{name}_{size}.tflite")
    with open(path + ".tmp", "wb") as f:
        f.write(buf)
    os.replace(path + ".tmp", path)
    gpu = tflite_model.gpu_report(buf)[convert.FULL]
    x = np.stack([pretrained.load_image(os.path.join(PHOTOS_DIR, f), size) for f in CHECK_PHOTOS])
    ref = convert.jax_outputs(net, variables, plans[0], x)
    sig = Model(path).signature(convert.FULL)
    got = np.concatenate([sig(np.ascontiguousarray(a[None])) for a in x])
    return {
        "model": name,
        "image_size": size,
        "file": path,
        "bytes": len(buf),
        "params": costs.of(net).backbone.params,
        "multiply_adds": costs.multiply_adds(net),
        "gpu_compatible": gpu.gpu_compatible,
        "gpu_offending": list(gpu.gpu_offending),
        "ops": dict(gpu.ops),
        "top1_jax": [int(i) for i in ref.argmax(1)],
        "top1_litert": [int(i) for i in got.argmax(1)],
        "top1_expected": list(CHECK_PHOTOS.values()),
        "max_abs_logit_diff": float(np.abs(got - ref).max()),
    }


def clip_agreement(row: dict, split: str) -> dict:
    """Top-1 agreement of the exported model with the reference labels on one split of the clips."""

    # Only the split's own clips (the default `ClipConfig`'s), decoded at the model's size.
    clips = getattr(clips_lib.ClipConfig(), split)
    config = clips_lib.ClipConfig(
        **{s: (clips if s == split else ()) for s in ("train", "val", "test")},
        resolution=row["image_size"],
    )
    data = getattr(clips_lib.load_clips(config), split)
    sig = Model(row["file"]).signature(convert.FULL)
    x = data.frames.astype(np.float32) / 255.0
    top1 = np.array([int(sig(np.ascontiguousarray(f[None])).argmax()) for f in x])
    sure = data.conf >= 0.5
    return {
        "split": split,
        "clips": list(data.clips),
        "frames": int(len(top1)),
        "agreement": float(np.mean(top1 == data.labels)),
        "frames_reference_conf_ge_0.5": int(sure.sum()),
        "agreement_reference_conf_ge_0.5": float(np.mean(top1[sure] == data.labels[sure]))
        if sure.any()
        else None,
    }


def time_models(
    rows: Sequence[dict], threads: Sequence[int], runs: int, rounds: int, warmup: int = 3
) -> dict[str, dict[int, dict[str, list[float]]]]:
    """Per round: median wall ms and mean process CPU ms per frame of every (model, threads).

    Rounds interleave every (model, threads) pair. CPU time (all threads of
    the process) is reported next to wall time because on a shared machine the
    wall time of a multi-threaded run includes waiting for a core.
    """
    loaded = {
        (r["model"], t): Model(r["file"], num_threads=t).signature(convert.FULL)
        for r in rows
        for t in threads
    }
    out = {r["model"]: {t: {"wall_ms": [], "cpu_ms": []} for t in threads} for r in rows}
    for _ in range(rounds):
        for (name, t), sig in loaded.items():
            c0 = time.process_time()
            wall = time_signature(Target("local", t), sig, runs, warmup)["median_ms"]
            out[name][t]["wall_ms"].append(wall)
            out[name][t]["cpu_ms"].append((time.process_time() - c0) * 1e3 / (runs + warmup))
    return out


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m export.pretrained_lite`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m export.pretrained_lite",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--out", required=True)
    p.add_argument("--models", default=",".join(pretrained.PACKAGES))
    p.add_argument("--image_size", type=args_lib.count(*pretrained.IMAGE_SIZES), default=None)
    p.add_argument("--threads", default="1,2", type=args_lib.number_list(args_lib.threads()))
    p.add_argument("--runs", type=args_lib.count(1, 100_000), default=30)
    p.add_argument("--rounds", type=args_lib.count(1, 1000), default=3)
    p.add_argument("--clips", default="", help="also measure agreement on this clip split")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(args) -> int:
    threads = args.threads
    os.makedirs(args.out, exist_ok=True)
    rows = [export_and_check(m, args.out, args.image_size) for m in args.models.split(",")]
    if args.clips:
        for r in rows:
            r["clips"] = clip_agreement(r, args.clips)
    times = time_models(rows, threads, args.runs, args.rounds)
    for r in rows:
        r["ms_per_frame"] = {
            str(t): {
                "wall_median_of_rounds": float(np.median(v["wall_ms"])),
                "wall_best_round": float(np.min(v["wall_ms"])),
                "cpu_median_of_rounds": float(np.median(v["cpu_ms"])),
                **v,
            }
            for t, v in times[r["model"]].items()
        }
        ms = ", ".join(
            f"{t} thr {r['ms_per_frame'][str(t)]['wall_median_of_rounds']:.1f} ms "
            f"(best round {r['ms_per_frame'][str(t)]['wall_best_round']:.1f}, "
            f"CPU {r['ms_per_frame'][str(t)]['cpu_median_of_rounds']:.1f})"
            for t in threads
        )
        ok = r["top1_litert"] == r["top1_expected"]
        print(
            f"{r['model']} @{r['image_size']}: {r['params'] / 1e6:.3f} M params, "
            f"{r['multiply_adds'] / 1e6:.1f} M MACs, {r['bytes'] / 2**20:.2f} MiB, {ms}, "
            f"GPU clean {r['gpu_compatible']}, photos top-1 {'ok' if ok else r['top1_litert']}, "
            f"max |dlogit| {r['max_abs_logit_diff']:.2e}"
        )
        if "clips" in r:
            c = r["clips"]
            print(
                f"  {c['split']} clips {','.join(c['clips'])}: {c['frames']} frames, top-1 "
                f"agreement with the reference {c['agreement']:.3f} "
                f"({c['agreement_reference_conf_ge_0.5']} on the "
                f"{c['frames_reference_conf_ge_0.5']} frames the reference is >= 50% sure of)"
            )
    report = {"models": rows, "load_average": list(os.getloadavg()), "cpus": os.cpu_count()}
    write_json_atomic(os.path.join(args.out, "report.json"), report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
