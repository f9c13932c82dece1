"""Config schema: unknown keys and wrong types fail loudly; every shipped config builds."""

import glob
import importlib.util
import os

import pytest

from flexjax import config as config_lib
from flexjax.models import get_model

from conftest import ROOT

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
CONFIGS = [c for c in CONFIGS if not c.endswith("__init__.py")]


def _load(path):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_unknown_key_raises_listing_valid_keys_of_its_section():
    c = config_lib.defaults()
    c.train.unlock()
    c.train.lr = 0.1
    with pytest.raises(ValueError, match=r"unknown config key 'train.lr'.*train.learning_rate"):
        config_lib.validate(c)


def test_wrong_type_raises():
    c = config_lib.defaults().to_dict()
    c["train"]["num_epochs"] = "ten"
    import ml_collections

    with pytest.raises(ValueError, match="'train.num_epochs' must be a int"):
        config_lib.validate(ml_collections.ConfigDict(c))


def test_validate_fills_defaults_for_partial_config():
    import ml_collections

    full = config_lib.validate(ml_collections.ConfigDict({"train": {"num_epochs": 3}}))
    assert full.train.num_epochs == 3 and full.train.batch_size == 64
    assert full.exits.criterion == "entropy"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_shipped_config_validates_and_builds_its_net(path, arg):
    config = _load(path).get_config(arg)
    config = config.base if "base" in config else config  # jobs wrapping a training config
    if "catalog_config" in config:  # MCDNN on a lite catalog: its schema, the catalog's
        config = config_lib.validate(config)
        assert "recipes" in config_lib.load(config.catalog_config)
        return
    if "recipes" in config:  # a pretrained-Lite catalog: its own schema, zoo nets by name
        config = config_lib.validate(config)
        for name in (*config.models, *config.originals):
            net = get_model(name, image_size=min(config.resolutions))
            assert net.exit_names[-1] == "final"
        return
    if "model_config" in config:  # an Edgent job: its own schema, the net's config by reference
        config = config_lib.validate(config, config_lib.edgent_defaults)
        if config.distill.backbone:  # a pretrained backbone with distilled exits, no model_config
            from pipelines import edgent_distill

            edgent_distill.check(config)  # builds the backbone, its exit and cut positions
            return
        config = config_lib.load(config.model_config)
    config = config_lib.validate(config)
    kwargs = config.model.kwargs.to_dict()
    net = get_model(config.model.name, **kwargs)
    assert net.exit_names[-1] == "final"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_unknown_arg_raises(path):
    with pytest.raises(ValueError, match="unknown config argument"):
        _load(path).get_config("nonsense")


def test_edgent_config_unknown_key_lists_the_edgent_keys():
    import ml_collections

    c = ml_collections.ConfigDict({"bench": {"frame": 9}})
    with pytest.raises(ValueError, match=r"unknown config key 'bench.frame'.*bench.frames"):
        config_lib.validate(c, config_lib.edgent_defaults)
    # A training key is not an Edgent key: the two schemas do not mix.
    with pytest.raises(ValueError, match="unknown config key 'train.num_epochs'"):
        config_lib.validate(
            ml_collections.ConfigDict({"train": {"num_epochs": 1}}), config_lib.edgent_defaults
        )


def test_load_config_reference_missing_file_raises():
    with pytest.raises(FileNotFoundError, match="configs/nope.py does not exist"):
        config_lib.load("configs/nope.py:smoke")
    assert config_lib.load("configs/mnist_lenet_branchy.py:smoke").train.num_epochs == 2


@pytest.mark.parametrize(
    ("schema", "key"),
    [
        (config_lib.defaults, "flexdnn.delta"),  # FlexDNN's settings live in FlexDNN configs
        (config_lib.flexdnn_defaults, "flexdnn.deltaa"),
        (config_lib.catalog_defaults, "heads.stepz"),
        (config_lib.catalog_defaults, "base.train.lr"),
        (config_lib.edgent_defaults, "bench.framez"),
    ],
)
def test_every_job_schema_rejects_unknown_keys_the_same_way(schema, key):
    with pytest.raises(ValueError, match=f"unknown config key '{key}'"):
        config_lib.check_key(key, schema)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_validates_against_its_own_schema(path):
    config = _load(path).get_config("smoke")
    schema = config_lib.schema_of(config)
    assert set(config_lib.validate(config).keys()) == set(schema().keys())
