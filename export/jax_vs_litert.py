"""Time per frame at batch 1: JAX (jit, CPU) vs the exported LiteRT `full` signature.

  python -m export.jax_vs_litert --workdir=runs/lenet --bundle=runs/lenet_bundle

Both run the same backbone on the same test frames, one frame at a time,
interleaved in rounds, in one process; JAX is timed until its output is
ready (`block_until_ready`). Lives in export/ because it needs JAX; the
runtime itself never imports it.
"""

from __future__ import annotations

import os
import sys

import jax
import numpy as np

from export import convert
from export.bundle import load_workdir
from flexjax import training
from flexjax.io import write_json_atomic
from runtime import Bundle, EarlyExitExecutor, timing
from runtime import args as args_lib


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
    fns = {
        "jax_jit": lambda x: fn(sub, x).block_until_ready(),
        "litert_full": ex.run_full,
    }
    t = timing.interleaved(
        fns, {"jax_jit": jax_in, "litert_full": batch1}, rounds=rounds,
        warmup=min(20, len(xs)), order="fixed",
    )  # fmt: skip
    agree = sum(
        int(np.argmax(z) == np.argmax(np.asarray(y)))
        for y, z in zip(t.outputs["jax_jit"], t.outputs["litert_full"])
    )

    res = {
        "frames": len(xs),
        "rounds": rounds,
        "threads_litert": threads,
        "jax_backend": jax.default_backend(),
        **t.stats(),
        "top1_agreement": agree / len(xs),
    }
    res["litert_over_jax_p50"] = res["litert_full"]["p50_ms"] / res["jax_jit"]["p50_ms"]
    return res


def build_parser() -> args_lib.ArgumentParser:
    """The command line of ``python -m export.jax_vs_litert`` (every value's domain declared)."""
    p = args_lib.ArgumentParser(prog="python -m export.jax_vs_litert")
    p.add_argument("--workdir", required=True, type=args_lib.existing_dir())
    p.add_argument("--bundle", required=True, type=args_lib.existing_dir())
    p.add_argument("--frames", type=args_lib.count(1, 100_000), default=500)
    p.add_argument("--rounds", type=args_lib.count(1, 1000), default=3)
    p.add_argument("--threads", type=args_lib.threads(), default=1)
    p.add_argument("--json", default=None, type=args_lib.output_file())
    return p


def main(argv=None) -> int:
    return args_lib.run(build_parser(), _main, argv)


def _main(a) -> int:
    res = measure(a.workdir, a.bundle, a.frames, a.rounds, a.threads)
    print(
        f"batch-1 time per frame ({res['frames']} frames x {res['rounds']} rounds): "
        f"JAX jit ({res['jax_backend']}) p50 {res['jax_jit']['p50_ms']:.4f} ms, "
        f"LiteRT full p50 {res['litert_full']['p50_ms']:.4f} ms "
        f"-> LiteRT/JAX {res['litert_over_jax_p50']:.3f}; "
        f"top-1 agreement {res['top1_agreement']:.3f}"
    )
    if a.json:
        write_json_atomic(a.json, res)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
