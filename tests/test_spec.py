"""Networks as data: construction, validation errors and the JSON round trip."""

import json

import pytest

from flexjax import spec
from flexjax.models import MODELS, get_model
from flexjax.spec import Exit, Layer, Net, SpecError

SMALL = {
    "lenet_branchy": {},
    "alexnet_branchy": {"width": 0.25},
    "vgg16": {"width": 0.125},
    "inception_v3": {"width": 0.125},
    "resnet": {"depth": 20, "width": 0.5},
    "efficientnet_lite0": {"image_size": 96, "exits": [4, 10]},
    "efficientnet_lite1": {"image_size": 96, "num_classes": 10},
    "efficientnet_lite2": {"image_size": 128},
}


def _tiny(exits=()):
    layers = (spec.conv(4, 3), spec.relu(), spec.max_pool(2), spec.flatten(), spec.dense(3))
    return Net((8, 8, 1), 3, layers, exits)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_net_json_round_trip_is_identity(name):
    net = get_model(name, **SMALL[name])
    text = net.to_json()
    assert Net.from_json(text) == net
    assert json.loads(text)["layers"][0]["kind"] == net.layers[0].kind


def test_shapes_tiny_net_hand_computed():
    shapes = _tiny().shapes()
    assert [s[1] for s in shapes] == [(8, 8, 4), (8, 8, 4), (4, 4, 4), (64,), (3,)]


def test_layer_unknown_kind_raises_listing_valid_kinds():
    with pytest.raises(SpecError, match=r"unknown layer kind 'convv'.*conv"):
        Layer.make("convv", features=3)


def test_layer_unknown_argument_raises_listing_valid():
    with pytest.raises(SpecError, match=r"unknown argument.*'filters'.*valid"):
        Layer.from_dict({"kind": "conv", "filters": 3})


def test_dense_on_feature_map_raises_with_flatten_hint():
    layers = (spec.conv(4, 3), spec.dense(3))
    with pytest.raises(SpecError, match=r"layer 1 \(dense\).*flatten"):
        Net((8, 8, 1), 3, layers)


def test_exit_position_out_of_range_raises():
    head = (spec.flatten(), spec.dense(3))
    with pytest.raises(SpecError, match=r"position 7 is out of range.*0\.\.3"):
        _tiny((Exit(7, head),))
    with pytest.raises(SpecError, match="out of range"):
        _tiny((Exit(4, (spec.dense(3),)),))  # the final layer is not a side exit


def test_exit_head_wrong_logits_raises():
    with pytest.raises(SpecError, match=r"exit_1: the head ends in shape \(5,\)"):
        _tiny((Exit(1, (spec.flatten(), spec.dense(5))),))


def test_exits_unsorted_raises():
    head = (spec.flatten(), spec.dense(3))
    with pytest.raises(SpecError, match="sorted"):
        _tiny((Exit(2, head), Exit(1, head)))


def test_pool_window_too_large_valid_padding_raises():
    with pytest.raises(SpecError, match="does not fit"):
        Net((2, 2, 1), 3, (spec.max_pool(3), spec.flatten(), spec.dense(3)))


def test_backbone_not_ending_in_logits_raises():
    with pytest.raises(SpecError, match=r"end it with dense\(3\)"):
        Net((8, 8, 1), 3, (spec.flatten(), spec.dense(4)))


def test_residual_shortcut_mismatch_raises_with_projection_hint():
    body = (spec.conv(8, 3, stride=2),)
    with pytest.raises(SpecError, match="projection shortcut"):
        Net((8, 8, 4), 3, (spec.residual(body), spec.flatten(), spec.dense(3)))


def test_inception_concatenates_channels():
    block = spec.inception((spec.conv(3, 1),), (spec.conv(5, 3),), (spec.max_pool(3, 1, "SAME"),))
    net = Net((8, 8, 2), 3, (block, spec.global_pool(), spec.dense(3)))
    assert net.shapes()[0][1] == (8, 8, 3 + 5 + 2)


def test_exit_default_name_is_position():
    net = _tiny((Exit(1, (spec.flatten(), spec.dense(3))),))
    assert net.exit_names == ("exit_1", "final")
    assert net.exit_position("final") == 4


def test_from_json_garbage_raises_spec_error():
    with pytest.raises(SpecError, match="not valid JSON"):
        Net.from_json("{not json")
    with pytest.raises(SpecError, match="schema 99"):
        Net.from_dict({"schema": 99})
