"""Models: the zoo of named `Net`s and the Flax module derived from a `Net`."""

from flexjax.models.build import (
    MultiExitModel,
    build,
    count_params,
    head_apply,
    init,
    layer_name,
    param_names,
)
from flexjax.models.zoo import MODELS, branchy_head, get_model

__all__ = [
    "MODELS",
    "MultiExitModel",
    "branchy_head",
    "build",
    "count_params",
    "get_model",
    "head_apply",
    "init",
    "layer_name",
    "param_names",
]
