"""BranchyNet in its own protocol and FlexDNN-joint (issue 13, items 2-3): budgets, start, errors.

The job end to end (budgets equal and recorded, BranchyNet's backbone near the
trained backbone after fine-tuning) is asserted in tests/test_flexdnn.py's job
test, which already runs the smoke job; here the pieces and the bad values.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from configs import fashion_vgg16_flexdnn, mnist_flexdnn
from flexjax import config as config_lib
from flexjax import flexdnn
from flexjax.models import get_model, init
from pipelines import flexdnn as job

from conftest import ROOT, run_job

SMOKE = os.path.join(ROOT, "configs", "mnist_flexdnn.py") + ":smoke"


def _history(*accuracies):
    """A search history: the start, then one entry per trial (None: the transform failed)."""
    out = [{"trial": 0, "action": "start", "accuracy": 0.9, "accepted": True}]
    for i, a in enumerate(accuracies, 1):
        out.append(
            {"trial": i, "action": "prune", "error": "x", "accepted": False}
            if a is None
            else {"trial": i, "action": "prune", "accuracy": a, "accepted": True}
        )
    return {"history": out}


def test_extra_budget_counts_exit_training_and_every_finetuned_trial_by_hand():
    c = mnist_flexdnn.get_config()
    c.train.batch_size = 32
    c.flexdnn.exit_epochs = 2
    c.flexdnn.finetune_steps = 5
    search = {"exit_3": _history(0.8, None, 0.7), "exit_7": _history(0.9)}
    b = job.extra_budget(c, n_train=100, n_search=20, search=search)
    # exit training: 100 // 32 = 3 steps per epoch x 2 epochs at batch 32 = 192 examples
    assert b["exit_training"] == {**b["exit_training"], "steps": 6, "examples": 192}
    # search: 3 fine-tuned trials (the failed transform is not) x 5 steps at batch min(32, 20)
    assert b["search_finetune"]["trials"] == 3
    assert b["search_finetune"]["steps"] == 15 and b["search_finetune"]["batch_size"] == 20
    assert b["search_finetune"]["examples"] == 300
    assert b["examples"] == 492
    # BranchyNet's joint steps at batch 32 see at least as many examples, less than a batch more
    steps = job.joint_steps(b, 32)
    assert steps == 16 and 492 <= steps * 32 < 492 + 32


def test_extra_budget_without_search_or_exit_training_is_zero():
    c = mnist_flexdnn.get_config()
    c.flexdnn.exit_epochs = 0
    b = job.extra_budget(c, n_train=1000, n_search=1000, search={"exit_3": _history()})
    assert b["examples"] == 0 and job.joint_steps(b, 64) == 0


def test_start_from_keeps_the_backbone_bit_exact_and_initialises_fresh_heads():
    backbone = get_model("alexnet_branchy", input_shape=(28, 28, 1), width=0.125, exits=[])
    trained = jax.device_get(init(backbone, jax.random.key(7)))  # stands in for a trained one
    bnet = get_model("alexnet_branchy", input_shape=(28, 28, 1), width=0.125, exits=[3, 7])
    start = job.start_from(bnet, trained, seed=3)
    fresh = jax.device_get(init(bnet, jax.random.key(3)))
    heads = {e.name for e in bnet.exits}
    assert heads == {"exit_3", "exit_7"}
    for col, tree in start.items():
        assert set(tree) == set(fresh[col])
        for k, v in tree.items():
            want = fresh[col][k] if k in heads else trained[col][k]
            for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(want), strict=True):
                np.testing.assert_array_equal(a, b)
    # ... and the backbone really is the trained one, not a fresh init of the same net
    k = next(k for k in start["params"] if k not in heads and "kernel" in start["params"][k])
    assert not np.array_equal(start["params"][k]["kernel"], fresh["params"][k]["kernel"])


def test_search_subset_is_seeded_and_all_when_zero():
    from flexjax.data import Dataset

    ds = Dataset(np.arange(50, dtype=np.float32)[:, None], np.arange(50) % 10)
    assert job.search_subset(ds, 0, 0) is ds and job.search_subset(ds, 80, 0) is ds
    a, b = job.search_subset(ds, 20, 1), job.search_subset(ds, 20, 1)
    assert len(a) == 20 and np.array_equal(a.x, b.x) and np.all(np.diff(a.x[:, 0]) > 0)


def test_default_protocol_is_the_fair_one_and_configs_validate():
    for c in (mnist_flexdnn.get_config(), fashion_vgg16_flexdnn.get_config()):
        c = config_lib.validate(c)
        assert c.flexdnn.branchy_protocol == "finetune" and c.flexdnn.joint_variant
        job.check_protocol(c)
    c = config_lib.validate(mnist_flexdnn.get_config())
    c.flexdnn.branchy_protocol = "scratch"  # the old protocol stays available
    job.check_protocol(c)
    c.flexdnn.branchy_protocol = "jointly"
    with pytest.raises(flexdnn.FlexDNNError, match="flexdnn.branchy_protocol must be one of"):
        job.check_protocol(c)


@pytest.mark.parametrize(
    "override,match",
    [
        ("--config.flexdnn.branchy_protocol=jointly", "flexdnn.branchy_protocol must be one of"),
        ("--config.flexdnn.joint_lr=-0.001", "flexdnn.joint_lr"),
        ("--config.flexdnn.joint_lr=nan", "flexdnn.joint_lr"),
        ("--config.flexdnn.search_examples=-5", "flexdnn.search_examples"),
        ("--config.flexdnn.joint_variant=3", "flexdnn.joint_variant"),
    ],
)
def test_bad_protocol_values_are_one_error_line_and_nothing_written(override, match, tmp_path):
    workdir = str(tmp_path / "w")
    proc = run_job("train.flexdnn", f"--config={SMOKE}", f"--workdir={workdir}", override)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and match in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(workdir)
