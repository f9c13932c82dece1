"""`finetune`: it learns, respects the trainable mask bit-exactly, and distills."""

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

from flexjax.finetune import finetune
from flexjax.models import build
from flexjax.models.build import init
from flexjax.spec import FINAL, Exit, Net, batch_norm, conv, dense, flatten, max_pool, relu


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.images[..., None] / 16.0).astype(np.float32)
    return x[:1200], d.target[:1200].astype(np.int32), x[1200:], d.target[1200:]


def _net() -> Net:
    layers = (
        conv(8, 3),
        batch_norm(),
        relu(),
        max_pool(2),
        flatten(),
        dense(32),
        relu(),
        dense(10),
    )
    return Net((8, 8, 1), 10, layers, (Exit(3, (flatten(), dense(10))),), "tiny")


def _acc(net, v, x, y, name=FINAL):
    return float((np.asarray(build(net).apply(v, x)[name]).argmax(-1) == y).mean())


def test_finetune_learns(digits):
    x, y, xt, yt = digits
    net = _net()
    v0 = init(net, jax.random.PRNGKey(0))
    v = finetune(net, v0, x, y, steps=150, batch_size=64, learning_rate=3e-3)
    assert _acc(net, v0, xt, yt) < 0.3
    assert _acc(net, v, xt, yt) > 0.85
    assert _acc(net, v, xt, yt, "exit_3") > 0.6
    assert v0["params"]["layer_05"]["kernel"] is not v["params"]["layer_05"]["kernel"]


def test_frozen_parameters_and_statistics_stay_bit_exact(digits):
    x, y, xt, yt = digits
    net = _net()
    v0 = finetune(net, init(net, jax.random.PRNGKey(1)), x, y, steps=30)
    v = finetune(net, v0, x, y, steps=30, trainable=lambda p: p.startswith("exit_3/"))
    for key in ("layer_00", "layer_01", "layer_05", "layer_07"):
        jax.tree.map(np.testing.assert_array_equal, v["params"][key], v0["params"][key])
    jax.tree.map(np.testing.assert_array_equal, v["batch_stats"], v0["batch_stats"])
    assert not np.array_equal(v["params"]["exit_3"]["layer_01"]["kernel"],
                              v0["params"]["exit_3"]["layer_01"]["kernel"])  # fmt: skip


def test_distillation_pulls_the_student_towards_the_teacher(digits):
    x, y, _, _ = digits
    net = _net()
    # A teacher that answers (label + 1) mod 10: distillation alone must teach that.
    teacher = np.eye(10, dtype=np.float32)[(y + 1) % 10] * 8.0
    v0 = init(net, jax.random.PRNGKey(2))
    v = finetune(net, v0, x, y, steps=150, teacher_logits=teacher, distill_weight=1.0,
                 exit_weights=[0.0, 1.0], learning_rate=3e-3)  # fmt: skip
    assert _acc(net, v, x, (y + 1) % 10) > 0.8


def test_bad_input(digits):
    x, y, _, _ = digits
    net = _net()
    v = init(net, jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="teacher_logits must be"):
        finetune(net, v, x, y, steps=1, teacher_logits=np.zeros((3, 10)))
    with pytest.raises(ValueError, match="matching"):
        finetune(net, v, x, y[:5], steps=1)
    with pytest.raises(ValueError, match="steps"):
        finetune(net, v, x, y, steps=-1)
    with pytest.raises(ValueError, match="exit_weights has 3 values"):
        finetune(net, v, x, y, steps=1, exit_weights=[1, 1, 1])
