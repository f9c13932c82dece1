"""flexjax.batched_exit (issue 17.5): batched early exit in JAX with bucketed compaction.

Proves: the bucket ladder is bounded and hand-computable; every frame's exit and prediction
equal the per-frame reference (batch 1, first passing exit, `runtime.criteria`) at any batch
size and exit pattern; no call compiles after `compile`; the benchmark command runs.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from flexjax import models
from flexjax.batched_exit import MAX_BUCKETS, BatchedExitExecutor, bucket_for, buckets
from runtime import criteria

from conftest import run_job


def test_buckets_are_powers_of_two_up_to_the_batch():
    assert buckets(1) == (1,)
    assert buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert buckets(100) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert buckets(64, min_bucket=8) == (8, 16, 32, 64)
    assert buckets(64, half_steps=True) == (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
    assert len(buckets(1 << 20)) <= MAX_BUCKETS
    assert [bucket_for(n, buckets(64)) for n in (1, 2, 3, 5, 33, 64)] == [1, 2, 4, 8, 64, 64]
    with pytest.raises(ValueError, match="do not fit"):
        bucket_for(65, buckets(64))
    with pytest.raises(ValueError, match=">= 1"):
        buckets(0)


@pytest.fixture(scope="module")
def tiny():
    """A random LeNet with two side exits (frames can leave at 0, 1 or final)."""
    net = models.get_model(
        "lenet_branchy", input_shape=(28, 28, 1), num_classes=10, width=0.25, exits=(2, 5)
    )
    variables = models.init(net, jax.random.PRNGKey(1))
    x = np.random.default_rng(0).random((96, 28, 28, 1), np.float32)
    return net, variables, x


def _splitting_thresholds(net, variables, x, criterion):
    """Per side exit, the median score on `x`: about half of the frames reaching it leave."""
    ex = BatchedExitExecutor(net, variables, {}, criterion, max_batch=128)
    logits = ex.stage_inputs(np.concatenate([x, x[: 128 - len(x)]]))
    out = {}
    for i, e in enumerate(net.exits):
        _, lg = ex.run_stage(i, logits[i])
        s = np.median(criteria.score(np.asarray(lg)[: len(x)], criterion))
        out[e.name] = criteria.from_score(float(s), criterion)
    return out


@pytest.mark.parametrize("criterion", ["entropy", "max_softmax"])
def test_batched_exits_and_predictions_equal_the_per_frame_reference(tiny, criterion):
    net, variables, x = tiny
    thr = _splitting_thresholds(net, variables, x, criterion)
    ex = BatchedExitExecutor(net, variables, thr, criterion, max_batch=32)
    x = x[:32]
    ref = ex.run_per_frame(x)
    assert set(ref.exit_index.tolist()) == {0, 1, 2}  # every exit is taken
    compiled = ex.compile([32, 20])
    assert compiled["buckets"] == [1, 2, 4, 8, 16, 32]
    n_exec = ex.executables
    for size in (32, 20, 7, 1):
        for start in range(0, 32, size):
            xb = x[start : start + size]
            got = ex.run(jax.device_put(xb) if len(xb) in (32, 20) else xb)
            want_where = ref.exit_index[start : start + len(xb)]
            np.testing.assert_array_equal(got.exit_index, want_where)
            np.testing.assert_array_equal(got.predictions, ref.predictions[start : start + len(xb)])
            np.testing.assert_allclose(
                got.logits, ref.logits[start : start + len(xb)], rtol=0, atol=1e-5
            )
            # Later stages ran at the bucket of the frames still running, never more.
            reach = [int((want_where >= i).sum()) for i in range(3)]
            for b, r in zip(got.stage_batches, reach):
                assert (b == 0) if r == 0 else b == bucket_for(r, ex.buckets)
    assert ex.executables == n_exec  # no call compiled anything


def test_no_threshold_runs_everything_to_final_at_the_full_bucket(tiny):
    net, variables, x = tiny
    ex = BatchedExitExecutor(net, variables, {"exit_5": None}, "entropy", max_batch=32)
    r = ex.run(x[:32])
    assert (r.exit_index == 2).all() and r.stage_batches == (32, 32, 32)
    f = ex.flop_speedup(r.exit_index)
    assert f["exit_rates"] == {"exit_2": 0.0, "exit_5": 0.0, "final": 1.0}
    assert f["speedup"] < 1.0  # the side heads ran for nothing


def test_bad_batches_and_thresholds_are_refused(tiny):
    net, variables, x = tiny
    with pytest.raises(ValueError, match="unknown exits"):
        BatchedExitExecutor(net, variables, {"exit_9": 1.0}, "entropy")
    with pytest.raises(ValueError, match="unknown exit criterion"):
        BatchedExitExecutor(net, variables, {}, "margin")
    ex = BatchedExitExecutor(net, variables, {}, "entropy", max_batch=8)
    with pytest.raises(ValueError, match="does not fit"):
        ex.run(x[:9])
    with pytest.raises(ValueError, match="does not fit"):
        ex.run(np.zeros((2, 20, 20, 1), np.float32))


def test_bench_prints_speedups_against_flops_and_writes_json(smoke_workdir, tmp_path):
    out = tmp_path / "b.json"
    proc = run_job(
        "export.batched_exit_bench", f"--workdir={smoke_workdir}", "--batches=4,8",
        "--rounds=1", f"--json={out}",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.load(open(out))
    assert [r["batch"] for r in rep["rows"]] == [4, 8]
    for r in rep["rows"]:
        assert r["agrees_with_per_frame_reference"]
        assert r["full_ms"] > 0 and r["early_exit_ms"] > 0 and r["flop_speedup"] > 0
        assert r["ratio"] == pytest.approx(r["measured_speedup"] / r["flop_speedup"])
        assert sum(r["exit_rates"].values()) == pytest.approx(1.0)
        assert r["compile"]["executables"] > 0
    assert "measured" in proc.stdout and "FLOPs" in proc.stdout
