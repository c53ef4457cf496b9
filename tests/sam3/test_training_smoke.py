"""End to end through the real pieces: demo/shapes data -> collate -> tiny Sam3 -> criterion -> backward/step."""

import pytest
import torch

from sam3.config import LossConfig
from sam3.data import CocoPromptDataset, collate_prompts
from sam3.engine import train_step
from sam3.losses import Criterion
from sam3.model import load_model
from tests.datasets import build_demo_dataset, build_shapes_dataset


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    build_demo_dataset(out)
    return out


@pytest.mark.parametrize("with_masks", [False, True], ids=["detection", "segmentation"])
def test_demo_batch_forward_backward_is_finite(demo_dir, with_masks):
    model = load_model("tiny")
    model.train()
    dataset = CocoPromptDataset(demo_dir, "train", image_size=224, train=True, with_masks=with_masks)
    batch = collate_prompts([dataset[0], dataset[len(dataset) - 1]])
    assert batch.num_queries == 2 * len(dataset.categories)  # one query per category and image
    outputs = model(batch, with_masks=with_masks)
    losses = Criterion(with_masks=with_masks)(outputs, batch.targets)
    assert torch.isfinite(losses["loss"]) and losses["loss"] > 0
    assert ("loss_mask" in losses) == with_masks and ("loss_dice" in losses) == with_masks
    losses["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_fifty_steps_on_four_shapes_images_halve_the_loss(tmp_path):
    # 112 px (a multiple of the patch size 14) keeps the 50 steps fast on 2 cores
    build_shapes_dataset(tmp_path, n=4, seed=0, image_size=112, n_valid=4, n_test=4)
    torch.manual_seed(0)
    model = load_model("tiny", image_size=112)
    model.train()
    # the validation transform: the same 4 fixed images every step
    dataset = CocoPromptDataset(tmp_path, "train", image_size=112, train=False)
    batch = collate_prompts([dataset[i] for i in range(4)])
    criterion = Criterion(LossConfig(class_loss="focal"))  # from scratch (docs/RECIPE.md section 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses = []
    for _ in range(50):
        result = train_step(model, criterion, optimizer, [batch], device=torch.device("cpu"), grad_clip=1.0)
        assert result.finite
        losses.append(float(result.loss))
    assert losses[-1] <= 0.5 * losses[0], losses
