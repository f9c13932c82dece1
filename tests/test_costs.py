"""Per-layer costs, checked by hand on AlexNet layers."""

import pytest

from flexjax import costs, spec
from flexjax.models import get_model
from flexjax.spec import FINAL, Exit, Net


@pytest.fixture(scope="module")
def alexnet_costs():
    return costs.of(get_model("alexnet_branchy", input_shape=(32, 32, 3)))


def test_alexnet_conv1_flops_params_bytes_by_hand(alexnet_costs):
    c = alexnet_costs.layers[0]  # conv 5x5, 3 -> 64, stride 1, SAME, 32x32
    assert c.flops == 2 * (32 * 32 * 64) * (5 * 5 * 3) == 9_830_400
    assert c.params == 5 * 5 * 3 * 64 + 64 == 4864
    assert c.param_bytes == 4864 * 4
    assert c.in_bytes == 32 * 32 * 3 * 4
    assert c.out_bytes == 32 * 32 * 64 * 4


def test_alexnet_pool1_and_lrn_by_hand(alexnet_costs):
    pool = alexnet_costs.layers[2]  # max_pool 3x3 stride 2 SAME: 32 -> 16
    assert pool.flops == 16 * 16 * 64 * 9
    assert (pool.params, pool.out_bytes) == (0, 16 * 16 * 64 * 4)
    norm = alexnet_costs.layers[3]  # LRN size 5: size + 4 ops per element
    assert norm.flops == 16 * 16 * 64 * (5 + 4)


def test_alexnet_conv2_and_dense1_by_hand(alexnet_costs):
    conv2 = alexnet_costs.layers[4]  # 5x5, 64 -> 192 on 16x16
    assert conv2.flops == 2 * 16 * 16 * 192 * 25 * 64 == 157_286_400
    assert conv2.params == 25 * 64 * 192 + 192
    dense1 = alexnet_costs.layers[16]  # flatten(4x4x256) -> 384
    assert dense1.flops == 2 * 4096 * 384
    assert dense1.params == 4096 * 384 + 384
    assert dense1.in_bytes == 4096 * 4


def test_exit_flops_accumulate_backbone_and_heads():
    head = (spec.flatten(), spec.dense(3))
    layers = (spec.conv(2, 1), spec.relu(), spec.conv(2, 1), spec.flatten(), spec.dense(3))
    net = Net((2, 2, 1), 3, layers, (Exit(0, head), Exit(2, head)))
    c = costs.of(net)
    # conv 1x1 1->2 on 2x2: 2*4*2*1 = 16; relu: 8; conv 1x1 2->2: 2*4*2*2 = 32; dense 8->3: 48.
    assert [x.flops for x in c.layers] == [16, 8, 32, 0, 48]
    assert c.heads["exit_0"].flops == 48 and c.heads["exit_2"].flops == 48
    assert c.exit_flops == {"exit_0": 16 + 48, "exit_2": 16 + 8 + 32 + 96, FINAL: 104 + 96}
    assert c.backbone_flops == 104
    assert c.expected_flops({"exit_0": 0.5, "exit_2": 0.25, FINAL: 0.25}) == pytest.approx(
        0.5 * 64 + 0.25 * 152 + 0.25 * 200
    )


def test_batch_norm_counts_state_and_residual_counts_add():
    body = (spec.conv(4, 3, use_bias=False), spec.batch_norm())
    net = Net((4, 4, 4), 3, (spec.residual(body), spec.flatten(), spec.dense(3)))
    c = costs.of(net).layers[0]
    assert c.params == 3 * 3 * 4 * 4 + 2 * 4 and c.state == 2 * 4
    assert c.flops == 2 * 16 * 4 * 36 + 2 * 64 + 2 * 64  # conv + BN + (add, relu)


def test_low_rank_dense_costs():
    layers = (spec.flatten(), spec.Layer.make("low_rank_dense", features=3, rank=2))
    c = costs.of(Net((2, 2, 2), 3, layers)).layers[1]
    assert c.params == 8 * 2 + 2 * 3 + 3
    assert c.flops == 2 * (8 * 2 + 2 * 3)
