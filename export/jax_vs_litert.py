"""Time per frame at batch 1: JAX (jit, CPU) vs the exported LiteRT `full` signature.

  python -m export.jax_vs_litert --workdir=runs/lenet --bundle=runs/lenet_bundle

Both run the same backbone on the same test frames, one frame at a time,
interleaved in rounds, in one process; JAX is timed until its output is
ready (`block_until_ready`). Lives in export/ because it needs JAX; the
runtime itself never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

from export import convert
from export.bundle import load_workdir
from flexjax import training
from runtime import Bundle, EarlyExitExecutor
from runtime.bench import time_stats


def measure(workdir: str, bundle_dir: str, frames: int = 500, rounds: int = 3, threads: int = 1):
    config, net, variables = load_workdir(workdir)
    bundle = Bundle.from_dir(bundle_dir)
    if bundle.manifest["net"] != net.to_dict():
        raise ValueError(f"bundle {bundle_dir} was not exported from {workdir} (nets differ)")
    xs = training.load_data(config).test.x[:frames]
    plan = next(p for p in convert.plan_signatures(net) if p.name == convert.FULL)
    fn = jax.jit(convert.signature_fn(net, plan))
    sub = convert.signature_variables(net, variables, plan)
    ex = EarlyExitExecutor(bundle, num_threads=threads)
    batch1 = [np.ascontiguousarray(x[None]) for x in xs]
    jax_in = [jax.device_put(x) for x in batch1]
    fn(sub, jax_in[0]).block_until_ready()
    for x in batch1[:20]:
        ex.run_full(x)
    t_jax, t_lite = [], []
    agree = 0
    for r in range(rounds):
        for x in jax_in:
            t0 = time.perf_counter_ns()
            y = fn(sub, x).block_until_ready()
            t_jax.append(time.perf_counter_ns() - t0)
        for j, x in enumerate(batch1):
            t0 = time.perf_counter_ns()
            z = ex.run_full(x)
            t_lite.append(time.perf_counter_ns() - t0)
            if r == 0:
                agree += int(np.argmax(z) == np.argmax(np.asarray(fn(sub, jax_in[j]))))
    del y

    res = {
        "frames": len(xs),
        "rounds": rounds,
        "threads_litert": threads,
        "jax_backend": jax.default_backend(),
        "jax_jit": time_stats(t_jax),
        "litert_full": time_stats(t_lite),
        "top1_agreement": agree / len(xs),
    }
    res["litert_over_jax_p50"] = res["litert_full"]["p50_ms"] / res["jax_jit"]["p50_ms"]
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export.jax_vs_litert")
    p.add_argument("--workdir", required=True)
    p.add_argument("--bundle", required=True)
    p.add_argument("--frames", type=int, default=500)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    try:
        res = measure(a.workdir, a.bundle, a.frames, a.rounds, a.threads)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(
        f"batch-1 time per frame ({res['frames']} frames x {res['rounds']} rounds): "
        f"JAX jit ({res['jax_backend']}) p50 {res['jax_jit']['p50_ms']:.4f} ms, "
        f"LiteRT full p50 {res['litert_full']['p50_ms']:.4f} ms "
        f"-> LiteRT/JAX {res['litert_over_jax_p50']:.3f}; "
        f"top-1 agreement {res['top1_agreement']:.3f}"
    )
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
