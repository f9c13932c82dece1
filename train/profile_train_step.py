"""Profile: where one training step's time goes on this CPU, per HLO op (docs/training_profile.md).

  python -m train.profile_train_step --config=configs/mnist_alexnet_branchy.py \
      --steps=10 --out=/tmp/profile_alexnet

Compiles the config's real train step (`flexjax.training.compile_step_fns`),
runs `--steps` steps under `jax.profiler.trace` (the XLA:CPU thunk executor
records one event per HLO op), then sums every op's time over the worker
threads and classifies it with the compiled HLO's metadata: forward or
backward (``transpose(jvp(...))``), convolution, dense, pooling, LRN,
elementwise; what runs outside the model (loss, optimizer, augmentation);
and the host's time between steps (wall time minus the device's busy span).
Writes ``ops.json``, the HLO text and the trace (TensorBoard/XProf-readable)
under `--out`.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import re
import time

from absl import app, flags

from flexjax.cli import fail, limit_cpu_threads, parse_flags, start_job
from runtime.args import MAX_THREADS
from train.benchmarking import load_config

flags.DEFINE_string("config", None, "Config file (configs/*.py[:arg]).")
flags.DEFINE_integer("steps", 10, "Profiled steps.", lower_bound=1, upper_bound=1000)
flags.DEFINE_integer("threads", 0, "CPU threads (0 = every core).", lower_bound=0,
                     upper_bound=MAX_THREADS)  # fmt: skip
flags.DEFINE_integer("steps_per_call", 0, "0 = the config's train.steps_per_call.",
                     lower_bound=0, upper_bound=100_000)  # fmt: skip
flags.DEFINE_string("out", "/tmp/flexjax_profile", "Directory for the trace, HLO and ops.json.")
flags.DEFINE_integer("top", 25, "Ops to list.", lower_bound=0, upper_bound=100_000)
flags.DEFINE_multi_string("set", [], "Override a config value (key=value).")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS

_HLO_LINE = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) ([a-z][\w\-]*)\((.*)$", re.M)
_POOL_OPS = {"reduce-window", "select-and-scatter", "scatter"}
_COMPUTATION = re.compile(r"^%([\w.\-]+) [^\n]*\{\n(.*?)\n\}", re.M | re.S)


def hlo_index(hlo: str) -> dict[str, dict]:
    """HLO instruction name -> its shape, opcode, op_name metadata and the ops it fuses."""
    inner = {
        m.group(1): set(re.findall(r"= \S+ ([a-z][\w\-]*)\(", m.group(2)))
        for m in _COMPUTATION.finditer(hlo)
    }
    out = {}
    for m in _HLO_LINE.finditer(hlo):
        name, shape, op, rest = m.groups()
        op_name = re.search(r'op_name="([^"]*)"', rest)
        calls = re.search(r"calls=%([\w.\-]+)", rest)
        out[name] = {
            "shape": shape,
            "op": op,
            "op_name": op_name.group(1) if op_name else "",
            "ops": sorted(inner.get(calls.group(1), set()) | {op}) if calls else [op],
        }
    return out


def classify(name: str, info: dict | None) -> tuple[str, str]:
    """(category, layer) of one profiled op; category is e.g. ``bwd conv`` or ``optimizer``."""
    info = info or {"op_name": "", "ops": [], "shape": ""}
    ops, on = set(info["ops"]), info["op_name"]
    layer = re.search(r"(exit_\d+/)?layer_\d+", on)
    if "convolution" in ops:
        kind = "conv"
    elif "dot" in ops:
        kind = "dense"
    elif ops & _POOL_OPS or name.startswith(("wrapped_iota", "wrapped_reduce-window")):
        kind = "max_pool (reduce-window / its gradient)"
    elif "power" in ops:
        kind = "lrn"
    else:
        kind = "elementwise / copies / other"
    if not on:  # wrapped single ops carry no metadata: forward or backward is unknown
        return "fwd/bwd (no metadata) " + kind, ""
    if "MultiExitModel" not in on:
        return "outside the model (loss, optimizer, augmentation): " + kind, ""
    return ("bwd " if "transpose(" in on else "fwd ") + kind, layer.group(0) if layer else ""


def profile(config, steps: int, steps_per_call: int, out: str) -> dict:
    """Traces `steps` train steps; returns the per-category and per-op breakdown."""
    # lazy: JAX loads after --threads is applied
    import jax
    from jax.profiler import ProfileData

    from flexjax import data as data_lib
    from flexjax import training

    setup = training.prepare(config)
    config, net, splits = setup.config, setup.net, setup.splits
    t = config.train
    data_sharding, replicated = training.data_parallel_mesh()
    tx = training.make_optimizer(t, 1000)
    weights = training.exit_weights(net, tuple(t.exit_weights), "joint")
    state = jax.device_put(training.initial_state(net, tx, config.seed, None), replicated)
    k = steps_per_call or t.steps_per_call
    fns = training.compile_step_fns(
        net, tx, weights, t, state, data_sharding, replicated, steps_per_call=k
    )
    pool = list(data_lib.batches(splits.train, t.batch_size, seed=0, drop_remainder=True))
    batches = [pool[i % len(pool)] for i in range(steps)]
    rng = jax.random.key(0)
    for _ in range(2):  # warm up (allocations, first-run work)
        state, _ = training.run_steps(fns, state, batches, rng)
    jax.block_until_ready(state)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "train_step.hlo.txt"), "w") as f:
        f.write((fns.many or fns.one).as_text())
    t0 = time.perf_counter()
    with jax.profiler.trace(os.path.join(out, "trace")):
        state, _ = training.run_steps(fns, state, batches, rng)
        jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    index = hlo_index((fns.many or fns.one).as_text() + "\n" + fns.one.as_text())
    path = sorted(glob.glob(os.path.join(out, "trace", "**", "*.xplane.pb"), recursive=True))[-1]
    per_op: collections.Counter = collections.Counter()
    busy: list[tuple[int, int]] = []
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor::Execute"):
                    if "wait" not in ev.name:
                        busy.append((ev.start_ns, ev.start_ns + ev.duration_ns))
                    continue
                per_op[ev.name] += ev.duration_ns
    # The device's busy span: the union of executor intervals; the rest of the wall is host.
    busy_ns, end = 0, 0
    for s, e in sorted(busy):
        if e > end:
            busy_ns += e - max(s, end)
            end = e
    total = sum(per_op.values())
    cats: collections.Counter = collections.Counter()
    rows = []
    for name, ns in per_op.items():
        cat, layer = classify(name, index.get(name))
        cats[cat] += ns
        info = index.get(name, {})
        rows.append(
            {
                "op": name,
                "ms_per_step": ns / 1e6 / steps,
                "category": cat,
                "layer": layer,
                "shape": info.get("shape", ""),
                "op_name": info.get("op_name", ""),
            }
        )
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {
        "config": config.model.name,
        "batch_size": t.batch_size,
        "steps": steps,
        "steps_per_call": fns.k,
        "wall_ms_per_step": 1e3 * wall / steps,
        "executor_busy_ms_per_step": busy_ns / 1e6 / steps,
        "op_thread_ms_per_step": total / 1e6 / steps,
        "categories": {c: v / 1e6 / steps for c, v in cats.most_common()},
        "ops": rows,
        "load_average": os.getloadavg(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def main(argv: list[str]) -> None:
    start_job(argv)
    try:
        config = load_config(FLAGS.config, FLAGS.set)
        limit_cpu_threads(FLAGS.threads)
    except (ValueError, TypeError, OSError) as e:
        fail(str(e))
    r = profile(config, FLAGS.steps, FLAGS.steps_per_call, FLAGS.out)
    with open(os.path.join(FLAGS.out, "ops.json"), "w") as f:
        json.dump(r, f, indent=1)
    total = r["op_thread_ms_per_step"]
    print(
        f"{r['config']} batch {r['batch_size']}: wall {r['wall_ms_per_step']:.1f} ms/step, "
        f"executor busy {r['executor_busy_ms_per_step']:.1f} ms/step, op time summed over "
        f"threads {total:.1f} ms/step, load {r['load_average'][0]:.2f}"
    )
    for c, ms in r["categories"].items():
        print(f"  {ms:8.2f} ms {100 * ms / total:5.1f}%  {c}")
    for row in r["ops"][: FLAGS.top]:
        print(
            f"  {row['ms_per_step']:8.2f} ms  {row['op']:<28} {row['category'][:40]:<40} "
            f"{row['layer']:<16} {row['shape'][:30]}"
        )


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
