"""MCDNN approximations: low-rank factorization, magnitude pruning, architecture changes."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from flexjax import approx, costs, models
from flexjax.models import zoo
from flexjax.spec import Net, conv, dense, flatten, relu


def _tiny() -> tuple[Net, dict]:
    net = Net(
        (6, 6, 2),
        3,
        (conv(4, 3, padding="VALID"), relu(), flatten(), dense(8), relu(), dense(3)),
    )
    return net, models.init(net, jax.random.PRNGKey(0))


def _apply(net: Net, variables: dict, x: np.ndarray) -> np.ndarray:
    return np.asarray(models.build(net).apply(variables, x)["final"])


X = np.random.default_rng(0).random((5, 6, 6, 2)).astype(np.float32)


def test_factorize_dense_reconstructs_numpys_truncated_svd():
    net, v = _tiny()
    w = np.asarray(v["params"]["layer_03"]["kernel"], np.float64)  # [64, 8]
    new_net, nv = approx.factorize_dense(net, v, "layer_03", rank=3)
    p = nv["params"]["layer_03"]
    got = np.asarray(p["u"]["kernel"]) @ np.asarray(p["v"]["kernel"])
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    want = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert new_net.layers[3].kind == "low_rank_dense" and new_net.layers[3]["rank"] == 3
    np.testing.assert_array_equal(p["v"]["bias"], v["params"]["layer_03"]["bias"])


def test_factorize_conv_reconstructs_the_reshaped_kernel_and_full_rank_is_exact():
    net, v = _tiny()
    k = np.asarray(v["params"]["layer_00"]["kernel"], np.float64)  # [3, 3, 2, 4]
    new_net, nv = approx.factorize_conv(net, v, "layer_00", rank=2)
    p = nv["params"]["layer_00"]
    assert p["u"]["kernel"].shape == (3, 3, 2, 2) and p["v"]["kernel"].shape == (1, 1, 2, 4)
    got = np.asarray(p["u"]["kernel"]).reshape(18, 2) @ np.asarray(p["v"]["kernel"]).reshape(2, 4)
    u, s, vt = np.linalg.svd(k.reshape(18, 4), full_matrices=False)
    np.testing.assert_allclose(got, (u[:, :2] * s[:2]) @ vt[:2], atol=1e-5)
    full_net, fv = approx.factorize_conv(net, v, "layer_00", rank=4)
    np.testing.assert_allclose(_apply(full_net, fv, X), _apply(net, v, X), atol=1e-5)
    assert new_net.layers[0].kind == "low_rank_conv" and new_net.layers[0]["kernel"] == (3, 3)


def test_rank_for_energy_picks_the_smallest_rank_keeping_the_fraction():
    s = np.array([3.0, 2.0, 1.0])  # energies 9, 4, 1 of 14
    assert approx.rank_for_energy(s, 0.5) == 1
    assert approx.rank_for_energy(s, 0.9) == 2
    assert approx.rank_for_energy(s, 1.0) == 3
    net, v = _tiny()
    got, _ = approx.factorize(net, v, energy=0.999999)
    assert got.layers[3]["rank"] == 8  # full rank of a random [64, 8] kernel


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"rank": 9}, "larger than the layer allows"),
        ({"rank": 0}, "larger than the layer allows"),
        ({"energy": 1.5}, r"energy fraction must be in \(0, 1\]"),
        ({"rank": 2, "energy": 0.9}, "exactly one"),
    ],
)
def test_factorize_bad_rank_or_energy_is_a_clear_error(kw, match):
    net, v = _tiny()
    with pytest.raises(approx.ApproxError, match=match):
        approx.factorize_dense(net, v, "layer_03", **kw)


def test_factorize_wrong_kind_or_site_is_a_clear_error():
    net, v = _tiny()
    with pytest.raises(approx.ApproxError, match="needs 'dense'"):
        approx.factorize_dense(net, v, "layer_00", rank=1)
    with pytest.raises(approx.TransformError, match="site"):
        approx.factorize_dense(net, v, "layer_99", rank=1)


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, True, "0.5"])
def test_sparsity_outside_unit_interval_is_a_clear_error(sparsity):
    net, v = _tiny()
    with pytest.raises(approx.ApproxError, match=r"sparsity must be a fraction in \[0, 1\)"):
        approx.magnitude_prune(net, v, sparsity)


def test_global_magnitude_pruning_zeroes_exactly_the_smallest_weights():
    net, v = _tiny()
    _, pv = approx.magnitude_prune(net, v, 0.6)
    kernels = [
        np.asarray(v["params"][k]["kernel"]).ravel() for k in ("layer_00", "layer_03", "layer_05")
    ]
    allw = np.abs(np.concatenate(kernels))
    k = int(np.floor(0.6 * allw.size))
    thresh = np.sort(allw)[k - 1]
    for name, orig in zip(("layer_00", "layer_03", "layer_05"), kernels):
        new = np.asarray(pv["params"][name]["kernel"]).ravel()
        np.testing.assert_array_equal(new == 0, np.abs(orig) <= thresh)
        np.testing.assert_array_equal(new[new != 0], orig[new != 0])
    np.testing.assert_array_equal(pv["params"]["layer_03"]["bias"], v["params"]["layer_03"]["bias"])
    assert approx.zero_fraction(pv) == pytest.approx(k / allw.size)


def test_per_layer_pruning_gives_each_kernel_the_same_fraction_and_zero_is_a_no_op():
    net, v = _tiny()
    _, pv = approx.magnitude_prune(net, v, 0.5, scope="layer")
    for name in ("layer_00", "layer_03", "layer_05"):
        kern = np.asarray(pv["params"][name]["kernel"])
        assert (kern == 0).sum() == kern.size // 2
    _, same = approx.magnitude_prune(net, v, 0.0)
    for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(v)):
        np.testing.assert_array_equal(a, b)
    _, one = approx.magnitude_prune(net, v, {"layer_03": 0.75}, scope="layer")
    assert (np.asarray(one["params"]["layer_03"]["kernel"]) == 0).mean() == 0.75
    assert (np.asarray(one["params"]["layer_00"]["kernel"]) == 0).sum() == 0


_EXAMPLES = {
    "low_rank": {"fraction": 0.5},
    "magnitude_prune": {"sparsity": 0.5},
    "width_multiplier": {"multiplier": 0.5},
    "shrink_dense": {"features": {"layer_07": 50}},
    "drop_layers": {"sites": ["layer_03"]},
}


@pytest.mark.parametrize("name", sorted(approx.TECHNIQUES))
def test_every_technique_is_pure_runs_under_eval_shape_and_builds(name):
    net = zoo.lenet_branchy(exits=(), width=0.5)
    v = models.init(net, jax.random.PRNGKey(0))
    before = jax.tree.map(np.array, v)
    recipe = [{"technique": name, **_EXAMPLES[name]}]
    new_net, nv = approx.apply_recipe(net, v, recipe)
    abstract = jax.eval_shape(lambda vv: approx.apply_recipe(net, vv, recipe)[1], v)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, nv)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(v)):  # inputs untouched
        np.testing.assert_array_equal(a, b)
    x = np.zeros((1, *net.input_shape), np.float32)
    assert models.build(new_net).apply(nv, x)["final"].shape == (1, 10)


def test_energy_rank_needs_concrete_weights_under_eval_shape():
    net, v = _tiny()
    with pytest.raises(approx.ApproxError, match="concrete weights"):
        jax.eval_shape(lambda vv: approx.factorize(net, vv, energy=0.9)[1], v)


def test_architecture_changes_really_shrink_parameters_and_flops():
    net = zoo.lenet_branchy(exits=())
    v = models.init(net, jax.random.PRNGKey(0))
    base = costs.of(net).backbone
    half, _ = approx.width_multiplier(net, v, 0.5)
    assert [x.get("features") for x in half.layers if x.kind in ("conv", "dense")] == [
        10,
        25,
        250,
        10,
    ]
    assert costs.of(half).backbone.flops < base.flops / 3
    small, sv = approx.shrink_dense(net, v, {"layer_07": 100})
    assert small.layers[7]["features"] == 100 and sv["params"]["layer_10"]["kernel"].shape == (
        100,
        10,
    )
    dropped, _ = approx.drop_layers(net, v, ["layer_07", "layer_03"], jax.random.PRNGKey(1))
    assert [x.kind for x in dropped.layers].count("conv") == 1
    assert [x.kind for x in dropped.layers].count("dense") == 1
    with pytest.raises(approx.ApproxError, match="width multiplier"):
        approx.width_multiplier(net, v, 0.0)


def test_compose_applies_steps_in_order_and_matches_apply_recipe():
    net, v = _tiny()
    f = approx.compose(
        lambda n, w: approx.magnitude_prune(n, w, 0.5),
        lambda n, w: approx.factorize_dense(n, w, "layer_03", rank=2),
    )
    a_net, a = f(net, v)
    b_net, b = approx.apply_recipe(
        net,
        v,
        [
            {"technique": "magnitude_prune", "sparsity": 0.5},
            {"technique": "low_rank", "ranks": {"layer_03": 2}},
        ],
    )
    assert a_net == b_net and a_net.layers[3]["rank"] == 2
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    with pytest.raises(approx.ApproxError, match="unknown technique 'nope'; valid:"):
        approx.apply_recipe(net, v, [{"technique": "nope"}])
