"""The PyTorch reference of the training benchmark (the optional `bench` extra; else skipped)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [("lenet_branchy", {}), ("alexnet_branchy", {"width": 0.25, "input_shape": (28, 28, 1)})],
)
def test_torch_reference_same_weights_gives_same_logits(name, kwargs):
    import jax

    from flexjax.models import get_model, init
    from train.torch_reference import max_logit_difference

    net = get_model(name, **kwargs)
    variables = jax.device_get(init(net, jax.random.key(0)))
    x = np.random.default_rng(0).uniform(size=(4, *net.input_shape)).astype(np.float32)
    assert max_logit_difference(net, variables, x) < 1e-5
