"""Benchmark: flexjax's training step against the same step in PyTorch eager, interleaved.

  pip install -e .[train,bench]     # torch (CPU) comes only with the bench extra
  python -m train.throughput_vs_torch --config=configs/mnist_lenet_branchy.py \
      --config=configs/mnist_alexnet_branchy.py --threads=2 --rounds=7 --steps=20 \
      --json=throughput_vs_torch.json

For each config: builds the PyTorch net from the same `Net` spec
(`train.torch_reference`), copies flexjax's initial weights into it, checks
that the logits agree (inference mode, float32), then alternates timed rounds
of `--steps` training steps -- flexjax (run as `train_and_evaluate` runs it,
``train.steps_per_call`` unless `--steps_per_call`) and PyTorch eager, which
one goes first alternating too -- on the same batches in the same order.
Reports the median images/s of each, the median of the per-round ratios and
the load average (the machine may be shared: only the interleaved ratio is
comparable between runs).
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import app, flags, logging

from flexjax.cli import fail, limit_cpu_threads, parse_flags, start_job
from runtime.args import MAX_COUNT, MAX_THREADS
from train.benchmarking import load_config, machine

flags.DEFINE_multi_string("config", None, "Config file(s) (configs/*.py[:arg]).")
flags.DEFINE_integer(
    "threads", 0,
    "CPU threads for both: torch.set_num_threads and XLA's --threads (0 = every core: XLA "
    "keeps its default multi-threaded Eigen, which --threads=N turns off).",
    lower_bound=0, upper_bound=MAX_THREADS,
)  # fmt: skip
flags.DEFINE_integer(
    "xla_threads",
    -1,
    "XLA's threads if not --threads (-1 = same as --threads).",
    lower_bound=-1,
    upper_bound=MAX_THREADS,
)
flags.DEFINE_integer("rounds", 7, "Timed rounds per framework (interleaved).", lower_bound=1,
                     upper_bound=10_000)  # fmt: skip
flags.DEFINE_integer("steps", 20, "Train steps per round.", lower_bound=1, upper_bound=MAX_COUNT)
flags.DEFINE_integer("warmup", 3, "Untimed steps of each first.", lower_bound=1,
                     upper_bound=MAX_COUNT)  # fmt: skip
flags.DEFINE_integer(
    "steps_per_call",
    0,
    "flexjax steps per jitted call (0 = the config's).",
    lower_bound=0,
    upper_bound=100_000,
)
flags.DEFINE_enum(
    "omp_wait_policy", "PASSIVE", ["PASSIVE", "ACTIVE", "default"],
    "OMP_WAIT_POLICY for torch's OpenMP threads. PASSIVE is torch's best on a shared "
    "(loaded) machine: spinning OpenMP workers lose their time slices (5-10x slower steps).",
)  # fmt: skip
flags.DEFINE_string("json", "", "Also write the results here.")
flags.DEFINE_multi_string("set", [], "Override a config value in every config (key=value).")
flags.mark_flag_as_required("config")
FLAGS = flags.FLAGS


def _load() -> tuple[float, float, float]:
    return tuple(round(v, 2) for v in os.getloadavg())


def compare(config, threads: int, rounds: int, steps: int, warmup: int, steps_per_call: int):
    """One config's interleaved flexjax vs PyTorch measurement (a JSON-able row)."""
    # lazy: torch is the optional bench extra; JAX loads after --threads is applied
    import jax
    import numpy as np
    import torch

    from flexjax import data as data_lib
    from flexjax import training
    from train import torch_reference

    torch.set_num_threads(threads or os.cpu_count())
    setup = training.prepare(config)
    config, net, splits = setup.config, setup.net, setup.splits
    t = config.train
    k = steps_per_call or t.steps_per_call
    total = warmup + rounds * steps
    data_sharding, replicated = training.data_parallel_mesh()
    tx = training.make_optimizer(t, total)
    weights = training.exit_weights(net, tuple(t.exit_weights), "joint")
    state0 = training.initial_state(net, tx, config.seed, None)
    variables = jax.device_get(state0.variables())
    x_check = np.asarray(splits.val.x[:16], np.float32)
    logit_diff = torch_reference.max_logit_difference(net, variables, x_check)

    pool = list(data_lib.batches(splits.train, t.batch_size, seed=config.seed, drop_remainder=True))
    batches = [pool[i % len(pool)] for i in range(total)]
    trainer = torch_reference.TorchTrainer(net, variables, t, weights, total, seed=config.seed)
    state = jax.device_put(state0, replicated)
    fns = training.compile_step_fns(
        net, tx, weights, t, state, data_sharding, replicated, steps_per_call=k
    )
    rng = jax.random.key(config.seed + 1)

    state, _ = training.run_steps(fns, state, batches[:warmup], rng)
    jax.block_until_ready(state)
    for x, y in batches[:warmup]:
        trainer.step(x, y)

    def run_jax(chunk):
        nonlocal state
        t0 = time.perf_counter()
        state, m = training.run_steps(fns, state, chunk, rng)
        jax.block_until_ready(state)
        return time.perf_counter() - t0, float(m["loss"])

    def run_torch(chunk):
        t0 = time.perf_counter()
        for x, y in chunk:
            loss = trainer.step(x, y)
        return time.perf_counter() - t0, float(loss)

    load_before = _load()
    jx, tr, losses = [], [], []
    for r in range(rounds):
        chunk = batches[warmup + r * steps : warmup + (r + 1) * steps]
        order = (run_jax, run_torch) if r % 2 == 0 else (run_torch, run_jax)
        got = {fn: fn(chunk) for fn in order}
        images = sum(len(x) for x, _ in chunk)
        jx.append(images / got[run_jax][0])
        tr.append(images / got[run_torch][0])
        losses.append((got[run_jax][1], got[run_torch][1]))
        logging.info("round %d: flexjax %.1f, torch %.1f images/s", r, jx[-1], tr[-1])
    return {
        "model": config.model.name,
        "net": net.name,
        "input_shape": list(net.input_shape),
        "batch_size": t.batch_size,
        "optimizer": t.optimizer,
        "steps_per_round": steps,
        "rounds": rounds,
        "threads": threads or os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "steps_per_call": fns.k,
        "flexjax_images_per_sec": statistics.median(jx),
        "torch_images_per_sec": statistics.median(tr),
        "ratio": statistics.median(a / b for a, b in zip(jx, tr)),
        "flexjax_rounds": [round(v, 1) for v in jx],
        "torch_rounds": [round(v, 1) for v in tr],
        "last_losses_flexjax_torch": [round(v, 4) for v in losses[-1]],
        "max_logit_difference": logit_diff,
        "flexjax_compile_seconds": round(fns.compile_seconds, 2),
        "load_average_before": load_before,
        "load_average_after": _load(),
        "torch_version": torch.__version__,
        "jax_version": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
    }


def main(argv: list[str]) -> None:
    start_job(argv)
    try:
        configs = [(spec, load_config(spec, FLAGS.set)) for spec in FLAGS.config]
        limit_cpu_threads(FLAGS.threads if FLAGS.xla_threads < 0 else FLAGS.xla_threads)
    except (ValueError, TypeError, OSError) as e:
        fail(str(e))
    if FLAGS.omp_wait_policy != "default":  # read once, when torch's OpenMP starts
        os.environ["OMP_WAIT_POLICY"] = FLAGS.omp_wait_policy
    try:
        # lazy: torch is the optional bench extra, checked before anything runs
        import torch  # noqa: F401
    except ImportError:
        fail("this benchmark needs PyTorch: pip install -e .[bench]")
    # lazy: loads JAX
    from flexjax.io import write_json_atomic

    rows = []
    print(f"{'config':<36} {'flexjax':>9} {'torch':>9} {'ratio':>6}  load avg (1 min)")
    for spec, config in configs:
        try:
            row = compare(
                config, FLAGS.threads, FLAGS.rounds, FLAGS.steps, FLAGS.warmup, FLAGS.steps_per_call
            )
        except (ValueError, TypeError, FileNotFoundError) as e:
            fail(str(e))
        rows.append({"config": spec, "overrides": FLAGS.set, **row})
        print(
            f"{spec:<36} {row['flexjax_images_per_sec']:>9.1f} {row['torch_images_per_sec']:>9.1f}"
            f" {row['ratio']:>6.2f}  {row['load_average_before'][0]:.2f} -> "
            f"{row['load_average_after'][0]:.2f}  (images/s, batch {row['batch_size']}, "
            f"logits differ by {row['max_logit_difference']:.1e})"
        )
    if FLAGS.json:
        write_json_atomic(
            FLAGS.json,
            {"machine": machine(), "results": rows},
        )
    print(json.dumps({r["config"]: round(r["ratio"], 3) for r in rows}))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
