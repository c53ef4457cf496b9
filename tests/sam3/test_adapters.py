"""Adapters through peft (sam3.adapters): which layers each part hits, what trains, the two exports, resume, cache."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import Sam3Config, Sam3Model

import sam3.trainer as trainer
from sam3.adapters import (
    ADAPTER_DIR,
    BASE_FILE,
    PART_PATTERNS,
    adapted_layer_counts,
    adapter_disabled,
    attach_adapter,
    base_fingerprint,
    fully_trained_names,
    is_adapter_parameter,
    set_adapter_trainable,
    target_pattern,
)
from sam3.checkpoint import step_checkpoint_name
from sam3.config import ADAPTER_PARTS, AdapterConfig, adapter_cache_problem, adapter_problem
from sam3.data.collate import collate_prompts
from sam3.data.dataset import CocoPromptDataset
from sam3.errors import ConfigError
from sam3.export import ModelCard, export_model
from sam3.freeze import apply_freeze
from sam3.model import Sam3Detector, load_model, parameters_without_text_gradients
from sam3.optim import param_groups
from tests.training_runs import IMAGE_SIZE, TEST_OPTIM, build_small_shapes, make_job, read_weights

ALL_PARTS = list(ADAPTER_PARTS)
# Linear layers per part, by hand from the two architectures (tiny_config; the default Sam3Config):
#   vision_attention  ViT layers x 4 (q, k, v, o)        tiny 2 x 4 = 8       full 32 x 4 = 128
#   vision_mlp        ViT layers x 2 (fc1, fc2)          tiny 2 x 2 = 4       full 32 x 2 = 64
#   text              text layers x 6 (q, k, v, out, fc1, fc2)   tiny 1 x 6   full 24 x 6 = 144
#   detr_encoder      layers x (2 attentions x 4 + 2)    tiny 1 x 10          full 6 x 10 = 60
#   detr_decoder      layers x (3 attentions x 4 + 2)    tiny 2 x 14 = 28     full 6 x 14 = 84
#   mask_decoder      its prompt cross-attention's 4 projections (both)
TINY_COUNTS = {
    "vision_attention": 8,
    "vision_mlp": 4,
    "text": 6,
    "detr_encoder": 10,
    "detr_decoder": 28,
    "mask_decoder": 4,
}
FULL_COUNTS = {
    "vision_attention": 128,
    "vision_mlp": 64,
    "text": 144,
    "detr_encoder": 60,
    "detr_decoder": 84,
    "mask_decoder": 4,
}


def _linear_matches(model: nn.Module) -> dict[str, list[str]]:
    return {
        part: [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(pattern, name)]
        for part, pattern in PART_PATTERNS.items()
    }


def test_each_part_hits_the_layers_counted_by_hand_in_the_tiny_and_the_full_model():
    with torch.device("meta"):  # the full architecture's module names without its 3.4 GB of weights
        full = Sam3Model(Sam3Config())
    tiny = load_model("tiny").model
    for model, expected in ((tiny, TINY_COUNTS), (full, FULL_COUNTS)):
        matches = _linear_matches(model)
        assert {part: len(names) for part, names in matches.items()} == expected
        every = [name for names in matches.values() for name in names]
        assert len(every) == len(set(every))  # no layer belongs to two parts
        # each pattern matches only Linear layers: nothing else in the model has a matching name
        all_named = [name for name, _ in model.named_modules()]
        for part, pattern in PART_PATTERNS.items():
            assert [n for n in all_named if re.fullmatch(pattern, n)] == matches[part], part
    assert matches["vision_attention"][:4] == [f"vision_encoder.backbone.layers.0.attention.{p}_proj" for p in "qkvo"]
    assert "text_encoder.text_model.encoder.layers.23.mlp.fc2" in matches["text"]


def test_peft_adapts_exactly_the_matched_layers():
    detector = load_model("tiny")
    attach_adapter(detector, AdapterConfig(kind="lora", parts=ALL_PARTS))
    assert adapted_layer_counts(detector.model) == TINY_COUNTS
    detector = load_model("tiny")
    attach_adapter(detector, AdapterConfig(kind="dora", rank=4, parts=["detr_decoder"]))
    counts = adapted_layer_counts(detector.model)
    assert counts == {**dict.fromkeys(TINY_COUNTS, 0), "detr_decoder": 28}
    names = [n for n, _ in detector.model.named_parameters() if is_adapter_parameter(n)]
    assert len(names) == 28 * 3  # A, B and DoRA's magnitude per layer
    a = dict(detector.model.named_parameters())["detr_decoder.layers.0.mlp.fc1.lora_A.default.weight"]
    assert a.shape == (4, 64)  # [rank, in]


def test_unknown_part_and_bad_settings_are_refused_with_the_key():
    with pytest.raises(ConfigError, match="adapter.parts: unknown part 'vit'"):
        target_pattern(["vit"])
    assert adapter_problem(AdapterConfig(kind="lora", rank=0)) == "adapter.rank = 0: must be >= 1"
    assert "adapter.parts is empty" in adapter_problem(AdapterConfig(kind="lora", parts=[]))
    assert adapter_problem(AdapterConfig(kind="none", rank=0)) is None  # not read without an adapter


def _batch(detector: Sam3Detector, shapes: Path):
    dataset = CocoPromptDataset(shapes, "valid", image_size=IMAGE_SIZE, train=False)
    return collate_prompts([dataset[0]])


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"))


def _adapted(parts=ALL_PARTS, kind="lora", freeze="heads", seed=0) -> Sam3Detector:
    """A tiny detector at IMAGE_SIZE with an adapter whose B matrices are random (as after training), heads trained:
    their weights moved too, so the exports must carry them."""
    detector = load_model("tiny", image_size=IMAGE_SIZE, seed=seed)
    with torch.random.fork_rng(devices=[]):  # peft draws the A matrices from the global generator
        torch.manual_seed(seed)
        attach_adapter(detector, AdapterConfig(kind=kind, rank=4, parts=parts))
    unused = parameters_without_text_gradients(detector, with_masks=True)
    apply_freeze(detector.model, freeze, also_freeze=unused)
    set_adapter_trainable(detector.model, keep_frozen=unused)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in detector.model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
            elif param.requires_grad and not is_adapter_parameter(name):
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return detector.eval()


def _outputs(detector: Sam3Detector, batch) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = detector(batch, with_masks=True)
    return {key: out[key] for key in ("pred_logits", "pred_boxes", "presence_logits", "pred_masks")}


def _assert_close(ours: dict, theirs: dict) -> None:
    """Equal within float round-off of a merged W + BA against W x + B A x: 1e-4 of each output's scale (measured:
    6e-6 on the logits, 1.7e-4 on mask logits of magnitude 6.8)."""
    for key, value in ours.items():
        scale = max(1.0, float(value.abs().max()))
        torch.testing.assert_close(theirs[key], value, rtol=1e-4, atol=1e-4 * scale, msg=key)


def test_what_trains_adapter_always_adapted_weights_never_the_rest_as_freeze_says():
    detector = _adapted(parts=["vision_attention", "detr_encoder"], freeze="heads")
    params = dict(detector.model.named_parameters())
    assert params["vision_encoder.backbone.layers.0.attention.q_proj.lora_A.default.weight"].requires_grad
    assert not params["vision_encoder.backbone.layers.0.attention.q_proj.base_layer.weight"].requires_grad
    assert not params["vision_encoder.backbone.layers.0.mlp.fc1.weight"].requires_grad  # heads: ViT frozen
    assert params["detr_decoder.box_head.layer1.weight"].requires_grad  # heads train in full
    assert not params["detr_encoder.layers.0.mlp.fc1.base_layer.weight"].requires_grad
    detector = _adapted(parts=["detr_decoder"], freeze="none")
    params = dict(detector.model.named_parameters())
    assert not params["detr_decoder.layers.0.mlp.fc1.base_layer.weight"].requires_grad  # adapted: never
    assert params["vision_encoder.backbone.layers.0.mlp.fc1.weight"].requires_grad  # freeze none: trains
    # the parts text prompts never reach stay frozen, adapter weights included (DDP would otherwise wait for them)
    detector = load_model("tiny", image_size=IMAGE_SIZE)
    attach_adapter(detector, AdapterConfig(kind="lora", parts=["mask_decoder"]))
    unused = parameters_without_text_gradients(detector, with_masks=False)
    apply_freeze(detector.model, "none", also_freeze=unused)
    set_adapter_trainable(detector.model, keep_frozen=unused)
    assert not any(p.requires_grad for n, p in detector.model.named_parameters() if n.startswith("mask_decoder."))


def test_a_fresh_adapter_computes_the_base_model_and_disabling_it_gives_the_base_back(shapes):
    base = load_model("tiny", image_size=IMAGE_SIZE).eval()
    batch = _batch(base, shapes)
    expected = _outputs(base, batch)
    fresh = load_model("tiny", image_size=IMAGE_SIZE).eval()
    attach_adapter(fresh, AdapterConfig(kind="lora", parts=ALL_PARTS))
    for key, value in _outputs(fresh, batch).items():
        assert torch.equal(value, expected[key]), key  # B = 0: the update is exactly zero
    trained = _adapted(freeze="vision_text")  # only adapters and DETR parts moved... adapters everywhere
    moved = _outputs(trained, batch)
    assert not torch.allclose(moved["pred_logits"], expected["pred_logits"])
    with adapter_disabled(trained):
        off = _outputs(trained, batch)
    # adapter off: the base model except for the DETR weights trained in full, which we put back to compare
    plain = _adapted(parts=["vision_attention", "vision_mlp", "text"], freeze="heads")
    with adapter_disabled(plain):
        assert torch.equal(_outputs(plain, batch)["pred_boxes"], _outputs_with_heads(plain, batch, shapes))
    assert not torch.allclose(off["pred_logits"], moved["pred_logits"])


def _outputs_with_heads(adapted: Sam3Detector, batch, shapes) -> torch.Tensor:
    """The base model with `adapted`'s fully trained parameters copied in: what the adapter-off model computes."""
    base = load_model("tiny", image_size=IMAGE_SIZE).eval()
    params = dict(base.model.named_parameters())
    with torch.no_grad():
        for name in fully_trained_names(adapted.model):
            params[name].copy_(dict(adapted.model.named_parameters())[name])
    return _outputs(base, batch)["pred_boxes"]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_merged_export_loads_in_plain_transformers_and_equals_the_adapted_model(kind, shapes, tmp_path):
    detector = _adapted(kind=kind)
    batch = _batch(detector, shapes)
    expected = _outputs(detector, batch)
    before = {k: v.clone() for k, v in detector.model.state_dict().items()}
    folder = export_model(
        detector, tmp_path / "model", ["circle", "square"], ModelCard(dataset="shapes", base_model="tiny")
    )

    model, info = Sam3Model.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in k or "base_layer" in k for k in model.state_dict())
    _assert_close(expected, _outputs(load_model(folder, image_size=IMAGE_SIZE).eval(), batch))
    # the detector is left exactly as it was: each layer is merged in a copy
    for key, value in detector.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert (folder / ADAPTER_DIR / "adapter_config.json").is_file()


def test_adapter_export_round_trips_through_peft_with_the_fully_trained_heads(shapes, tmp_path):
    detector = _adapted(parts=["vision_attention", "detr_encoder"], freeze="heads")
    batch = _batch(detector, shapes)
    expected = _outputs(detector, batch)
    folder = export_model(detector, tmp_path / "model", ["circle"], ModelCard(dataset="shapes", base_model="tiny"))
    adapter = folder / ADAPTER_DIR

    base = load_model("tiny", image_size=IMAGE_SIZE).model  # the base model, as a user loads it
    identity = json.loads((adapter / BASE_FILE).read_text())
    assert identity["source"] == "tiny" and identity["peft_type"] == "LORA"
    assert identity["fully_trained"] == len(fully_trained_names(detector.model)) > 0
    assert identity["weights"] == base_fingerprint(base, exclude=fully_trained_names(detector.model))
    other = load_model("tiny", image_size=IMAGE_SIZE, seed=1).model
    assert identity["weights"] != base_fingerprint(other, exclude=fully_trained_names(detector.model))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "tiny"

    loaded = PeftModel.from_pretrained(base, adapter)
    _assert_close(expected, _outputs(Sam3Detector(loaded.base_model.model).eval(), batch))


@pytest.fixture(scope="module")
def adapter_run(shapes, tmp_path_factory):
    """6 steps with LoRA (ViT + DETR encoder, rank 4) and freeze heads, checkpoints at steps 0, 3, 4, 6."""
    run_dir = tmp_path_factory.mktemp("lora")
    adapter = AdapterConfig(kind="lora", rank=4, parts=["vision_attention", "detr_encoder"], lr=1e-2)
    trainer.train(make_job(run_dir, shapes, max_steps=6, checkpoint_every=3, freeze="heads", adapter=adapter))
    return run_dir, adapter


@pytest.mark.slow
def test_adapter_checkpoints_hold_only_what_trains_and_resume_exactly(adapter_run, shapes, tmp_path):
    reference_dir, adapter = adapter_run
    saved = torch.load(reference_dir / "checkpoints" / step_checkpoint_name(3), weights_only=False)
    keys = list(saved["model"])
    assert any("lora_A" in k for k in keys) and not any("base_layer" in k for k in keys)
    assert not any(k.startswith("vision_encoder.") and not is_adapter_parameter(k) for k in keys if "weight" in k)

    (tmp_path / "checkpoints").mkdir()
    for step in (0, 3):
        shutil.copy(reference_dir / "checkpoints" / step_checkpoint_name(step), tmp_path / "checkpoints")
    trainer.train(make_job(tmp_path, shapes, max_steps=6, checkpoint_every=3, freeze="heads", adapter=adapter))

    records = [json.loads(line) for line in (tmp_path / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 5, 6]  # resumed at step 3
    resumed, reference = read_weights(tmp_path / "model"), read_weights(reference_dir / "model")
    initial = load_model("tiny", image_size=IMAGE_SIZE).model.state_dict()
    assert resumed.keys() == reference.keys() == initial.keys()  # merged: transformers' names
    for name, value in reference.items():
        assert torch.equal(resumed[name], value), name
    moved = "vision_encoder.backbone.layers.0.attention.q_proj.weight"  # merged W + BA: the adapter trained
    assert not torch.allclose(reference[moved], initial[moved])
    frozen = "vision_encoder.backbone.layers.0.mlp.fc1.weight"  # not adapted, freeze heads: untouched
    assert torch.equal(reference[frozen], initial[frozen])


def test_adapter_weights_get_the_adapter_rate_without_layer_decay():
    detector = _adapted(parts=["vision_attention", "detr_decoder"], freeze="heads")
    groups = param_groups(detector.model, replace(TEST_OPTIM, layer_decay=0.5), num_vit_blocks=2, adapter_lr=3e-4)
    adapter = [g for g in groups if g["component"] == "adapter"]
    assert {g["base_lr"] for g in adapter} == {3e-4}
    assert sorted(n for g in adapter for n in g["names"]) == sorted(
        n for n, p in detector.model.named_parameters() if is_adapter_parameter(n)
    )
    by_part = param_groups(detector.model, replace(TEST_OPTIM, layer_decay=0.5), num_vit_blocks=2, adapter_lr=None)
    vit = [g for g in by_part if any("layers.0.attention.q_proj.lora_A" in n for n in g["names"])]
    assert vit[0]["component"] == "vision" and vit[0]["base_lr"] == pytest.approx(TEST_OPTIM.lr_vision * 0.5**2)


def test_a_feature_cache_is_refused_with_an_adapter_in_the_vit_and_allowed_elsewhere():
    message = adapter_cache_problem(AdapterConfig(kind="lora", parts=["vision_mlp", "detr_decoder"]))
    assert message.startswith("cache.enabled with an adapter in the vision encoder (adapter.parts ['vision_mlp'])")
    assert adapter_cache_problem(AdapterConfig(kind="lora", parts=["text", "detr_decoder"])) is None
    assert adapter_cache_problem(AdapterConfig(kind="none")) is None


@pytest.mark.slow
def test_a_nan_step_with_adapters_rolls_back_to_the_adapter_checkpoint_and_finishes(shapes, tmp_path, monkeypatch):
    import sam3.training.setup as run_setup
    from tests.training_runs import NanOnCall

    # call 4 is optimiser step index 3; the newest checkpoint then is step 2's (adapters and heads only)
    monkeypatch.setattr(run_setup, "Criterion", lambda *args, **kwargs: NanOnCall((4,), *args, **kwargs))
    adapter = AdapterConfig(kind="lora", rank=4, parts=["detr_decoder"])
    trainer.train(make_job(tmp_path, shapes, max_steps=4, checkpoint_every=2, freeze="heads", adapter=adapter))

    records = [json.loads(line) for line in (tmp_path / "train_stats.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 3, 3, 4]
    first_3, event, replayed_3 = records[2:5]
    assert event["event"] == "rollback" and event["reason"] == "non-finite loss nan at step 3"
    assert replayed_3["loss"] == first_3["loss"]  # back to step 2's adapter weights: the same step again
    weights = read_weights(tmp_path / "model")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
