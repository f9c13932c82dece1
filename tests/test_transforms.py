"""Structural transforms: filter pruning and layer removal are exact where they should be."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexjax import transforms
from flexjax.models import build, get_model
from flexjax.models.build import init
from flexjax.spec import FINAL, Exit, Net, batch_norm, conv, dense, flatten, max_pool, relu
from flexjax.transforms import TransformError


def _net() -> Net:
    """conv-bn-relu-pool | exit | conv-relu-flatten-dense-relu | exit | dense."""
    layers = (
        conv(6, 3),
        batch_norm(),
        relu(),
        max_pool(2),  # 3: exit_3 reads (6, 6, 6)
        conv(5, 3),
        relu(),
        flatten(),  # 6
        dense(12),
        relu(),  # 8: exit_8 reads (12,)
        dense(4),
    )
    exits = (
        Exit(3, (conv(4, 3), relu(), flatten(), dense(4))),
        Exit(8, (dense(7), relu(), dense(4))),
    )
    return Net((12, 12, 2), 4, layers, exits, "toy")


def _randomized(net: Net, seed: int = 0) -> dict:
    """Variables with non-trivial batch-norm statistics and biases."""
    v = init(net, jax.random.PRNGKey(seed))
    leaves, tree = jax.tree.flatten(v)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [
        jnp.abs(x) + 0.5 + jax.random.uniform(k, x.shape) if x.ndim == 1 else x
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(tree, leaves)


def _outputs(net: Net, variables: dict, x: np.ndarray) -> dict:
    return build(net).apply(variables, x, train=False)


@pytest.fixture(scope="module")
def toy():
    net = _net()
    x = np.random.default_rng(0).normal(size=(3, 12, 12, 2)).astype(np.float32)
    return net, _randomized(net), x


def _zero_inputs(variables: dict, path: tuple, axis: int, channels, expand: int = 1) -> dict:
    """Zeroes a consumer's input weights for `channels` (the oracle for pruning)."""
    v = jax.tree.map(lambda a: np.array(a), variables)
    k = v["params"]
    for key in path[:-1]:
        k = k[key]
    w = k[path[-1]]
    c = w.shape[axis] // expand
    idx = [p * c + ch for p in range(expand) for ch in channels]
    sl = [slice(None)] * w.ndim
    sl[axis] = idx
    w[tuple(sl)] = 0.0
    return v


def test_pruning_a_backbone_conv_equals_zeroing_its_consumers(toy):
    net, v, x = toy
    pruned_net, pv = transforms.prune_filters(net, v, "layer_00", [0, 2, 5])
    assert pruned_net.layers[0]["features"] == 3
    assert pv["params"]["layer_00"]["kernel"].shape == (3, 3, 2, 3)
    assert pv["batch_stats"]["layer_01"]["mean"].shape == (3,)
    # Oracle: the original net with the removed channels cut off at every consumer
    # (the next backbone conv and the first conv of exit_3, which reads position 3).
    removed = [1, 3, 4]
    ref = _zero_inputs(v, ("layer_04", "kernel"), 2, removed)
    ref = _zero_inputs(ref, ("exit_3", "layer_00", "kernel"), 2, removed)
    want, got = _outputs(net, ref, x), _outputs(pruned_net, pv, x)
    for name in net.exit_names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_pruning_through_flatten_slices_every_spatial_position(toy):
    net, v, x = toy
    pruned_net, pv = transforms.prune_filters(net, v, "layer_04", [1, 4])
    assert pv["params"]["layer_07"]["kernel"].shape == (6 * 6 * 2, 12)
    ref = _zero_inputs(v, ("layer_07", "kernel"), 0, [0, 2, 3], expand=36)
    want, got = _outputs(net, ref, x), _outputs(pruned_net, pv, x)
    for name in net.exit_names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_pruning_dense_and_exit_head_layers(toy):
    net, v, x = toy
    # Backbone dense at 7 feeds the final dense and exit_8's first dense.
    n2, v2 = transforms.prune_filters(net, v, "layer_07", 5)
    assert n2.layers[7]["features"] == 5 and n2.get_exit("exit_8").layers[0]
    assert v2["params"]["exit_8"]["layer_00"]["kernel"].shape == (5, 7)
    assert v2["params"]["layer_09"]["kernel"].shape == (5, 4)
    # A head layer: only that head changes.
    n3, v3 = transforms.prune_filters(net, v, "exit_8/layer_00", [6, 0])
    assert n3.get_exit("exit_8").layers[0]["features"] == 2
    ref = _zero_inputs(v, ("exit_8", "layer_02", "kernel"), 0, [1, 2, 3, 4, 5])
    want, got = _outputs(net, ref, x), _outputs(n3, v3, x)
    for name in net.exit_names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    assert v3["params"]["layer_00"] is v["params"]["layer_00"]  # untouched subtrees shared


def test_keep_count_keeps_the_largest_l1_filters_in_order(toy):
    net, v, _ = toy
    norms = transforms.filter_norms(net, v, "layer_04")
    kernel = np.asarray(v["params"]["layer_04"]["kernel"])
    np.testing.assert_allclose(norms, np.abs(kernel).sum((0, 1, 2)), rtol=1e-6)
    _, pv = transforms.prune_filters(net, v, "layer_04", 3)
    top = np.sort(np.argsort(-norms)[:3])
    np.testing.assert_array_equal(pv["params"]["layer_04"]["kernel"], kernel[..., top])


def test_prune_is_pure_and_traceable(toy):
    net, v, _ = toy
    before = jax.tree.map(np.array, v)
    shapes = jax.eval_shape(lambda t: transforms.prune_filters(net, t, "layer_00", 4)[1], v)
    assert shapes["params"]["layer_04"]["kernel"].shape == (3, 3, 4, 5)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, v))


def test_prunable_sites_of_zoo_models():
    toy = _net()
    assert transforms.prunable_sites(toy) == [
        "layer_00", "layer_04", "layer_07", "exit_3/layer_00", "exit_8/layer_00",
    ]  # fmt: skip
    lenet = get_model("lenet_branchy")
    assert transforms.prunable_sites(lenet) == [
        "layer_00", "layer_03", "layer_07", "exit_2/layer_00",
    ]  # fmt: skip
    # Composite blocks are not sites, and a conv feeding one cannot be pruned.
    inc = get_model("inception_v3", input_shape=(32, 32, 3), width=0.25)
    abstract = jax.eval_shape(lambda: init(inc, jax.random.PRNGKey(0)))
    sites = transforms.prunable_sites(inc)
    assert sites[:2] == ["layer_00", "layer_03"] and "exit_8/layer_00" in sites
    for site in sites:
        layer = inc.layers[int(site.split("layer_")[-1])] if "/" not in site else None
        assert layer is None or layer.kind in ("conv", "dense")
        jax.eval_shape(lambda t, s=site: transforms.prune_filters(inc, t, s, 1)[1], abstract)


@pytest.mark.parametrize(
    "site, keep, message",
    [
        ("layer_x", 1, "expected 'layer_NN'"),
        ("nope/layer_00", 1, "no exit named 'nope'"),
        ("layer_42", 1, "has only 10 layers"),
        ("layer_02", 1, "only conv"),
        ("layer_09", 1, "logits"),
        ("exit_3/layer_03", 1, "logits"),
        ("layer_00", 0, "keep must be in [1, 6]"),
        ("layer_00", 7, "keep must be in [1, 6]"),
        ("layer_00", [0, 0], "distinct"),
        ("layer_00", [6], "distinct"),
        ("layer_00", [], "non-empty"),
    ],
)
def test_prune_bad_input_is_a_clear_error(toy, site, keep, message):
    net, v, _ = toy
    with pytest.raises(TransformError, match=message.replace("[", r"\[").replace("]", r"\]")):
        transforms.prune_filters(net, v, site, keep)


def test_grouped_conv_consumer_is_not_prunable():
    net = Net((8, 8, 2), 3, (conv(4, 3), conv(4, 3, groups=2), flatten(), dense(3)))
    assert transforms.prunable_sites(net) == []  # nor is a grouped conv itself
    with pytest.raises(TransformError, match="cannot be pruned"):
        transforms.prune_filters(net, init(net, jax.random.PRNGKey(0)), "layer_00", 2)


def test_drop_shape_preserving_layer_keeps_everything_else(toy):
    net, v, x = toy
    # exit_8's middle: dense(7), relu, dense(4): dropping dense(7)+relu changes
    # the last dense's input (7 -> 12), so only that layer is re-initialized.
    n2, v2 = transforms.drop_layer(net, v, "exit_8/layer_00", jax.random.PRNGKey(5))
    assert [layer.kind for layer in n2.get_exit("exit_8").layers] == ["dense"]
    assert v2["params"]["exit_8"]["layer_00"]["kernel"].shape == (12, 4)
    out, ref = _outputs(n2, v2, x), _outputs(net, v, x)
    for name in (FINAL, "exit_3"):
        np.testing.assert_array_equal(out[name], ref[name])
    # A conv whose input and output shapes match: its consumer keeps its weights.
    wide = Net((8, 8, 2), 3, (conv(4, 3), relu(), conv(4, 3), relu(), flatten(), dense(3)))
    wv = _randomized(wide)
    n3, v3 = transforms.drop_layer(wide, wv, "layer_02", jax.random.PRNGKey(1))
    assert len(n3.layers) == 4
    np.testing.assert_array_equal(
        v3["params"]["layer_03"]["kernel"], wv["params"]["layer_05"]["kernel"]
    )
    np.testing.assert_array_equal(
        v3["params"]["layer_00"]["kernel"], wv["params"]["layer_00"]["kernel"]
    )


def test_drop_backbone_layer_shifts_exits_and_keeps_names(toy):
    net, v, x = toy
    n2, v2 = transforms.drop_layer(net, v, "layer_04", jax.random.PRNGKey(2))  # conv + relu
    assert len(n2.layers) == 8
    assert [(e.name, e.after) for e in n2.exits] == [("exit_3", 3), ("exit_8", 6)]
    assert Net.from_json(n2.to_json()) == n2
    # exit_3 reads position 3, unchanged: its logits are bit-exact.
    np.testing.assert_array_equal(_outputs(n2, v2, x)["exit_3"], _outputs(net, v, x)["exit_3"])
    # The dense after flatten now sees 6 channels instead of 5: re-initialized, new shape.
    assert v2["params"]["layer_05"]["kernel"].shape == (6 * 6 * 6, 12)
    # Positions past the re-initialized layer keep their weights under new names.
    np.testing.assert_array_equal(
        v2["params"]["layer_07"]["kernel"], v["params"]["layer_09"]["kernel"]
    )
    with pytest.raises(TransformError, match="exit 'exit_8' hangs off position 8"):
        transforms.drop_layer(net, v, "layer_07", jax.random.PRNGKey(0))
    with pytest.raises(TransformError, match="only parametric"):
        transforms.drop_layer(net, v, "layer_02", jax.random.PRNGKey(0))
    with pytest.raises(TransformError, match="last layer"):
        transforms.drop_layer(net, v, "layer_09", jax.random.PRNGKey(0))


def test_transforms_compose(toy):
    net, v, x = toy
    n, w = transforms.prune_filters(net, v, "layer_04", 2)
    n, w = transforms.prune_filters(n, w, "exit_3/layer_00", 1)
    n, w = transforms.drop_layer(n, w, "exit_8/layer_00", jax.random.PRNGKey(3))
    out = _outputs(n, w, x)
    assert {k: o.shape for k, o in out.items()} == {k: (3, 4) for k in net.exit_names}
    assert transforms.prunable_sites(n)[:2] == ["layer_00", "layer_04"]
