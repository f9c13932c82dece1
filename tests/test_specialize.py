"""Specialization: the (n, p)-dominance skew detector, retargeting, pre-forwarding, cascades."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flexjax import models, specialize
from flexjax.models import zoo
from flexjax.spec import Net, dense, flatten, relu
from runtime.skew import dominant, scan, skew_init, skew_update


def test_skew_detector_reports_n_p_dominance_over_a_sliding_window():
    s = skew_init(window=5, n=2, p=0.8)
    s, verdicts = scan(s, [1, 1, 2, 1, 3])  # top-2 = {1, 2} cover 4/5 = 0.8
    assert verdicts[:4] == [None] * 4 and verdicts[4] == (1, 2)
    s, d = skew_update(s, 4)  # window [1, 2, 1, 3, 4]: top-2 cover 3/5
    assert d is None
    s, d = skew_update(s, 1)  # [2, 1, 3, 4, 1]
    assert d is None and dict(s.counts) == {1: 2, 2: 1, 3: 1, 4: 1}
    s, _ = scan(s, [7, 7, 7, 7, 1])
    assert dominant(s) == (1, 7)


@pytest.mark.parametrize(
    "kw, match",
    [({"window": 0}, "window"), ({"n": 0}, "n \\(number"), ({"p": 1.5}, "p \\(covered")],
)
def test_skew_detector_bad_arguments_are_clear_errors(kw, match):
    args = {"window": 10, "n": 2, "p": 0.9, **kw}
    with pytest.raises(ValueError, match=match):
        skew_init(**args)


def test_relabeled_tasks_and_specialized_labels():
    y = np.arange(10)
    np.testing.assert_array_equal(specialize.relabel(y, "parity"), y % 2)
    np.testing.assert_array_equal(specialize.relabel(y, "ge5"), (y >= 5).astype(int))
    np.testing.assert_array_equal(
        specialize.specialized_labels(y, [7, 3]), [2, 2, 2, 0, 2, 2, 2, 1, 2, 2]
    )
    with pytest.raises(specialize.SpecializeError, match="unknown task 'age'"):
        specialize.relabel(y, "age")


def _tiny() -> tuple[Net, dict]:
    net = Net((4, 4, 1), 5, (flatten(), dense(6), relu(), dense(5)))
    return net, models.init(net, jax.random.PRNGKey(0))


def test_retarget_head_keeps_the_dominant_rows_and_adds_other():
    net, v = _tiny()
    snet, sv = specialize.retarget_head(net, v, [3, 1])
    assert snet.num_classes == 3 and snet.layers[-1]["features"] == 3
    k = np.asarray(v["params"]["layer_03"]["kernel"])
    sk = np.asarray(sv["params"]["layer_03"]["kernel"])
    np.testing.assert_array_equal(sk[:, :2], k[:, [1, 3]])
    np.testing.assert_allclose(sk[:, 2], k[:, [0, 2, 4]].mean(1), rtol=1e-6)
    np.testing.assert_array_equal(
        sv["params"]["layer_01"]["kernel"], v["params"]["layer_01"]["kernel"]
    )
    with pytest.raises(specialize.SpecializeError, match="out of range"):
        specialize.retarget_head(net, v, [0, 9])
    with pytest.raises(specialize.SpecializeError, match="fewer classes"):
        specialize.retarget_head(net, v, range(5))


def test_pre_forwarded_last_layer_fit_learns_separable_features():
    net, v = _tiny()
    rng = np.random.default_rng(0)
    x = rng.random((300, 4, 4, 1)).astype(np.float32)
    feats = specialize.penultimate(net, v, x)
    assert feats.shape == (300, 6)
    y = (feats[:, 0] > np.median(feats[:, 0])).astype(np.int32)  # linearly separable
    snet, sv = specialize.retarget_head(net, v, [0])  # 2 outputs: class 0 and "other"
    fitted = specialize.fit_last_layer(snet, sv, feats, y, steps=300, learning_rate=0.05)
    logits = np.asarray(models.build(snet).apply(fitted, x)["final"])
    assert (logits.argmax(-1) == y).mean() > 0.9
    np.testing.assert_array_equal(
        fitted["params"]["layer_01"]["kernel"], v["params"]["layer_01"]["kernel"]
    )


def test_cascade_falls_back_to_the_general_model_on_other():
    spec = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [0, 0, 5]], np.float32)  # classes [2, 7]
    general = np.eye(10, dtype=np.float32)[[0, 0, 4, 9]]
    c = specialize.cascade(spec, general, [7, 2], labels=np.array([2, 7, 4, 1]))
    np.testing.assert_array_equal(c.predictions, [2, 7, 4, 9])
    np.testing.assert_array_equal(c.fallback, [False, False, True, True])
    assert c.accuracy == 0.75 and c.fallback_rate == 0.5


def test_balance_other_and_skewed_stream_fractions():
    y = np.repeat(np.arange(10), 100)
    ys = specialize.specialized_labels(y, [0, 1])
    keep = specialize.balance_other(ys, 0.2)
    assert (ys[keep] == 2).mean() == pytest.approx(0.2, abs=0.01)
    idx = specialize.skewed_stream(y, [3, 4], p=0.9, n=500)
    assert np.isin(y[idx], [3, 4]).mean() == pytest.approx(0.9)


def test_retrain_times_measure_three_ways_on_a_small_lenet():
    from flexjax.data import load

    splits = load("mnist5k", limit=400)
    net = zoo.lenet_branchy(exits=(), width=0.25)
    v = models.init(net, jax.random.PRNGKey(0))
    times, snet, out = specialize.retrain_times(
        net, v, splits.train.x, splits.train.y, [1, 7], steps=5, batch_size=16
    )
    assert times["examples"] > 0 and snet.num_classes == 3
    for key in ("full_retrain_s", "retarget_s", "retarget_preforward_s"):
        assert times[key] > 0
    last = models.layer_name(len(net.layers) - 1)
    for name, sv in out.items():  # only the full retrain touched the stem
        same = np.array_equal(sv["params"]["layer_00"]["kernel"], v["params"]["layer_00"]["kernel"])
        assert same == (name != "full_retrain"), name
        assert sv["params"][last]["kernel"].shape[-1] == 3
