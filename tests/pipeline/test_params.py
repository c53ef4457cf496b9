"""params.yaml loading: defaults, overrides, and errors that name the key."""

from pathlib import Path

import pytest

from pipeline.params import Params, load_params, to_dict
from sam3.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_loads_and_matches_dataclass_defaults_for_model():
    params = load_params(REPO / "params.yaml")
    assert params.preprocess.size == 1008
    assert params.model.mode == "detection"
    assert params.dataset.raw == "data/raw/demo"


def test_repo_params_yaml_keeps_the_feature_cache_off_by_default():
    from sam3.config import CacheConfig

    # off: the demo pipeline trains from pixels; the cache_features stage then only writes an "off" manifest
    assert load_params(REPO / "params.yaml").cache == CacheConfig() == CacheConfig(False, 1, "fp16", 0)
    cached = load_params(None, ["cache.enabled=true", "cache.views=4", "train.freeze=vision"])
    assert cached.cache == CacheConfig(True, 4, "fp16", 0)


def test_defaults_without_file():
    assert load_params(None) == Params()


def test_exponent_without_dot_is_a_float():
    # YAML 1.1 parses 1e-3 as the string "1e-3"; for a float key it is still a number
    assert load_params(None, ["optim.lr_detr=1e-3"]).optim.lr_detr == 1e-3


def test_override_sets_typed_value(tmp_path):
    params = load_params(None, ["preprocess.size=512", "model.mode=segmentation", "model.image_size=224"])
    assert params.preprocess.size == 512
    assert params.model.mode == "segmentation"
    assert params.model.image_size == 224
    assert to_dict(params)["preprocess"]["size"] == 512


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.sorce=full"], "unknown key model.sorce; did you mean model.source?"),
        (["preproces.size=3"], "unknown key preproces; did you mean preprocess?"),
        (["model.mode=seg"], "model.mode = 'seg': must be one of 'detection', 'segmentation'"),
        (["preprocess.size=big"], "preprocess.size = 'big': expected int"),
        (["preprocess.size=true"], "preprocess.size = True: expected an integer"),
        (["train.amp_dtype=fp8"], "train.amp_dtype = 'fp8': must be one of 'bf16', 'fp16', 'none'"),
        (["train.batch_size=0"], "params: train.batch_size must be >= 1"),
        (["cache.enabled=true"], "params: cache.enabled needs a frozen vision encoder, but train.freeze is 'none'"),
        (["size=3"], "expected section.key=value"),
    ],
)
def test_bad_params_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_params(None, overrides)
    assert message in str(err.value)


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
