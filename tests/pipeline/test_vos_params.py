"""params.yaml's `vos:` section: loaded with the rest, three-deep overrides, errors naming the key, and kept out of
the image runs' params."""

from pathlib import Path

import pytest

from pipeline.params import Params, load_params
from pipeline.train_job import image_params
from pipeline.vos_params import VosParams, vos_job
from sam3.errors import ConfigError
from sam3.video.config import ClipConfig, PromptConfig, VosLossConfig

REPO = Path(__file__).resolve().parents[2]


def test_the_committed_vos_section_is_the_tiny_demo_with_the_recipe_where_it_does_not_say_demo():
    vos = load_params(REPO / "params.yaml").vos
    assert (vos.model.source, vos.dataset.raw, vos.evaluate.split) == ("tiny-sam2.1", "data/raw/vos_shapes", "valid")
    # the recipe's prompts and loss, unchanged in the demo
    assert vos.prompts == PromptConfig() == PromptConfig(0.5, 0.5, 2, 2, 7, 0.1)
    assert vos.loss == VosLossConfig()
    assert (vos.loss.focal_weight, vos.loss.dice_weight, vos.loss.iou_weight) == (20.0, 1.0, 1.0)
    assert vos.clip.max_objects == ClipConfig().max_objects == 3
    # the built-in defaults are the recipe's (a params file without vos: trains as SAM 2.1's MOSE fine-tuning)
    default = VosParams()
    assert (default.optim.lr, default.optim.lr_vision, default.optim.layer_decay) == (5e-6, 3e-6, 0.9)
    assert (default.optim.grad_clip, default.clip.num_frames, default.train.epochs) == (0.1, 8, 40)


def test_three_deep_overrides_set_typed_values():
    params = load_params(None, ["vos.train.max_steps=50", "vos.clip.num_frames=4", "vos.model.source=tiny-sam3"])
    assert (params.vos.train.max_steps, params.vos.clip.num_frames, params.vos.model.source) == (50, 4, "tiny-sam3")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("vos.train.max_step=5", "unknown key vos.train.max_step; did you mean vos.train.max_steps?"),
        ("vos.clip.num_frames=many", "vos.clip.num_frames = 'many': expected int"),
        ("vos.train.freeze=vision", "vos.train.freeze = 'vision': must be one of 'none', 'image_encoder'"),
        ("vos.prompts.prob_box=1.5", "vos.prompts.prob_box must be a probability in [0, 1], got 1.5"),
        ("vos.clip.num_frames=0", "vos.clip.num_frames must be >= 1"),
        ("vos.optim.layer_decay=0", "vos.optim.layer_decay must be in (0, 1]"),
        ("vos.a.b.c=1", "expected section.key=value"),
    ],
)
def test_vos_mistakes_name_the_key(override, message):
    with pytest.raises(ConfigError) as caught:
        load_params(None, [override])
    assert message in str(caught.value)


def test_an_image_run_neither_stores_nor_compares_the_vos_section():
    params = load_params(None, ["vos.train.max_steps=7"])
    assert "vos" not in image_params(params)
    assert image_params(params) == image_params(Params())  # a vos change does not restart an image run


def test_vos_job_carries_the_sections_as_given():
    params = load_params(None, ["vos.train.seed=3", "vos.optim.lr=1e-4"])
    job = vos_job(params.vos, "data/x", "runs/x", {"vos": {}})
    assert (job.dataset_dir, job.run_dir, job.loop.seed, job.optim.lr) == ("data/x", "runs/x", 3, 1e-4)
    assert job.clip is params.vos.clip and job.prompts is params.vos.prompts
