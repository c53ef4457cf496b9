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
        (["train.max_steps=0"], "params: train.max_steps must be >= 1 (null: train.epochs decide)"),
        (["train.log_every=0"], "params: train.log_every must be >= 1"),
        (["train.export=best"], "params: train.export = 'best' needs validation: set train.val_every_epochs >= 1"),
        (["train.export=newest"], "train.export = 'newest': must be one of 'last', 'best'"),
        (["train.patience=3"], "params: train.patience = 3 needs validation: set train.val_every_epochs >= 1"),
        (["train.patience=-1"], "params: train.patience = -1: must be >= 0 (0 or null: no early stopping)"),
        (
            ["train.val_every_epochs=1", "train.best_metric=segm_AP"],
            "params: train.best_metric = 'segm_AP' needs model.mode segmentation",
        ),
        (["train.best_metric=mAP"], "train.best_metric = 'mAP': must be one of 'auto', 'bbox_AP', 'segm_AP', 'cgF1'"),
        (
            ["train.val_every_epochs=1", "train.export=best", "train.keep_best=false"],
            "params: train.export = 'best' needs train.keep_best true",
        ),
        (["train.max_prompts_per_image=0"], "params: train.max_prompts_per_image = 0: must be >= 1, or null"),
        (["train.num_workers=-1"], "params: train.num_workers = -1: must be >= 0, or auto"),
        (["train.num_workers=many"], "train.num_workers = 'many': expected int or 'auto'"),
        (["ddp.strategy=fsdp"], "ddp.strategy = 'fsdp': must be one of 'ddp', 'zero'"),
    ],
)
def test_bad_params_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_params(None, overrides)
    assert message in str(err.value)


def test_validation_driven_settings_load_when_validation_is_on():
    train = load_params(
        None,
        [
            "train.val_every_epochs=2",
            "train.patience=3",
            "train.export=best",
            "train.best_metric=segm_AP",
            "model.mode=segmentation",
        ],
    ).train
    assert (train.patience, train.export, train.best_metric) == (3, "best", "segm_AP")
    # the defaults: no early stopping, the last weights exported, the mode's AP
    assert load_params(REPO / "params.yaml").train.patience == 0
    assert (Params().train.patience, Params().train.export, Params().train.best_metric) == (0, "last", "auto")
    assert load_params(None, ["train.patience=null"]).train.patience is None  # also off
    # mode val trains and exports nothing: a params file set up for the best export still evaluates
    assert load_params(None, ["train.mode=val", "train.export=best", "train.patience=3"]).train.mode == "val"


def test_real_scale_settings_load():
    assert load_params(None).train.num_workers == "auto"  # the library's default; the demo's params.yaml says 0
    train = load_params(None, ["train.num_workers=4", "train.max_prompts_per_image=16"]).train
    assert (train.num_workers, train.max_prompts_per_image) == (4, 16)
    assert load_params(None, ["ddp.strategy=zero"]).ddp.strategy == "zero"


def test_bad_yaml_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_params(path)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")
