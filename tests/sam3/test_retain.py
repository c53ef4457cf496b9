"""The retention regulariser (sam3.retain): its loss by hand, the batch it builds, and training with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import sam3.trainer as trainer
from sam3.adapters import attach_adapter, is_adapter_parameter
from sam3.config import AdapterConfig, LossConfig
from sam3.data.collate import collate_prompts
from sam3.data.dataset import CocoPromptDataset
from sam3.errors import ConfigError
from sam3.model import load_model
from sam3.retain import (
    RETAIN_KEY,
    RetainCriterion,
    RetainedDetector,
    bernoulli_kl,
    extend_batch,
    retention_loss,
    split_outputs,
)
from sam3.tokenizer import tokenize
from tests.training_runs import IMAGE_SIZE, build_small_shapes, make_job, save_dropout_free_tiny

PHRASES = ["giraffe", "bicycle", "teapot", "violin", "lighthouse"]


def test_bernoulli_kl_by_hand():
    # teacher p = 0.5 (logit 0), student p = 0.75 (logit ln 3):
    # KL = 0.5 ln(0.5 / 0.75) + 0.5 ln(0.5 / 0.25) = 0.5 ln(4 / 3) = 0.1438410
    kl = bernoulli_kl(torch.tensor([math.log(3.0)]), torch.tensor([0.0]))
    assert float(kl) == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # equal logits: 0, whatever they are
    same = torch.tensor([-7.0, 0.3, 12.0])
    assert torch.allclose(bernoulli_kl(same, same), torch.zeros(3), atol=1e-6)
    # teacher p = 0.9 (logit ln 9), student p = 0.5: 0.9 ln(1.8) + 0.1 ln(0.2) = 0.368064
    kl = bernoulli_kl(torch.tensor([0.0]), torch.tensor([math.log(9.0)]))
    assert float(kl) == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2), abs=1e-6)


def test_retention_loss_is_the_mean_presence_kl_plus_the_mean_query_kl():
    ln3, ln9 = math.log(3.0), math.log(9.0)
    a = 0.5 * math.log(4 / 3)  # student ln 3 vs teacher 0 (above)
    b = 0.9 * math.log(1.8) + 0.1 * math.log(0.2)  # student 0 vs teacher ln 9
    student_logits = torch.tensor([[ln3, 0.0], [0.0, 0.0]])
    teacher_logits = torch.tensor([[0.0, 0.0], [ln9, 0.0]])  # query KLs: a, 0, b, 0 -> mean (a + b) / 4
    student_presence = torch.tensor([0.0, ln3])
    teacher_presence = torch.tensor([0.0, 0.0])  # presence KLs: 0, a -> mean a / 2
    loss = retention_loss(student_logits, student_presence, teacher_logits, teacher_presence)
    assert float(loss) == pytest.approx(a / 2 + (a + b) / 4, abs=1e-6)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return build_small_shapes(tmp_path_factory.mktemp("shapes"))


def _batch(shapes: Path, n: int = 2):
    dataset = CocoPromptDataset(shapes, "train", image_size=IMAGE_SIZE, train=False)
    return collate_prompts([dataset[i] for i in range(n)])


def test_the_retention_queries_follow_the_batch_queries_image_major(shapes):
    batch = _batch(shapes)
    ids = tokenize(PHRASES[:3])
    extended, retained = extend_batch(batch, ids)
    q, p, k = batch.num_queries, batch.input_ids.shape[0], 3
    assert extended.num_queries == q + 2 * k
    assert torch.equal(extended.query_image[:q], batch.query_image)
    assert extended.query_image[q:].tolist() == [0, 0, 0, 1, 1, 1]
    assert extended.query_prompt[q:].tolist() == [p, p + 1, p + 2] * 2
    assert torch.equal(extended.input_ids[p:], ids)
    assert retained.query_prompt.tolist() == [0, 1, 2, 0, 1, 2] and retained.targets == []

    outputs = {
        "pred_logits": torch.arange(q + 6.0)[:, None].expand(-1, 4),
        "presence_logits": torch.arange(q + 6.0),
        "aux_outputs": [{"pred_logits": torch.arange(q + 6.0)[:, None]}],
    }
    own, rest = split_outputs(outputs, q)
    assert own["pred_logits"].shape == (q, 4) and own["aux_outputs"][0]["pred_logits"].shape == (q, 1)
    assert rest["presence_logits"].tolist() == [float(i) for i in range(q, q + 6)]


def test_draws_skip_the_batch_prompts_and_repeat_under_the_same_seed():
    detector = load_model("tiny", image_size=IMAGE_SIZE)
    attach_adapter(detector, AdapterConfig(kind="lora", rank=2, parts=["detr_decoder"]))
    retained = RetainedDetector(detector, PHRASES, per_step=4)
    torch.manual_seed(3)
    first = retained.draw(["Giraffe", "teapot"]).tolist()
    assert len(first) == 3  # 5 phrases, 2 taken by the batch: 3 left for 4 asked
    assert {PHRASES[i] for i in first} == {"bicycle", "violin", "lighthouse"}
    torch.manual_seed(3)
    assert retained.draw(["Giraffe", "teapot"]).tolist() == first
    with pytest.raises(ConfigError, match="train.retain needs retention phrases"):
        RetainedDetector(detector, [], per_step=4)


def test_with_a_fresh_adapter_the_student_is_the_teacher_and_only_the_adapter_learns(shapes, tmp_path):
    source = save_dropout_free_tiny(tmp_path / "tiny")  # no dropout: train mode computes what eval mode does
    detector = load_model(source, image_size=IMAGE_SIZE).train()
    torch.manual_seed(0)  # peft's A matrices and the B matrices drawn below: the same model on every run
    attach_adapter(detector, AdapterConfig(kind="lora", rank=2, parts=["detr_encoder", "detr_decoder"]))
    for name, param in detector.model.named_parameters():
        param.requires_grad_(is_adapter_parameter(name))
    retained = RetainedDetector(detector, PHRASES, per_step=3)
    batch = _batch(shapes)
    torch.manual_seed(0)
    outputs = retained(batch)
    assert outputs["pred_logits"].shape[0] == batch.num_queries  # the batch's own queries, as without retain
    logits = outputs[RETAIN_KEY]
    assert logits["student_logits"].shape == logits["teacher_logits"].shape == (2 * 3, 16)
    assert detector.training  # the teacher ran in eval mode and the detector is back in train mode
    loss = retention_loss(**logits)
    assert float(loss) < 1e-5  # B = 0: the adapter adds nothing yet
    with torch.no_grad():
        for name, param in detector.model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    torch.manual_seed(0)
    loss = retention_loss(**retained(batch)[RETAIN_KEY])
    assert float(loss) > 1e-3
    loss.backward()
    grads = [n for n, p in detector.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert grads and all(is_adapter_parameter(n) for n in grads)


class _Fixed:
    def __call__(self, outputs, targets, num_boxes=None, num_queries=None):
        assert RETAIN_KEY not in outputs  # the detection criterion never sees the retention entry
        return {"loss": torch.tensor(2.0), "loss_ce": torch.tensor(2.0)}


def test_the_criterion_adds_the_weighted_term_and_logs_it():
    retained = {
        "student_logits": torch.tensor([[math.log(3.0)]]),
        "student_presence": torch.tensor([0.0]),
        "teacher_logits": torch.tensor([[0.0]]),
        "teacher_presence": torch.tensor([0.0]),
    }
    losses = RetainCriterion(_Fixed(), weight=4.0)({"pred_logits": None, RETAIN_KEY: retained}, [])
    kl = 0.5 * math.log(4 / 3)
    assert float(losses["loss_retain"]) == pytest.approx(kl, abs=1e-6)
    assert float(losses["loss"]) == pytest.approx(2.0 + 4.0 * kl, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("adapter", ["lora", "none"])
def test_training_with_retain_logs_the_term_and_exports(adapter, shapes, tmp_path):
    job = make_job(
        tmp_path,
        shapes,
        max_steps=2,
        freeze="heads" if adapter == "lora" else "none",
        retain=True,
        retain_prompts=3,
        loss=LossConfig(retain_weight=2.0),
        adapter=AdapterConfig(kind=adapter, rank=2, parts=["detr_encoder"]),
    )
    job.retain_phrases = PHRASES
    trainer.train(job)
    records = [json.loads(line) for line in (tmp_path / "train_stats.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss_retain"]) and r["loss_retain"] >= 0 for r in steps)
    assert (tmp_path / "model" / "model.safetensors").is_file()
