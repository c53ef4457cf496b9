"""sam3.model: loading (tiny / full / folders), the batched every-layer forward against Sam3Model.forward, gradients."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torchvision.ops import box_convert
from transformers import Sam3Model, Sam3VideoConfig

from sam3.batch import PromptBatch
from sam3.errors import ConfigError, ExportError, ModelLoadError
from sam3.model import (
    Sam3Detector,
    load_model,
    parameters_without_text_gradients,
    tiny_config,
)
from sam3.tokenizer import attention_mask, tokenize

PROMPTS = ["red circle", "blue square", "a small green triangle"]
QUERY_IMAGE = [0, 0, 0, 1, 1]  # 2 images, 5 (image, prompt) pairs over 3 unique prompts
QUERY_PROMPT = [0, 1, 2, 0, 2]
TOKEN_EMBEDDING = 49_408 * 64  # CLIP vocabulary x tiny width


@pytest.fixture(scope="module")
def detector() -> Sam3Detector:
    return load_model("tiny")


def make_batch(image_size: int = 224) -> PromptBatch:
    generator = torch.Generator().manual_seed(7)
    ids = tokenize(PROMPTS)
    return PromptBatch(
        pixel_values=torch.rand(2, 3, image_size, image_size, generator=generator) * 2 - 1,
        input_ids=ids,
        attention_mask=attention_mask(ids),
        query_image=torch.tensor(QUERY_IMAGE),
        query_prompt=torch.tensor(QUERY_PROMPT),
        targets=[{} for _ in QUERY_IMAGE],
    )


def test_tiny_config_follows_the_recipe() -> None:
    config = tiny_config()
    vit = config.vision_config.backbone_config
    assert (vit.hidden_size, vit.num_hidden_layers, vit.global_attn_indexes, vit.image_size) == (64, 2, [1], 224)
    assert (vit.hidden_size // vit.num_attention_heads) % 4 == 0
    text = config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.max_position_embeddings) == (64, 1, 32)
    assert (text.bos_token_id, text.eos_token_id, text.pad_token_id) == (49406, 49407, 0)
    widths = {
        config.vision_config.fpn_hidden_size,
        config.detr_encoder_config.hidden_size,
        config.detr_decoder_config.hidden_size,
        config.geometry_encoder_config.hidden_size,
        config.mask_decoder_config.hidden_size,
    }
    assert widths == {64}
    assert config.detr_encoder_config.num_layers == 1 and config.detr_decoder_config.num_layers == 2
    assert config.detr_decoder_config.num_queries == 16 and config.detr_decoder_config.num_attention_heads == 4
    sub_configs = [config, config.vision_config, vit, text, config.geometry_encoder_config]
    sub_configs += [config.detr_encoder_config, config.detr_decoder_config, config.mask_decoder_config]
    assert all(c.initializer_range == 0.1 for c in sub_configs)
    # 16 x 16 patches at 224 px: FPN maps 64, 32 and 16 per side.
    assert config.vision_config.backbone_feature_sizes == [[64, 64], [32, 32], [16, 16]]


def test_tiny_parameter_count(detector: Sam3Detector) -> None:
    total = sum(p.numel() for p in detector.parameters())
    # About 1M parameters besides CLIP's 49,408 x 64 token table (3.16M), 4.3M in all.
    assert 0.9e6 < total - TOKEN_EMBEDDING < 1.3e6
    assert 4.0e6 < total < 4.6e6


def test_full_parameter_count_on_meta_device() -> None:
    with torch.device("meta"):
        full = load_model("full")
    assert sum(p.numel() for p in full.parameters()) == 840_376_374
    assert full.config.image_size == 1008


def test_tiny_is_seeded_and_leaves_caller_rng_alone(detector: Sam3Detector) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    again = load_model("tiny")
    assert torch.equal(torch.rand(3), expected)  # the load did not consume or reset the caller's generator
    for (name, a), b in zip(detector.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = load_model("tiny", seed=1)
    weight = "model.detr_decoder.query_embed.weight"
    assert not torch.equal(other.state_dict()[weight], detector.state_dict()[weight])


@pytest.mark.parametrize("geometry_token", [False, True])
def test_last_layer_equals_sam3model_forward(geometry_token: bool) -> None:
    """Off: our forward is `Sam3Model.forward` with a text prompt. On (Meta's behaviour): it is `Sam3Model.forward`
    given one padding box (label -10), which leaves the geometry encoder's CLS token as the prompt's only extra
    token: the recipe the exported model's README gives plain transformers users."""
    detector = load_model("tiny", text_geometry_token=geometry_token)
    batch = make_batch()
    num_queries = len(QUERY_IMAGE)
    boxes = {}
    if geometry_token:
        boxes = {"input_boxes": torch.zeros(num_queries, 1, 4), "input_boxes_labels": torch.full((num_queries, 1), -10)}
    captured = {}
    hooks = [
        detector.model.detr_decoder.register_forward_hook(lambda m, i, o: captured.update(decoder=o)),
        detector.model.dot_product_scoring.register_forward_hook(lambda m, i, o: captured.update(scores=o)),
    ]
    with torch.no_grad():
        ours = detector(batch, with_masks=True)
        captured.clear()  # keep only what the reference forward computes
        # The reference: Sam3Model.forward on each pair, the image and prompt repeated per query.
        reference = detector.model(
            pixel_values=batch.pixel_values[batch.query_image],
            input_ids=batch.input_ids[batch.query_prompt],
            attention_mask=batch.attention_mask[batch.query_prompt],
            **boxes,
        )
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(ours["pred_logits"], reference.pred_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        ours["pred_boxes"], box_convert(reference.pred_boxes, "xyxy", "cxcywh"), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(ours["presence_logits"], reference.presence_logits.squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours["pred_masks"], reference.pred_masks, atol=1e-5, rtol=0)
    # The earlier layer: its boxes are the reference boxes layer 2 starts from; logits and presence as computed
    # inside the reference forward.
    (aux,) = ours["aux_outputs"]
    torch.testing.assert_close(aux["pred_boxes"], reference.decoder_reference_boxes[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(aux["pred_logits"], captured["scores"][0].squeeze(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(
        aux["presence_logits"], captured["decoder"].presence_logits[0].squeeze(-1), atol=1e-5, rtol=0
    )
    assert not torch.allclose(aux["pred_boxes"], ours["pred_boxes"])  # two different layers
    if geometry_token:  # the token changes the outputs: the comparison above is not the plain forward's
        plain = load_model("tiny", text_geometry_token=False)
        with torch.no_grad():
            assert not torch.allclose(plain(batch)["pred_logits"], ours["pred_logits"], atol=1e-3)


def test_output_shapes(detector: Sam3Detector) -> None:
    with torch.no_grad():
        outputs = detector(make_batch(), with_masks=True)
    q, n = 5, 16
    assert outputs["pred_logits"].shape == (q, n)
    assert outputs["pred_boxes"].shape == (q, n, 4)
    assert outputs["presence_logits"].shape == (q,)
    assert outputs["pred_masks"].shape == (q, n, 64, 64)  # 4x the 16 x 16 patch grid
    boxes = outputs["pred_boxes"]
    assert boxes.min() >= 0 and boxes.max() <= 1
    assert len(outputs["aux_outputs"]) == detector.config.detr_decoder_config.num_layers - 1 == 1
    for aux in outputs["aux_outputs"]:
        assert set(aux) == {"pred_logits", "pred_boxes", "presence_logits"}
        assert aux["pred_logits"].shape == (q, n) and aux["pred_boxes"].shape == (q, n, 4)
        assert aux["presence_logits"].shape == (q,)


def test_encoders_run_once_per_image_and_per_unique_prompt(detector: Sam3Detector) -> None:
    calls = {"vision": [], "text": [], "detr": []}
    hooks = [
        detector.model.vision_encoder.backbone.register_forward_hook(
            lambda m, i, o: calls["vision"].append(i[0].shape[0])
        ),
        detector.model.text_encoder.register_forward_hook(
            lambda m, i, o, **_: calls["text"].append(o.last_hidden_state.shape[0])
        ),
        detector.model.detr_encoder.register_forward_hook(
            lambda m, i, o: calls["detr"].append(o.last_hidden_state.shape[0])
        ),
    ]
    with torch.no_grad():
        outputs = detector(make_batch(), with_masks=False)
    for hook in hooks:
        hook.remove()
    assert calls == {"vision": [2], "text": [3], "detr": [5]}
    assert "pred_masks" not in outputs  # with_masks=False skips the mask decoder


def test_detection_computes_only_the_1x_fpn_level_with_the_same_outputs(detector: Sam3Detector) -> None:
    batch = make_batch()
    ran = []
    hooks = [
        layer.register_forward_hook(lambda m, i, o, k=k: ran.append(k))
        for k, layer in enumerate(detector.model.vision_encoder.neck.fpn_layers)
    ]
    with torch.no_grad():
        every = detector.encode_images(batch.pixel_values)
        assert ran == [0, 1, 2, 3]  # transformers' neck runs every level, the 0.5x one included
        ran.clear()
        last = detector.encode_images(batch.pixel_values, levels=1)
        assert ran == [2]
        ran.clear()
        two = detector.encode_images(batch.pixel_values, levels=2)
        assert ran == [1, 2]
        with_masks = detector(batch, with_masks=True)
        detection = detector(batch, with_masks=False)
    for hook in hooks:
        hook.remove()
    assert len(every.levels) == detector.num_levels == 3 and len(last.levels) == 1
    torch.testing.assert_close(last.levels[0], every.levels[-1], atol=0, rtol=0)
    torch.testing.assert_close(two.levels[0], every.levels[1], atol=0, rtol=0)
    torch.testing.assert_close(last.position, every.position, atol=0, rtol=0)
    for key in ("pred_logits", "pred_boxes", "presence_logits"):
        torch.testing.assert_close(detection[key], with_masks[key], atol=0, rtol=0)
    with pytest.raises(ConfigError, match="masks need all 3 FPN levels but the image features hold 1"):
        detector.decode(
            last,
            detector.encode_prompts(batch.input_ids, batch.attention_mask),
            batch.query_image,
            batch.query_prompt,
            with_masks=True,
        )
    with pytest.raises(ValueError, match="levels must be at least 1"):
        detector.encode_images(batch.pixel_values, levels=0)


@pytest.mark.parametrize("with_masks", [True, False])
def test_backward_gives_finite_grads_and_unused_list_is_exact(with_masks: bool) -> None:
    detector = load_model("tiny").train()
    outputs = detector(make_batch(), with_masks=with_masks)
    tensors = [v for k, v in outputs.items() if k != "aux_outputs"]
    tensors += [v for aux in outputs["aux_outputs"] for v in aux.values()]
    sum(t.sum() for t in tensors).backward()
    named = dict(detector.model.named_parameters())
    # none, or exactly zero: the geometry encoder's box parts run on an empty box list for the geometry token
    without_grad = {name for name, p in named.items() if p.grad is None or not p.grad.any()}
    assert all(torch.isfinite(p.grad).all() for name, p in named.items() if name not in without_grad)
    unused = parameters_without_text_gradients(detector, with_masks=with_masks)
    assert set(unused) == without_grad
    assert "text_encoder.text_projection.weight" in unused
    assert "vision_encoder.neck.fpn_layers.3.proj1.weight" in unused  # the 0.5x level
    assert "geometry_encoder.boxes_direct_project.weight" in unused
    # the geometry token (on by default) trains the encoder's CLS path: embedding, projection, layers
    for name in ("cls_embed.weight", "final_proj.weight", "layers.0.cross_attn.q_proj.weight"):
        assert f"geometry_encoder.{name}" not in unused and named[f"geometry_encoder.{name}"].grad.abs().sum() > 0
    without_token = parameters_without_text_gradients(detector, with_masks, text_geometry_token=False)
    assert {n for n in named if n.startswith("geometry_encoder.")} <= set(without_token)
    assert ("mask_decoder.mask_embedder.layers.0.weight" in unused) is (not with_masks)
    assert ("vision_encoder.neck.fpn_layers.0.proj1.weight" in unused) is (not with_masks)
    assert "vision_encoder.neck.fpn_layers.2.proj1.weight" not in unused  # the 1x level feeds the DETR parts
    assert parameters_without_text_gradients(detector.model, with_masks) == unused


def test_save_pretrained_then_load_gives_identical_outputs(detector: Sam3Detector, tmp_path) -> None:
    detector.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "model.safetensors").is_file()
    loaded = load_model(tmp_path)
    assert not loaded.training
    batch = make_batch()
    with torch.no_grad():
        expected, actual = detector(batch, with_masks=True), loaded(batch, with_masks=True)
    for (name, a), b in zip(detector.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # every weight bit-identical
    for key in ("pred_logits", "pred_boxes", "presence_logits", "pred_masks"):
        # Outputs agree to rounding: a freshly allocated copy of the weights may take another SIMD path (seen: 6e-8).
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)


def test_image_size_override(detector: Sam3Detector, tmp_path) -> None:
    detector.save_pretrained(tmp_path)
    # 280 px = 20 x 20 patches: not a whole number of 8 x 8 windows, so the windowed layer pads.
    large = load_model(tmp_path, image_size=280)
    assert large.config.image_size == 280
    assert large.config.vision_config.backbone_feature_sizes == [[80, 80], [40, 40], [20, 20]]
    with torch.no_grad():
        outputs = large(make_batch(image_size=280), with_masks=True)
    assert outputs["pred_masks"].shape == (5, 16, 80, 80)
    assert torch.isfinite(outputs["pred_logits"]).all() and torch.isfinite(outputs["pred_masks"]).all()
    with pytest.raises(ConfigError, match="built for 280 x 280"):
        large(make_batch(image_size=224))
    with pytest.raises(ConfigError, match="multiple of the patch size 14"):
        load_model("tiny", image_size=230)


def _one_line_naming(err: pytest.ExceptionInfo, name: str) -> None:
    message = str(err.value)
    assert "\n" not in message and name in message


def test_missing_files_raise_one_line_errors(detector: Sam3Detector, tmp_path) -> None:
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "nowhere")
    _one_line_naming(err, "nowhere")
    assert "'tiny', 'full'" in str(err.value)

    with pytest.raises(ModelLoadError) as err:
        load_model("small")
    _one_line_naming(err, "'tiny', 'full' or a model folder")

    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is not a folder"):
        load_model(a_file)

    complete = tmp_path / "complete"
    detector.save_pretrained(complete)

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes((complete / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError) as err:
        load_model(no_config)
    _one_line_naming(err, "no_config/config.json is missing")

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((complete / "config.json").read_text())
    with pytest.raises(ModelLoadError) as err:
        load_model(no_weights)
    _one_line_naming(err, "no_weights/model.safetensors is missing")

    not_sam3 = tmp_path / "not_sam3"
    not_sam3.mkdir()
    (not_sam3 / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(ModelLoadError) as err:
        load_model(not_sam3)
    _one_line_naming(err, "describes a 'clip' model, not SAM 3")

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((complete / "config.json").read_text())
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError) as err:
        load_model(sharded)
    _one_line_naming(err, "model-00001-of-00002.safetensors is missing")


def test_incomplete_weights_are_an_error_not_random_init(detector: Sam3Detector, tmp_path) -> None:
    detector.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["detr_decoder.box_head.layer1.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path)
    _one_line_naming(err, "lacks 1 weights of the SAM 3 detector (first: detr_decoder.box_head.layer1.weight)")


def test_loads_a_facebook_sam3_style_folder(detector: Sam3Detector, tmp_path) -> None:
    # facebook/sam3 ships the video model: a sam3_video config whose detector_config is the image detector, and
    # weights prefixed "detector_model." next to "tracker_model." ones.
    Sam3VideoConfig(detector_config=detector.config.to_dict()).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "sam3_video"
    weights = {f"detector_model.{k}": v.contiguous() for k, v in detector.model.state_dict().items()}
    weights["tracker_model.some_layer.weight"] = torch.zeros(2)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_model(tmp_path)
    assert isinstance(loaded.model, Sam3Model) and loaded.config.detr_decoder_config.num_queries == 16
    for (name, a), b in zip(detector.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bf16_checkpoint_loads_as_float32(detector: Sam3Detector, tmp_path) -> None:
    detector.save_pretrained(tmp_path)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(tmp_path / "model.safetensors").items()}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # as a bf16 export says
    loaded = load_model(tmp_path)
    params = dict(loaded.model.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.float32}
    name = "detr_decoder.query_embed.weight"
    assert torch.equal(params[name], weights[name].float())


def test_export_refuses_non_finite_weights_and_replaces_whole(detector: Sam3Detector, tmp_path) -> None:
    """A model with a NaN weight is not exported (the previous export stays, untouched); a good export replaces the
    folder whole, leaving no partial or old folder beside it."""
    target = tmp_path / "model"
    target.mkdir()
    (target / "stale.txt").write_text("from an earlier export")
    detector.save_pretrained(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    before = (target / "model.safetensors").read_bytes()

    broken = load_model(target)
    name, weight = next(iter(broken.model.named_parameters()))
    with torch.no_grad():
        weight.view(-1)[3] = float("nan")
    with pytest.raises(ExportError) as err:
        broken.save_pretrained(target)
    message = str(err.value)
    assert "\n" not in message and name in message and "1 weight tensor(s)" in message
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
