"""The retention regulariser (train.retain): fine-tune on the user's categories without forgetting the rest.

Each step, K phrases the data does not teach (train.retain_prompts of them, drawn from `TrainJob.retain_phrases`: the
phrase bank without the training categories) are asked of every image of the batch, by the model being trained (the
student) and by the model training started from (the teacher, without gradients). The student is held to the
teacher's answers on those R = B x K (image, phrase) pairs:

    KL(t || s) = sum over the R presence logits and the R x N query logits of
                 sigmoid(t) (log sigmoid(t) - log sigmoid(s)) + sigmoid(-t) (log sigmoid(-t) - log sigmoid(-s))
    loss_retain = mean over the R pairs of KL(presence) + mean over the R x N queries of KL(logit)

(Bernoulli KL divergences: 0 when the student's probabilities equal the teacher's, with the gradient of the binary
cross-entropy against the teacher's probabilities). Added to the detection loss times loss.retain_weight; logged
as loss_retain.

How (`RetainedDetector`, around the detector for the training forward only): the phrases join the batch's prompts,
so the student answers them in the same forward (the images are encoded once); the criterion (`RetainCriterion`)
scores the batch's own queries as before and the retention queries with the KL. The teacher:
    with an adapter (sam3.adapters)  the same network with the adapter switched off (peft's disable_adapter): no
                                     second copy in memory; the weights trained in full (train.freeze) are the
                                     current ones, so the regulariser covers what the adapter changes
    without one (full fine-tuning)   a frozen copy of the starting model, loaded once (the model's size again in
                                     memory: 3.4 GB fp32 for SAM 3)
run in eval mode (no dropout, no one-to-many queries), costing one forward without gradients per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from sam3.adapters import adapter_disabled, detector_peft
from sam3.batch import PromptBatch
from sam3.errors import ConfigError
from sam3.tokenizer import attention_mask, clean_text, tokenize

RETAIN_KEY = "retain"  # the outputs entry holding the student's and the teacher's retention logits


def bernoulli_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Element-wise KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))), from logits (numerically stable):
    BCE(s, p_t) - BCE(t, p_t), p_t = sigmoid(t). Same shape as the inputs."""
    target = teacher_logits.sigmoid()
    student = F.binary_cross_entropy_with_logits(student_logits, target, reduction="none")
    entropy = F.binary_cross_entropy_with_logits(teacher_logits, target, reduction="none")
    return student - entropy


def retention_loss(
    student_logits: torch.Tensor,
    student_presence: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_presence: torch.Tensor,
) -> torch.Tensor:
    """mean_r KL(presence_r) + mean_{r,n} KL(logit_{r,n}) (module docstring). Logits [R, N], presence [R]."""
    presence = bernoulli_kl(student_presence.float(), teacher_presence.float()).mean()
    queries = bernoulli_kl(student_logits.float(), teacher_logits.float()).mean()
    return presence + queries


class RetainedDetector(nn.Module):
    """The detector with K retention phrases added to every training batch (module docstring).

    forward(batch, with_masks) -> the detector's outputs for the batch's own Q queries (the criterion's input, as
    without the regulariser) plus outputs[RETAIN_KEY] = {"student_logits" [R, N], "student_presence" [R],
    "teacher_logits" [R, N], "teacher_presence" [R]} for the R = B x K retention pairs.

    The phrases are drawn with torch's global generator, which the trainer seeds per step, so a resumed run draws
    the same ones. A phrase equal to one of the batch's own prompts is never drawn.
    """

    def __init__(
        self, detector: nn.Module, phrases: Sequence[str], per_step: int, reference: nn.Module | None = None
    ) -> None:
        super().__init__()
        if not phrases:
            raise ConfigError("train.retain needs retention phrases: the phrase bank without the training categories")
        if reference is None and detector_peft(detector) is None:
            raise ValueError("train.retain without an adapter needs a frozen copy of the starting model (reference)")
        self.detector = detector
        self.per_step = min(per_step, len(phrases))
        self.phrases = [clean_text(p) for p in phrases]
        self.input_ids = tokenize(self.phrases)  # [P, L], once
        # not a registered sub-module: its weights are not the student's (DDP, optimiser, checkpoints never see them)
        self.__dict__["reference"] = reference

    def draw(self, taken: Sequence[str]) -> torch.Tensor:
        """Indices of `per_step` phrases, none equal to a prompt in `taken`."""
        excluded = {clean_text(p) for p in taken}
        order = torch.randperm(len(self.phrases))
        chosen = [int(i) for i in order[: self.per_step + len(excluded)] if self.phrases[int(i)] not in excluded]
        return torch.tensor(chosen[: self.per_step], dtype=torch.long)

    def forward(self, batch: PromptBatch, with_masks: bool = False) -> dict:
        chosen = self.draw(batch.prompts)
        extended, retained = extend_batch(batch, self.input_ids[chosen])
        outputs = self.detector(extended, with_masks=with_masks)
        own, student = split_outputs(outputs, batch.num_queries)
        with torch.no_grad(), self._teacher() as teacher:
            taught = teacher(retained, with_masks=False)
        own[RETAIN_KEY] = {
            "student_logits": student["pred_logits"],
            "student_presence": student["presence_logits"],
            "teacher_logits": taught["pred_logits"].detach(),
            "teacher_presence": taught["presence_logits"].detach(),
        }
        return own

    @contextlib.contextmanager
    def _teacher(self):
        """The starting model in eval mode: the frozen copy, or this network with its adapter switched off."""
        reference = self.__dict__["reference"]
        if reference is not None:
            yield reference
            return
        was_training = self.detector.training
        self.detector.eval()
        try:
            with adapter_disabled(self.detector):
                yield self.detector
        finally:
            self.detector.train(was_training)


def extend_batch(batch: PromptBatch, retain_ids: torch.Tensor) -> tuple[PromptBatch, PromptBatch]:
    """(the batch with K more prompts asked of every image, appended after its own Q queries; a batch of those
    B x K retention queries alone). Query order of both: image-major, phrase-minor."""
    device = batch.input_ids.device
    retain_ids = retain_ids.to(device)
    retain_mask = attention_mask(retain_ids).to(batch.attention_mask.dtype)
    num_images, k = batch.pixel_values.shape[0], retain_ids.shape[0]
    image = torch.arange(num_images, device=device).repeat_interleave(k)  # [B K]
    phrase = torch.arange(k, device=device).repeat(num_images)  # [B K]
    first = batch.input_ids.shape[0]
    extended = replace(
        batch,
        input_ids=torch.cat([batch.input_ids, retain_ids]),
        attention_mask=torch.cat([batch.attention_mask, retain_mask]),
        query_image=torch.cat([batch.query_image, image.to(batch.query_image.dtype)]),
        query_prompt=torch.cat([batch.query_prompt, (phrase + first).to(batch.query_prompt.dtype)]),
    )
    retained = replace(
        batch,
        input_ids=retain_ids,
        attention_mask=retain_mask,
        query_image=image.to(batch.query_image.dtype),
        query_prompt=phrase.to(batch.query_prompt.dtype),
        targets=[],
    )
    return extended, retained


def split_outputs(outputs: dict, num_queries: int) -> tuple[dict, dict]:
    """(the first `num_queries` rows of every output tensor, aux layers included; the rest of the final layer's)."""

    def head(value):
        if isinstance(value, torch.Tensor):
            return value[:num_queries]
        if isinstance(value, list):
            return [head(v) for v in value]
        if isinstance(value, dict):
            return {k: head(v) for k, v in value.items()}
        return value

    own = head(outputs)
    rest = {key: outputs[key][num_queries:] for key in ("pred_logits", "presence_logits")}
    return own, rest


class RetainCriterion:
    """The detection criterion on the batch's own queries plus weight x loss_retain (module docstring)."""

    def __init__(self, criterion, weight: float) -> None:
        self.criterion, self.weight = criterion, weight

    def __call__(self, outputs: dict, targets, num_boxes=None, num_queries=None) -> dict[str, torch.Tensor]:
        retained = outputs.pop(RETAIN_KEY, None)
        losses = self.criterion(outputs, targets, num_boxes=num_boxes, num_queries=num_queries)
        if retained is not None:
            term = retention_loss(**retained)
            losses["loss_retain"] = term
            losses["loss"] = losses["loss"] + self.weight * term
        return losses

    def __getattr__(self, name: str):  # the wrapped criterion's settings (with_masks, config, ...)
        return getattr(self.criterion, name)
