"""Models: the zoo of named `Net`s and the Flax module derived from a `Net`.

ImageNet weights for the zoo's ``efficientnet_lite0/1/2``:
``flexjax.models.pretrained.load(name, image_size=None) -> (net, variables)``
(not imported here: it reads weights files and class names on demand).
"""

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
