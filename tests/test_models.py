"""The Flax module derived from a Net: names, outputs, segments, frozen backbone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flexjax import costs
from flexjax.models import (
    MODELS,
    build,
    count_params,
    get_model,
    head_apply,
    init,
    param_names,
)

from test_spec import SMALL


def test_get_model_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'alexnet'; valid: alexnet_branchy"):
        get_model("alexnet")


def test_get_model_bad_kwarg_raises_value_error():
    with pytest.raises(ValueError, match="bad arguments for model 'vgg16'"):
        get_model("vgg16", depth=3)


def test_lenet_param_names_follow_positions():
    net = get_model("lenet_branchy")
    v = jax.eval_shape(lambda r: init(net, r), jax.random.key(0))
    assert sorted(v["params"]) == ["exit_2", "layer_00", "layer_03", "layer_07", "layer_10"]
    assert list(param_names(net)) == ["layer_00", "layer_03", "layer_07", "layer_10", "exit_2"]
    assert sorted(v["params"]["exit_2"]) == ["layer_00", "layer_04"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_zoo_model_outputs_logits_for_every_exit_and_params_match_costs(name):
    net = get_model(name, **SMALL[name])
    v = jax.eval_shape(lambda r: init(net, r), jax.random.key(0))
    x = jax.ShapeDtypeStruct((2, *net.input_shape), jnp.float32)
    out = jax.eval_shape(lambda v, x: build(net).apply(v, x), v, x)
    assert set(out) == set(net.exit_names)  # pytrees sort dict keys; order by exit_names
    assert all(o.shape == (2, net.num_classes) for o in out.values())
    c = costs.of(net)
    total = sum(x.params + x.state for x in c.layers) + sum(
        h.params + h.state for h in c.heads.values()
    )
    assert total == count_params(v)


def test_alexnet_branchy_has_five_exit_points_at_cifar_and_mnist_size():
    for shape in [(32, 32, 3), (28, 28, 1)]:
        net = get_model("alexnet_branchy", input_shape=shape)
        assert len(net.exit_names) == 5
        assert [e.after for e in net.exits] == [3, 7, 9, 11]


def test_segments_composed_equal_full_model():
    net = get_model("alexnet_branchy", input_shape=(28, 28, 1), width=0.25)
    v = init(net, jax.random.key(1))
    x = jax.random.uniform(jax.random.key(2), (3, *net.input_shape))
    model = build(net)
    full = model.apply(v, x)
    h, got = x, {}
    bounds = [0] + [e.after + 1 for e in net.exits] + [len(net.layers)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        out = model.apply(v, h, start=a, stop=b)
        h = out.pop("activation", None)
        got.update(out)
    assert list(got) == list(full)
    for k in full:
        np.testing.assert_allclose(got[k], full[k], rtol=1e-5, atol=1e-5)


def test_head_apply_matches_exit_logits_of_full_model():
    net = get_model("lenet_branchy")
    v = init(net, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(3), (2, *net.input_shape))
    h = build(net).apply(v, x, stop=net.exits[0].after + 1, heads=False)["activation"]
    np.testing.assert_allclose(
        head_apply(net, v, "exit_2", h), build(net).apply(v, x)["exit_2"], rtol=1e-5, atol=1e-6
    )


def test_freeze_backbone_gives_zero_backbone_gradients():
    net = get_model("resnet", depth=8 + 6, width=0.25)  # BatchNorm + exits
    v = init(net, jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (4, *net.input_shape))

    def loss(params):
        out, _ = build(net).apply(
            {**v, "params": params},
            x,
            train=True,
            freeze_backbone=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0)},
        )
        return sum(jnp.sum(out[e.name] ** 2) for e in net.exits)

    grads = jax.grad(loss)(v["params"])
    for k, g in grads.items():
        norm = sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(g))
        assert (norm > 0) == k.startswith("exit_"), k


@pytest.mark.parametrize(
    ("window", "stride", "padding"),
    [((2, 2), (2, 2), "VALID"), ((3, 3), (2, 2), "SAME"), ((3, 3), (1, 1), "SAME"),
     ((2, 2), (2, 2), "SAME")],
)  # fmt: skip
def test_max_pool_custom_gradient_matches_flax_including_ties(window, stride, padding):
    import flax.linen as nn

    from flexjax.models.build import max_pool

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 9, 7, 3)).astype(np.float32)).at[:, ::2].set(0.0)
    y_ref, vjp_ref = jax.vjp(lambda v: nn.max_pool(v, window, stride, padding), x)
    y, vjp = jax.vjp(lambda v: max_pool(v, window, stride, padding), x)
    g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
    np.testing.assert_array_equal(y, y_ref)
    # the same element of each window gets the gradient (the first maximum, ties included)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "alpha", "beta", "bias"), [(5, 1e-4, 0.75, 1.0), (4, 0.5, 0.75, 2.0)]
)
def test_lrn_custom_gradient_matches_autodiff_of_the_same_formula(size, alpha, beta, bias):
    from flexjax.models.build import apply_layer
    from flexjax.spec import lrn

    def autodiff_lrn(x):  # the formula, differentiated by JAX
        half = size // 2
        padded = jnp.pad(jnp.square(x), [(0, 0)] * 3 + [(half, size - 1 - half)])
        window = sum(padded[..., k : k + x.shape[-1]] for k in range(size))
        return x / jnp.power(bias + (alpha / size) * window, beta)

    layer = lrn(size=size, alpha=alpha, beta=beta, bias=bias)
    rng = np.random.default_rng(0)
    x = jnp.asarray(3 * rng.normal(size=(2, 5, 5, 12)).astype(np.float32))
    g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    y_ref, vjp_ref = jax.vjp(autodiff_lrn, x)
    y, vjp = jax.vjp(lambda v: apply_layer(layer, v, train=True, name="lrn"), x)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(vjp(g)[0], vjp_ref(g)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("hw", "c", "k", "s", "padding"),
    [(17, 8, 3, 1, "SAME"), (17, 8, 3, 2, "SAME"), (16, 6, 5, 2, "SAME"), (15, 4, 3, 1, "VALID"),
     (16, 4, 3, 2, "VALID"), (14, 5, 5, 2, ((1, 2), (2, 1)))],
)  # fmt: skip
def test_depthwise_conv_matches_lax_values_and_gradients(hw, c, k, s, padding):
    from flexjax.models.build import conv_general_dilated, export_lowering

    rng = np.random.default_rng(hw * 100 + k * 10 + s)
    x = jnp.asarray(rng.normal(size=(3, hw, hw, c)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, 1, c)), jnp.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (s, s), padding, dimension_numbers=dn,
                                                 feature_group_count=c)))  # fmt: skip

    ref, new = loss(jax.lax.conv_general_dilated), loss(conv_general_dilated)
    np.testing.assert_allclose(new(x, w), ref(x, w), rtol=1e-5, atol=1e-4)
    for a, b in zip(jax.grad(new, (0, 1))(x, w), jax.grad(ref, (0, 1))(x, w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    sliced = str(jax.make_jaxpr(new)(x, w))
    assert "conv_general_dilated" not in sliced
    with export_lowering():  # a fresh function: make_jaxpr caches traces per function
        assert "conv_general_dilated" in str(jax.make_jaxpr(loss(conv_general_dilated))(x, w))
