"""End-to-end: the train.multi_exit job on the smoke config, resume, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flexjax import checkpoint
from flexjax.io import read_jsonl

from conftest import ROOT, SMOKE, run_job


def test_multi_exit_smoke_writes_report_metrics_checkpoints(smoke_workdir):
    files = set(os.listdir(smoke_workdir))
    assert {
        "config.json",
        "net.json",
        "metrics.jsonl",
        "report.json",
        "checkpoints",
        "tensorboard",
    } <= files
    assert any(
        f.startswith("events.out.tfevents")
        for f in os.listdir(os.path.join(smoke_workdir, "tensorboard"))
    )
    report = json.load(open(os.path.join(smoke_workdir, "report.json")))
    for key in ("final_accuracy", "expected_flops", "backbone_flops"):
        assert isinstance(report[key], (int, float))
    names = [r["name"] for r in report["exits"]]
    assert names == ["exit_2", "final"]
    for row in report["exits"]:
        assert {"name", "position", "accuracy", "exit_rate", "flops"} <= set(row)
    assert sum(r["exit_rate"] for r in report["exits"]) == pytest.approx(1.0)
    assert report["final_accuracy"] > 0.3  # 2 tiny epochs, but it learned something
    assert os.path.getsize(os.path.join(smoke_workdir, "tradeoff.png")) > 1000
    final_val = report["calibration"]["final_accuracy"]
    for row in report["tradeoff"]:  # the calibration constraint holds at every epsilon
        assert row["val_accuracy"] >= final_val - row["epsilon"] - 1e-9
    video = report["video"]  # the smoke config films 10 clips of 10 frames from the test split
    assert video["frames"] == 100 and len(video["by_difficulty"]) == 5
    assert sum(video["exit_rates"].values()) == pytest.approx(1.0)
    steps = [
        r["step"]
        for r in read_jsonl(os.path.join(smoke_workdir, "metrics.jsonl"))
        if "train/loss" in r
    ]
    assert steps == sorted(steps) and steps[-1] == report["train"]["steps"]


def test_checkpoint_round_trips_net_and_variables(smoke_workdir):
    net, variables = checkpoint.load(smoke_workdir)
    saved = json.load(open(os.path.join(smoke_workdir, "net.json")))
    assert net.to_dict() == saved
    assert "layer_00" in variables["params"] and "exit_2" in variables["params"]


def test_rerun_finished_workdir_resumes_without_training(smoke_workdir):
    before = json.load(open(os.path.join(smoke_workdir, "report.json")))
    proc = run_job(
        "train.multi_exit", f"--config={SMOKE}", f"--workdir={smoke_workdir}", check=True
    )
    after = json.load(open(os.path.join(smoke_workdir, "report.json")))
    assert after["final_accuracy"] == before["final_accuracy"]
    assert "final accuracy" in proc.stdout


def test_kill_9_mid_run_then_rerun_resumes_from_last_checkpoint(tmp_path):
    workdir = str(tmp_path / "w")
    args = [
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        "--config.train.num_epochs=60",
        "--config.train.checkpoint_every=20",
    ]
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.multi_exit", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpt = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            steps = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
            if steps and max(steps) >= 40:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared within 120 s")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    killed_at = checkpoint.latest_step(ckpt)
    assert killed_at is not None and killed_at < 60 * 18
    run_job("train.multi_exit", *args, check=True)
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["train"]["resumed_from"] >= killed_at > 0
    steps = [
        r["step"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r
    ]
    assert len(steps) == len(set(steps)), "metrics after the resume point must not repeat"
    assert steps[-1] == report["train"]["steps"]


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.train.lrr=1", "error: unknown config key 'train.lrr'; valid keys here: "),
        (
            "--config.foo=1",
            "error: unknown config key 'foo'; valid keys here: calibration, data, exits",
        ),
        ("--config=configs/nope.py", "error: config file configs/nope.py does not exist"),
        (f"--config={SMOKE[:-6]}:bogus", "error: unknown config argument 'bogus'; valid: smoke"),
    ],
)
def test_bad_command_line_is_one_clear_line_and_writes_nothing(tmp_path, flag, message):
    proc = run_job("train.multi_exit", f"--config={SMOKE}", f"--workdir={tmp_path}/w", flag)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.strip().startswith(message)
    assert not os.path.exists(f"{tmp_path}/w")


def test_unknown_key_in_config_file_is_one_clear_line(tmp_path):
    cfg = tmp_path / "bad.py"
    cfg.write_text(
        "from flexjax.config import defaults\n"
        "def get_config(arg=None):\n"
        "    c = defaults()\n"
        "    c.train.unlock()\n"
        "    c.train.epochs = 3\n"
        "    return c\n"
    )
    proc = run_job("train.multi_exit", f"--config={cfg}", f"--workdir={tmp_path}/w")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown config key 'train.epochs'")
    assert not os.path.exists(f"{tmp_path}/w")


def test_unknown_model_name_is_one_clear_line_listing_models(tmp_path):
    proc = run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={tmp_path}/w",
        "--config.model.name=lenet",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown model 'lenet'; valid: alexnet_branchy")
    assert not os.path.exists(f"{tmp_path}/w")


def test_missing_dataset_path_is_one_clear_line_and_writes_nothing(tmp_path):
    proc = run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={tmp_path}/w",
        "--config.data.name=cifar10",
        "--config.data.path=/no/such/dir",
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "/no/such/dir" in proc.stderr
    assert not os.path.exists(f"{tmp_path}/w")


def _snapshot(directory):
    out = {}
    for root, _, files in os.walk(directory):
        for f in files:
            p = os.path.join(root, f)
            out[p] = open(p, "rb").read()
    return out


def test_checkpoint_of_another_net_is_refused_and_left_intact(smoke_workdir):
    before = _snapshot(os.path.join(smoke_workdir, "checkpoints"))
    proc = run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={smoke_workdir}",
        "--config.model.kwargs.width=1.0",
    )
    assert proc.returncode == 1
    assert "different net" in proc.stderr.strip().splitlines()[-1]
    assert _snapshot(os.path.join(smoke_workdir, "checkpoints")) == before


@pytest.mark.parametrize("checkpoint_every", [1, 1000])
def test_nan_loss_stops_with_clear_error_and_keeps_good_checkpoints(tmp_path, checkpoint_every):
    workdir = str(tmp_path / "w")
    proc = run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        "--config.train.optimizer=sgd",
        "--config.train.learning_rate=1e30",
        "--config.train.schedule=constant",
        "--config.train.log_every=1",
        f"--config.train.checkpoint_every={checkpoint_every}",
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: loss became") and "learning_rate" in last
    step = checkpoint.latest_step(os.path.join(workdir, "checkpoints"))
    # the message tells the truth about what is kept
    if step is not None:  # whatever was saved is finite
        assert f"the last good checkpoint (step {step}) is kept in" in last
        _, variables = checkpoint.load(workdir)
        import jax

        assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(variables))
    else:
        assert "no checkpoint was saved before it, so a rerun starts from step 0" in last
        assert "is kept" not in last
    if checkpoint_every == 1000:
        assert step is None


def test_exits_only_training_keeps_backbone_bit_exact(smoke_workdir, tmp_path):
    workdir = str(tmp_path / "exits")
    run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        "--config.train.mode=exits_only",
        f"--config.train.init_from={smoke_workdir}",
        "--config.train.num_epochs=1",
        check=True,
    )
    _, base = checkpoint.load(smoke_workdir)
    _, tuned = checkpoint.load(workdir)
    for k in base["params"]:
        same = all(
            np.array_equal(a, b)
            for a, b in zip(_leaves(base["params"][k]), _leaves(tuned["params"][k]))
        )
        assert same == (not k.startswith("exit_")), k


def _leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_exits_only_without_init_from_is_clear_error(tmp_path):
    proc = run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={tmp_path}/w",
        "--config.train.mode=exits_only",
    )
    assert proc.returncode == 1
    assert "train.init_from" in proc.stderr.strip().splitlines()[-1]


_DP_SCRIPT = """
import json, sys
import jax, numpy as np
from flexjax import config as config_lib, training
sys.path.insert(0, "configs")
import mnist_lenet_branchy as cfg
config = config_lib.validate(cfg.get_config("smoke"))
config.train.augment_shift = 0
setup = training.prepare(config)
net, splits, t = setup.net, setup.splits, config.train
tx = training.make_optimizer(t, 10)
data, repl = training.data_parallel_mesh()
state = jax.device_put(training.initial_state(net, tx, 0, None), repl)
step = training.jit_train_step(net, tx, training.exit_weights(net), t, data, repl)
x, y = splits.train.x[:32], splits.train.y[:32].astype(np.int32)
for _ in range(3):
    state, m = step(state, jax.device_put(x, data), jax.device_put(y, data), jax.random.key(0))
leaves = jax.tree.leaves(jax.device_get(state.params))
print(json.dumps({"devices": jax.local_device_count(),
                  "x_shards": len(jax.device_put(x, data).addressable_shards),
                  "loss": float(m["loss"]),
                  "params": [float(np.asarray(v, np.float64).sum()) for v in leaves]}))
"""


def _dp_run(devices: int) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": ROOT,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
    }
    proc = subprocess.run(
        [sys.executable, "-c", _DP_SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_two_devices_matches_one_device():
    one, two = _dp_run(1), _dp_run(2)
    assert (one["devices"], two["devices"]) == (1, 2)
    assert two["x_shards"] == 2  # the batch really is split across both devices
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
    np.testing.assert_allclose(two["params"], one["params"], rtol=1e-4, atol=1e-4)


def test_job_runs_data_parallel_on_two_devices(tmp_path):
    workdir = str(tmp_path / "dp")
    run_job(
        "train.multi_exit",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        "--config.train.num_epochs=1",
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
        check=True,
    )
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["train"]["devices"] == 2


OTHER_CONFIGS = [
    "mnist_alexnet_branchy",
    "cifar10_alexnet_branchy",
    "cifar10_vgg16",
    "cifar10_inception_v3",
    "cifar10_resnet",
    "fashion_alexnet_branchy",  # the real Fashion-MNIST IDX files, a 600-image slice
]


@pytest.mark.parametrize("name", OTHER_CONFIGS)
def test_every_config_smoke_trains_end_to_end(name, tmp_path):
    workdir = str(tmp_path / name)
    run_job(
        "train.multi_exit", f"--config=configs/{name}.py:smoke", f"--workdir={workdir}", check=True
    )
    report = json.load(open(os.path.join(workdir, "report.json")))
    assert report["exits"][-1]["name"] == "final"
    assert sum(r["exit_rate"] for r in report["exits"]) == pytest.approx(1.0)
    assert 0 < report["expected_flops"] <= report["exits"][-1]["flops"]


def test_throughput_benchmark_job_runs_and_writes_json(tmp_path):
    out = str(tmp_path / "thr.json")
    run_job(
        "train.throughput",
        f"--config={SMOKE}",
        "--steps=3",
        "--warmup=1",
        "--set=train.batch_size=16",
        f"--json={out}",
        check=True,
    )
    (row,) = json.load(open(out))["results"]
    assert row["steps"] == 3 and row["images_per_sec"] > 0
    assert row["batch_size"] == 16 and row["overrides"] == ["train.batch_size=16"]


def test_throughput_unknown_set_key_is_clear_error():
    proc = run_job("train.throughput", f"--config={SMOKE}", "--set=train.lr=1", "--steps=1")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == "error: unknown config key 'train.lr' in --set"


def test_throughput_missing_config_file_is_clear_error():
    proc = run_job("train.throughput", "--config=configs/nope.py", "--steps=1")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: config file configs/nope.py does not exist"


def test_run_steps_scanned_chunks_match_one_step_at_a_time():
    import jax

    from flexjax import config as config_lib
    from flexjax import data as data_lib
    from flexjax import training

    sys.path.insert(0, os.path.join(ROOT, "configs"))
    import mnist_lenet_branchy as cfg

    config = config_lib.validate(cfg.get_config("smoke"))
    setup = training.prepare(config)
    net, t = setup.net, config.train
    tx = training.make_optimizer(t, 10)
    data, repl = training.data_parallel_mesh()
    state0 = jax.device_get(training.initial_state(net, tx, 0, None))
    weights = training.exit_weights(net)
    batches = list(data_lib.batches(setup.splits.train, t.batch_size, seed=0))[:7]
    out = {}
    for k in (1, 3):  # 7 steps = two scanned chunks of 3 + one single step
        fns = training.compile_step_fns(
            net, tx, weights, t, jax.device_put(state0, repl), data, repl, steps_per_call=k
        )
        state, metrics = training.run_steps(
            fns, jax.device_put(state0, repl), batches, jax.random.key(1)
        )
        out[k] = jax.device_get((state.to_tree(), metrics))
    assert int(out[3][0]["step"]) == 7
    for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[3])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
