"""The recipe's forward over transformers' modules (sam3.decoder_pass, Sam3Detector): the one-to-many (DAC) queries,
unclamped presence logits, the geometry token of text prompts, and the score clamp the reference keeps."""

import json

import pytest
import torch
import torch.nn.functional as F

from sam3.losses import presence_loss
from sam3.model import Sam3Detector, load_model
from tests.sam3.test_model import QUERY_IMAGE, make_batch

N = 16  # the tiny model's decoder queries


def without_dropout(detector: Sam3Detector) -> Sam3Detector:
    """Training mode with every dropout at 0: the o2o half must then equal the plain decoder exactly."""
    for module in detector.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return detector.train()


def test_one_to_many_o2o_half_is_bitwise_the_plain_decoder() -> None:
    detector = without_dropout(load_model("tiny"))
    batch = make_batch()
    plain = detector(batch, with_masks=True)
    detector.one_to_many = True
    dac = detector(batch, with_masks=True)
    for key in ("pred_logits", "pred_boxes", "presence_logits", "pred_masks"):
        assert torch.equal(dac[key], plain[key]), key
    for ours, reference in zip(dac["aux_outputs"], plain["aux_outputs"], strict=True):
        for key in ("pred_logits", "pred_boxes", "presence_logits"):
            assert torch.equal(ours[key], reference[key]), key
    # the o2m half: the same shapes, per layer, masks on the final layer only, no presence of its own
    q = len(QUERY_IMAGE)
    assert dac["pred_logits_o2m"].shape == (q, N) and dac["pred_boxes_o2m"].shape == (q, N, 4)
    assert dac["pred_masks_o2m"].shape == dac["pred_masks"].shape
    (aux,) = dac["aux_outputs"]
    assert set(aux) == {"pred_logits", "pred_boxes", "presence_logits", "pred_logits_o2m", "pred_boxes_o2m"}
    assert "presence_logits_o2m" not in dac
    # and it is not a copy of the o2o half: it skipped self-attention
    assert not torch.allclose(dac["pred_logits_o2m"], dac["pred_logits"], atol=1e-3)


def test_o2m_queries_skip_self_attention_and_never_see_the_o2o_half() -> None:
    """Query i's o2m output depends on query embedding i alone: changing embedding j != i changes o2o output i (through
    self-attention) but leaves o2m output i exactly as it was."""
    detector = without_dropout(load_model("tiny", one_to_many=True))
    batch = make_batch()
    with torch.no_grad():
        before = detector(batch)
        detector.model.detr_decoder.query_embed.weight[5] += 1.0
        after = detector(batch)
    others = [i for i in range(N) if i != 5]
    assert torch.equal(after["pred_logits_o2m"][:, others], before["pred_logits_o2m"][:, others])
    assert torch.equal(after["pred_boxes_o2m"][:, others], before["pred_boxes_o2m"][:, others])
    assert not torch.equal(after["pred_logits_o2m"][:, 5], before["pred_logits_o2m"][:, 5])
    assert not torch.allclose(after["pred_logits"][:, others], before["pred_logits"][:, others])


def test_o2m_outputs_train_the_shared_query_embeddings_and_are_off_in_eval() -> None:
    detector = load_model("tiny", one_to_many=True).train()
    outputs = detector(make_batch())
    outputs["pred_boxes_o2m"].sum().backward()  # the o2m half alone
    decoder = detector.model.detr_decoder
    assert decoder.query_embed.weight.grad.abs().sum() > 0
    assert decoder.reference_points.weight.grad.abs().sum() > 0
    assert decoder.query_embed.weight.shape == (N, 64)  # no new weights: the same N embeddings
    detector.eval()
    with torch.no_grad():
        evaluated = detector(make_batch())
    assert not any(key.endswith("_o2m") for key in evaluated)
    assert not any(key.endswith("_o2m") for aux in evaluated["aux_outputs"] for key in aux)


def test_presence_logits_are_not_clamped_and_keep_their_gradient() -> None:
    """transformers clamps the presence logit to +-10; Meta's clamp is discarded. At logit 12 on an absent prompt the
    presence loss (0.5 * BCE) is 6 and its gradient 0.5 * sigmoid(12) = 0.49999693, not 0."""
    detector = load_model("tiny").train()
    head = detector.model.detr_decoder.presence_head.layer3  # last linear layer of the presence MLP
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(12.0)
    outputs = detector(make_batch())
    presence = outputs["presence_logits"]
    torch.testing.assert_close(presence, torch.full_like(presence, 12.0))
    for aux in outputs["aux_outputs"]:
        torch.testing.assert_close(aux["presence_logits"], torch.full_like(presence, 12.0))
    absent = torch.zeros(len(presence), dtype=torch.bool)
    loss = presence_loss(presence, absent, num_queries=len(presence))
    torch.testing.assert_close(loss, torch.tensor(0.5 * F.softplus(torch.tensor(12.0)).item()))
    loss.backward()
    expected = 0.5 * torch.sigmoid(torch.tensor(12.0)).item()  # d/dx 0.5 softplus(x) / Q, summed over Q prompts
    torch.testing.assert_close(head.bias.grad, torch.tensor([expected]), rtol=1e-5, atol=0)


def test_the_score_clamp_at_12_is_the_references_and_stays() -> None:
    """The other clamp on a trained output: the dot-product scorer's +-12 on the score logits. Meta's scorer clamps in
    place (`clamp_`), so its logits and gradients are clamped too; ours matches it, dead zone included (documented in
    docs/RECIPE.md section 3): at logit 13 the gradient is 0, at 11 it is not."""
    scorer = load_model("tiny").model.dot_product_scoring
    assert scorer.clamp_logits and scorer.clamp_max_val == 12.0
    hidden = torch.randn(1, 1, 2, 64)
    text = torch.randn(1, 3, 64)
    scale = torch.nn.Parameter(torch.tensor(1.0))
    # logits proportional to `scale`: pick it so the raw logit is 13, then 11
    raw = scorer(decoder_hidden_states=hidden, text_features=text, text_mask=None).detach()
    for target, has_gradient in ((13.0, False), (11.0, True)):
        k = target / raw[0, 0, 0, 0].item()
        scale.grad = None
        out = scorer(decoder_hidden_states=hidden * k * scale, text_features=text, text_mask=None)
        out[0, 0, 0, 0].backward()
        assert bool(scale.grad.abs() > 0) is has_gradient


@pytest.mark.parametrize("token", [True, False])
def test_geometry_token_adds_one_prompt_token(token: bool) -> None:
    detector = load_model("tiny", text_geometry_token=token)
    batch = make_batch()
    seen = {}
    hook = detector.model.detr_encoder.register_forward_hook(
        lambda m, args, kwargs, out: seen.update(tokens=kwargs["text_features"].shape[1]), with_kwargs=True
    )
    with torch.no_grad():
        detector(batch)
    hook.remove()
    assert seen["tokens"] == batch.input_ids.shape[1] + (1 if token else 0)


def test_geometry_token_setting_travels_with_the_exported_folder(tmp_path) -> None:
    detector = load_model("tiny", text_geometry_token=False)
    detector.save_pretrained(tmp_path / "off")
    assert load_model(tmp_path / "off").text_geometry_token is False
    load_model("tiny").save_pretrained(tmp_path / "on")
    assert load_model(tmp_path / "on").text_geometry_token is True
    # a folder that does not say (a facebook/sam3 download): Meta's behaviour, the token on
    config = tmp_path / "on" / "config.json"
    raw = json.loads(config.read_text())
    del raw["text_geometry_token"]
    config.write_text(json.dumps(raw))
    assert load_model(tmp_path / "on").text_geometry_token is True
    assert load_model(tmp_path / "on", text_geometry_token=False).text_geometry_token is False


def test_geometry_token_runs_under_bf16_autocast_and_trains() -> None:
    """The trainer's bf16 autocast (here the CPU's, as bench.speed --amp bf16 runs it): the geometry encoder's box path
    would cast bf16 features to fp16 inside autocast and fail; the token is computed in fp32 outside it."""
    detector = load_model("tiny", one_to_many=True).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        outputs = detector(make_batch(), with_masks=True)
    assert outputs["pred_logits"].dtype == torch.bfloat16  # the rest of the forward did run under autocast
    (outputs["pred_logits"].float().sum() + outputs["pred_logits_o2m"].float().sum()).backward()
    assert detector.model.geometry_encoder.cls_embed.weight.grad.abs().sum() > 0
