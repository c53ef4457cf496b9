"""Activation checkpointing: same loss and gradients, the blocks really recompute, frozen blocks are left alone."""

from __future__ import annotations

import pytest
import torch
from transformers import Sam3Model

from sam3.data import CocoPromptDataset, collate_prompts
from sam3.freeze import apply_freeze
from sam3.losses import Criterion
from sam3.memory import checkpointable_blocks, disable_activation_checkpointing, enable_activation_checkpointing
from sam3.model import Sam3Detector
from tests.training_runs import IMAGE_SIZE, build_small_shapes, dropout_free_tiny_config


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    out = build_small_shapes(tmp_path_factory.mktemp("shapes"), n=2)
    dataset = CocoPromptDataset(out, "train", image_size=IMAGE_SIZE, train=False)
    return collate_prompts([dataset[0], dataset[1]])


def _detector(one_to_many: bool = False) -> Sam3Detector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Sam3Detector(Sam3Model(dropout_free_tiny_config()), one_to_many=one_to_many).train()


def _loss_and_grads(detector: Sam3Detector, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    detector.model.zero_grad(set_to_none=True)
    outputs = detector(batch)
    losses = Criterion()(outputs, batch.targets)
    losses["loss"].backward()
    grads = {n: p.grad.clone() for n, p in detector.model.named_parameters() if p.grad is not None}
    return losses["loss"].detach(), grads


def _count_block_forwards(detector: Sam3Detector) -> tuple[dict[str, int], list]:
    """Attach hooks counting forward calls of every checkpointable block, per tower.

    The hook sits on each block's first sub-module: the recompute calls the block's `forward` directly (transformers
    keeps the block's own hooks outside the checkpoint), but its sub-modules are called normally both times.
    """
    calls: dict[str, int] = {}
    handles = []
    for tower, blocks in checkpointable_blocks(detector.model).items():
        calls[tower] = 0

        def hook(*_, tower=tower):
            calls[tower] += 1

        handles += [next(iter(block.children())).register_forward_hook(hook) for block in blocks]
    return calls, handles


@pytest.mark.parametrize("one_to_many", [False, True], ids=["plain", "dac"])
def test_checkpointing_gives_the_same_loss_and_gradients(batch, one_to_many):
    plain = _detector(one_to_many)
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    checkpointed = _detector(one_to_many)
    report = enable_activation_checkpointing(checkpointed.model)
    # the tiny config: 2 ViT blocks, 1 text block, 1 DETR encoder layer, 2 decoder layers, all trainable
    assert report.checkpointed == {"vision_encoder": 2, "text_encoder": 1, "detr_encoder": 1, "detr_decoder": 2}
    loss_ckpt, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert torch.allclose(loss_plain, loss_ckpt, rtol=0, atol=1e-6)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("one_to_many", [False, True], ids=["plain", "dac"])
def test_checkpointed_blocks_run_again_in_the_backward(batch, one_to_many):
    detector = _detector(one_to_many)
    calls, handles = _count_block_forwards(detector)
    _loss_and_grads(detector, batch)
    # one forward per block: 2 ViT blocks x 2 images batched together = 2 calls; 1 text block once; the DETR
    # layers once per pass over all (image, prompt) pairs: 1 encoder layer, 2 decoder layers
    once = {"vision_encoder": 2, "text_encoder": 1, "detr_encoder": 1, "detr_decoder": 2}
    assert calls == once
    enable_activation_checkpointing(detector.model)
    calls.update({k: 0 for k in calls})
    _loss_and_grads(detector, batch)
    assert calls == {k: 2 * n for k, n in once.items()}  # the backward recomputes each block once
    disable_activation_checkpointing(detector.model)
    calls.update({k: 0 for k in calls})
    _loss_and_grads(detector, batch)
    assert calls == once
    for handle in handles:
        handle.remove()


def test_frozen_blocks_are_not_checkpointed():
    detector = _detector()
    apply_freeze(detector.model, "vision")
    report = enable_activation_checkpointing(detector.model)
    assert report.checkpointed == {"vision_encoder": 0, "text_encoder": 1, "detr_encoder": 1, "detr_decoder": 2}
    assert report.frozen == {"vision_encoder": 2, "text_encoder": 0, "detr_encoder": 0, "detr_decoder": 0}
    assert "frozen, not checkpointed: vision_encoder 2" in report.summary()
    assert not any(block.gradient_checkpointing for block in checkpointable_blocks(detector.model)["vision_encoder"])


def test_compiled_vit_blocks_give_the_same_loss_and_keep_state_dict_keys(batch):
    from sam3.compiling import compile_vit_blocks

    plain = _detector()
    loss_plain, grads_plain = _loss_and_grads(plain, batch)
    compiled = _detector()
    keys = list(compiled.model.state_dict())
    # aot_eager traces forward and backward graphs as inductor would, without needing a C++ compiler
    assert compile_vit_blocks(compiled.model, backend="aot_eager") == 2
    loss_compiled, grads_compiled = _loss_and_grads(compiled, batch)
    assert list(compiled.model.state_dict()) == keys
    assert torch.allclose(loss_plain, loss_compiled, rtol=0, atol=1e-5)
    for name, grad in grads_plain.items():
        assert torch.allclose(grad, grads_compiled[name], rtol=1e-4, atol=1e-6), name


def test_the_decoder_box_bias_is_recomputed_inside_the_checkpoint_not_kept(batch, monkeypatch):
    """With the decoder checkpointed, the box bias of each layer is computed inside the layer's checkpoint: once in
    the forward and once more in the backward's recompute (it is not kept between them), with the same gradients."""
    from transformers.models.sam3.modeling_sam3 import Sam3DetrDecoder

    real = Sam3DetrDecoder._get_rpb_matrix
    calls = []

    def counting(self, *args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Sam3DetrDecoder, "_get_rpb_matrix", counting)
    plain = _detector(one_to_many=True)
    _, grads_plain = _loss_and_grads(plain, batch)
    assert len(calls) == 2  # one per decoder layer
    checkpointed = _detector(one_to_many=True)
    enable_activation_checkpointing(checkpointed.model)
    calls.clear()
    _, grads_ckpt = _loss_and_grads(checkpointed, batch)
    assert len(calls) == 4  # forward + recompute per layer
    bias_mlp = [name for name in grads_plain if "box_rpb_embed" in name]
    assert bias_mlp  # the bias MLP trains, through the recompute
    for name in bias_mlp:
        assert torch.allclose(grads_plain[name], grads_ckpt[name], rtol=1e-5, atol=1e-7), name
    disable_activation_checkpointing(checkpointed.model)
    assert "_get_rpb_matrix" not in checkpointed.model.detr_decoder.__dict__
