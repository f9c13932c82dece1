"""Feature cache and distilled exits: cached activations equal the backbone's, a stale
cache is rebuilt, heads learn the backbone's output, and EfficientNet-Lite's latency kinds."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from export import partitions
from flexjax import distill_exits as de
from flexjax import evaluation, feature_cache, spec
from flexjax.models import init
from flexjax.models.build import build
from runtime import latency_model as lm


def _block(cin: int, cout: int, stride: int = 1) -> spec.Layer:
    mid = cin * 2
    body = [spec.conv(mid, 1, use_bias=False), spec.batch_norm(), spec.relu6(),
            spec.conv(mid, 3, stride, groups=mid, use_bias=False), spec.batch_norm(),
            spec.relu6(), spec.conv(cout, 1, use_bias=False), spec.batch_norm()]  # fmt: skip
    return spec.mbconv(body, skip=stride == 1 and cin == cout)


def _tiny_net() -> spec.Net:
    layers = (spec.rescale(2.0, -1.0), spec.conv(8, 3, 2), spec.relu6(), _block(8, 8),
              _block(8, 12, 2), _block(12, 12), spec.global_pool(), spec.dense(10))  # fmt: skip
    return spec.Net((16, 16, 3), 10, layers, name="tiny_mbconv")


@pytest.fixture(scope="module")
def tiny():
    net = _tiny_net()
    variables = init(net, jax.random.key(0))
    rng = np.random.default_rng(0)
    frames = {s: rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
              for s, n in (("train", 40), ("val", 9))}  # fmt: skip
    return net, variables, frames


def test_block_positions_every_kth_counts_from_the_last_block():
    net = _tiny_net()
    assert feature_cache.block_positions(net) == [3, 4, 5]
    assert feature_cache.every_kth_block(net, 2) == [3, 5]
    assert feature_cache.every_kth_block(net, 1, skip_first=1) == [4, 5]
    with pytest.raises(ValueError, match="every must be >= 1"):
        feature_cache.every_kth_block(net, 0)
    with pytest.raises(ValueError, match=r"position 7 does not exist; .* 0\.\.6"):
        feature_cache.check_positions(net, [3, 7])


def test_feature_cache_equals_the_backbone_and_is_reused_until_stale(tiny, tmp_path):
    net, variables, frames = tiny
    d = str(tmp_path / "features")
    logs: list[str] = []
    cache = feature_cache.build(net, variables, frames, [4, 3], d, batch_size=16, log=logs.append)
    assert cache.positions == (3, 4) and cache.index["frames"] == {"train": 40, "val": 9}
    x = frames["val"].astype(np.float32) / 255
    module = build(net)
    for p in (3, 4):
        want = module.apply(variables, x, stop=p + 1, heads=False)["activation"]
        np.testing.assert_allclose(cache.features("val", p), want, atol=1e-5)
        assert list(cache.features("val", p).shape[1:]) == cache.index["shapes"][f"p{p:02d}"]
    final = evaluation.predict(net, variables, x)["final"]
    np.testing.assert_allclose(cache.logits("val"), final, atol=1e-4)

    logs.clear()
    again = feature_cache.build(net, variables, frames, [3, 4], d, log=logs.append)
    assert logs == [f"feature cache {d}: current, reused"] and again.index == cache.index

    # Other weights, frames or positions: the key changes and the cache is rebuilt.
    before = np.array(cache.features("val", 3))  # the files are replaced in place
    other = jax.tree.map(lambda a: a * 1.5, variables)
    logs.clear()
    rebuilt = feature_cache.build(net, other, frames, [3, 4], d, log=logs.append)
    assert rebuilt.index["key"] != cache.index["key"] and "reused" not in "".join(logs)
    assert not np.allclose(rebuilt.features("val", 3), before)
    moved = feature_cache.build(net, other, frames, [5], d, log=logs.append)
    assert moved.positions == (5,)
    with pytest.raises(ValueError, match=r"position 3 is not cached; cached: \[5\]"):
        moved.features("val", 3)


def test_feature_cache_rejects_frames_of_another_size(tiny, tmp_path):
    net, variables, _ = tiny
    bad = {"train": np.zeros((2, 8, 8, 3), np.uint8)}
    with pytest.raises(ValueError, match=r"train frames have shape \(2, 8, 8, 3\)"):
        feature_cache.build(net, variables, bad, [3], str(tmp_path / "f"))
    assert not (tmp_path / "f").exists()


def test_distill_loss_is_zero_on_equal_logits_and_hand_computed_otherwise():
    t = np.array([[2.0, 0.0]], np.float32)
    assert float(de.distill_loss(t, t, 2.0)) == pytest.approx(0.0, abs=1e-7)
    s = np.array([[0.0, 0.0]], np.float32)
    p = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()  # softmax(t / 2)
    want = 4.0 * float(np.sum(p * (np.log(p) - np.log([0.5, 0.5]))))
    assert float(de.distill_loss(s, t, 2.0)) == pytest.approx(want, rel=1e-5)


def test_distilled_heads_learn_the_backbone_and_match_the_multi_exit_net(tiny, tmp_path):
    net, variables, frames = tiny
    cache = feature_cache.build(net, variables, frames, [3, 4], str(tmp_path / "f"), log=print)
    multi = de.attach(net, [3, 4], de.head_layers("conv_pool_dense", 10, 8))
    assert multi.exit_names == ("exit_3", "exit_4", "final")
    settings = de.DistillSettings(steps=150, batch_size=16, learning_rate=1e-2)
    trained, losses = de.train_heads(multi, variables, cache, settings, log=print)
    for name in ("exit_3", "exit_4"):
        assert losses[name]["last"] < 0.5 * losses[name]["first"], losses
    # The backbone is untouched; the heads on cached features equal the whole net's exits.
    assert feature_cache.variables_digest(
        {"params": {k: v for k, v in trained["params"].items() if not k.startswith("exit")},
         "batch_stats": trained["batch_stats"]}
    ) == feature_cache.variables_digest(variables)  # fmt: skip
    got = de.exit_logits(multi, trained, cache, "val")
    want = evaluation.predict(multi, trained, frames["val"].astype(np.float32) / 255)
    for name in multi.exit_names:
        np.testing.assert_allclose(got[name], want[name], atol=1e-4)
    agree = de.agreement(got, got["final"].argmax(-1))
    assert agree["final"] == 1.0 and 0.0 <= agree["exit_3"] <= 1.0
    with pytest.raises(ValueError, match=r"positions \[5\] are not in the feature cache"):
        de.train_heads(de.attach(net, [5], de.head_layers("pool_dense", 10)), variables, cache,
                       settings)  # fmt: skip
    with pytest.raises(ValueError, match="unknown exit head 'mlp'; valid: pool_dense"):
        de.head_layers("mlp", 10)


def test_cut_points_at_block_boundaries_only_and_activation_bytes():
    net = _tiny_net()
    assert partitions.cut_points(net, [4, 5]) == [0, 4, 5, 8]
    with pytest.raises(ValueError, match="partition point 2 is not a cut point"):
        partitions.cut_points(net, [2])  # before a relu6: fused into the conv
    section = partitions.manifest_section(net, partitions.plan_partitions(net, [4]), "p", [4])
    assert section["cut_points"] == [0, 4, 8]
    assert section["activations"]["4"]["bytes"] == 4 * 8 * 8 * 8 < 4 * 16 * 16 * 3
    assert set(section["device"]) == {"4"}


def test_latency_model_depthwise_and_mbconv_as_unit_or_as_parts():
    rows = partitions.layer_rows(_tiny_net().layers, (16, 16, 3))
    block = rows[3]  # mbconv 8 -> 8 at 8x8, expansion 2, skip
    assert block["kind"] == "mbconv" and block["skip"] and len(block["body"]) == 8
    assert [r["fused"] for r in block["body"]] == [False, True, True, False, True, True,
                                                   False, True]  # fmt: skip
    dw = block["body"][3]
    assert lm.regression_kind(dw) == "dwconv" and lm.regression_kind(block["body"][0]) == "conv"
    assert lm.raw_variables(dw) == {"x1": 1024.0, "x2": 9.0, "x1x2": 9216.0}
    v = lm.raw_variables(block)
    # 1x1 convs: 64 px * (8*16 + 16*8) MACs; depthwise: 64 px * 16 ch * 9; elements moved.
    assert v == {"x1": 64 * 256.0, "x2": 64 * 16 * 9.0, "x3": 512 + 3 * 1024 * 2 + 2 * 512.0}
    kinds = {
        "conv": {"variables": ["x1", "x2"], "coef": [1e-4, 1e-3], "intercept": 0.01},
        "dwconv": {"variables": ["x1x2"], "coef": [1e-5], "intercept": 0.02},
        "rescale": {"variables": ["x"], "coef": [1e-5], "intercept": 0.0},
    }
    parts = {"overhead_ms": 0.0, "kinds": kinds}
    conv_ms = [lm.layer_ms(parts, r) for r in (block["body"][0], block["body"][6])]
    want = sum(conv_ms) + (0.02 + 1e-5 * 9216) + 1e-5 * 512  # + the skip's add
    assert lm.layer_ms(parts, block) == pytest.approx(want)
    unit = {"overhead_ms": 0.0, "kinds": {**kinds, "mbconv": {
        "variables": ["x1", "x2", "x3"], "coef": [1e-6, 1e-6, 0.0], "intercept": 0.5}}}  # fmt: skip
    assert lm.layer_ms(unit, block) == pytest.approx(0.5 + 1e-6 * (v["x1"] + v["x2"]))


def test_mimic_head_shares_the_frozen_classifier_and_learns_the_pooled_features(tiny, tmp_path):
    net, variables, frames = tiny
    assert de.classifier(net) == (6, 7)
    cache = feature_cache.build(net, variables, frames, [4, 6], str(tmp_path / "f"), log=print)
    multi = de.attach(net, [4], de.head_layers("mimic", 10, 12))
    settings = de.DistillSettings(steps=100, batch_size=16, learning_rate=1e-2)
    trained, losses = de.train_heads(multi, variables, cache, settings, log=print)
    assert losses["exit_4"]["last"] < 0.5 * losses["exit_4"]["first"], losses
    shared = trained["params"]["exit_4"]["layer_03"]
    for k, want in variables["params"]["layer_07"].items():
        np.testing.assert_array_equal(shared[k], want)  # copied, never updated
    got = de.exit_logits(multi, trained, cache, "val")
    want = evaluation.predict(multi, trained, frames["val"].astype(np.float32) / 255)
    np.testing.assert_allclose(got["exit_4"], want["exit_4"], atol=1e-4)
    # Without the pooled features in the cache, a mimic head cannot be trained.
    bare = feature_cache.build(net, variables, frames, [4], str(tmp_path / "g"), log=print)
    with pytest.raises(ValueError, match=r"positions \[6\] are not in the feature cache"):
        de.train_heads(multi, variables, bare, settings)
