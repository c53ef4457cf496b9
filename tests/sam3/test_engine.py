"""The engine step (`sam3.engine.train_step`) on the real tiny SAM 3, real shapes batches and the real criterion.

- Gradient accumulation: batch 4 x 1 micro-batch and batch 2 x 2 micro-batches give the same loss values and the
  same weights after 3 AdamW steps, because every micro-batch is normalised by the counts of the whole step. A
  control normalising each micro-batch by its own counts (the naive loop) drifts away.
- A non-finite loss steps nothing: weights, gradients and optimiser state stay as they were.
- Under DDP a non-finite loss on ONE rank skips the step on EVERY rank (else the other ranks would wait forever in
  the gradient all-reduce of a backward the bad rank never runs).
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port
from transformers import Sam3Model

from sam3.config import LossConfig
from sam3.data import CocoPromptDataset, collate_prompts
from sam3.engine import train_step
from sam3.freeze import apply_freeze
from sam3.losses import Criterion
from sam3.model import Sam3Detector, parameters_without_text_gradients
from sam3.optim import build_optimizer
from tests.training_runs import IMAGE_SIZE, TEST_OPTIM, NanOnCall, build_small_shapes, dropout_free_tiny_config
from tests.weights import assert_same_weights

CPU = torch.device("cpu")
STEPS = 3


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """Four fixed samples (the deterministic validation warp), so every run sees the same pixels."""
    out = build_small_shapes(tmp_path_factory.mktemp("shapes"), n=4)
    dataset = CocoPromptDataset(out, "train", image_size=IMAGE_SIZE, train=False)
    return [dataset[i] for i in range(4)]


def _fresh_model() -> Sam3Detector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        detector = Sam3Detector(Sam3Model(dropout_free_tiny_config()))
    return detector.train()


def _optimizer(detector: Sam3Detector) -> torch.optim.Optimizer:
    return build_optimizer(detector.model, TEST_OPTIM, detector.config.vision_config.backbone_config.num_hidden_layers)


def _train(micro_batches, criterion, steps: int = STEPS):
    """`steps` optimiser steps on the same micro-batches; returns (model, [StepResult per step])."""
    detector = _fresh_model()
    optimizer = _optimizer(detector)
    results = [
        train_step(detector, criterion, optimizer, micro_batches, device=CPU, grad_clip=0.1) for _ in range(steps)
    ]
    return detector, results


class OwnCountsCriterion(Criterion):
    """The naive accumulation: each micro-batch normalised by its OWN box and query counts (the control)."""

    def __call__(self, outputs, targets, num_boxes=None, num_queries=None):
        return super().__call__(outputs, targets)


def test_batch_4_equals_batch_2_times_accumulation_2(samples):
    whole = [collate_prompts(samples)]
    halves = [collate_prompts(samples[:2]), collate_prompts(samples[2:])]
    assert whole[0].num_target_boxes == sum(b.num_target_boxes for b in halves) > 0
    # the halves hold different numbers of boxes, so their own normalisers differ from the whole batch's
    assert halves[0].num_target_boxes != halves[1].num_target_boxes

    # without the reference's sqrt(queries) scale, which scales each micro-batch by its own query count
    split_invariant = LossConfig(scale_by_sqrt_num_queries=False)
    big, big_results = _train(whole, Criterion(split_invariant))
    accumulated, acc_results = _train(halves, Criterion(split_invariant))

    for step, (one, two) in enumerate(zip(big_results, acc_results, strict=True)):
        assert one.finite and two.finite
        torch.testing.assert_close(two.loss, one.loss, rtol=1e-5, atol=0, msg=f"loss of step {step}")
        assert set(one.terms) == set(two.terms)
        for name in one.terms:  # every weighted term, every decoder layer
            torch.testing.assert_close(two.terms[name], one.terms[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(two.grad_norm, one.grad_norm, rtol=1e-5, atol=0)
    # the loss changed from step to step: the weights moved
    assert abs(float(big_results[-1].loss) - float(big_results[0].loss)) > 1e-2

    # Same weights, up to round-off (tolerances and why in tests/weights.py).
    assert_same_weights(accumulated.named_parameters(), big.named_parameters())
    update_big, update_acc = _update(big), _update(accumulated)
    assert update_big.abs().max() > 1e-3  # 3 steps at lr 1e-3 moved the weights well beyond the tolerance
    assert (update_acc - update_big).norm() / update_big.norm() < 1e-4  # measured 1.6e-5

    # The control, one step: per-micro-batch normalisation gives another update, far outside both tolerances
    # (measured: relative update error 0.35; AdamW's first step is lr * sign(gradient), and signs flip by 2e-3).
    first_big, _ = _train(whole, Criterion(split_invariant), steps=1)
    naive, _ = _train(halves, OwnCountsCriterion(split_invariant), steps=1)
    assert (_update(naive) - _update(first_big)).norm() / _update(first_big).norm() > 0.05
    pairs = zip(naive.parameters(), first_big.parameters(), strict=True)
    assert max(float((p - q).detach().abs().max()) for p, q in pairs) > 1e-3


def _update(detector: Sam3Detector) -> torch.Tensor:
    """All weights minus the initial ones, as one flat vector."""
    initial = _fresh_model().parameters()
    return torch.cat(
        [(p.detach() - p0.detach()).flatten() for p, p0 in zip(detector.parameters(), initial, strict=True)]
    )


def test_non_finite_loss_on_a_later_micro_batch_steps_nothing(samples):
    halves = [collate_prompts(samples[:2]), collate_prompts(samples[2:])]
    detector = _fresh_model()
    optimizer = _optimizer(detector)
    criterion = NanOnCall(bad_calls=(4,))  # step 1: calls 1 and 2 fine; step 2: call 3 fine (backward ran), call 4 NaN
    assert train_step(detector, criterion, optimizer, halves, device=CPU).finite
    before = {n: p.detach().clone() for n, p in detector.named_parameters()}
    state_before = {k: {n: v.clone() for n, v in s.items()} for k, s in optimizer.state.items()}

    result = train_step(detector, criterion, optimizer, halves, device=CPU)

    assert not result.finite and torch.isnan(result.loss) and result.grad_norm is None
    assert all(p.grad is None for p in detector.parameters())  # the first micro-batch's gradients are gone too
    for name, p in detector.named_parameters():
        assert torch.equal(p, before[name]), name
    for param, state in optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, state_before[param][key])  # AdamW moments and step count unchanged
    # and the next good step trains again
    assert train_step(detector, criterion, optimizer, halves, device=CPU).finite
    assert any(not torch.equal(p, before[n]) for n, p in detector.named_parameters())


def _ddp_nan_worker(rank: int, port: int, samples, out_dir: str) -> None:
    """Rank 1's loss is NaN on the first step only; both ranks report what they saw and their weights."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: with the bug, rank 0 waits in the gradient all-reduce, and the test must fail, not hang
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=60))
    try:
        detector = _fresh_model()
        # as the trainer does: DDP without find_unused_parameters needs every trainable parameter to get a gradient
        apply_freeze(detector.model, "none", also_freeze=parameters_without_text_gradients(detector, with_masks=False))
        model = torch.nn.parallel.DistributedDataParallel(detector)
        optimizer = _optimizer(detector)
        criterion = NanOnCall(bad_calls=(1,) if rank == 1 else ())
        batch = [collate_prompts(samples[2 * rank : 2 * rank + 2])]
        first = train_step(model, criterion, optimizer, batch, device=CPU)
        weights_after_first = [p.detach().clone() for p in detector.parameters()]
        second = train_step(model, criterion, optimizer, batch, device=CPU)
        torch.save(
            {
                "finite": [first.finite, second.finite],
                "after_first": weights_after_first,
                "after_second": [p.detach().clone() for p in detector.parameters()],
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_nan_on_one_rank_skips_the_step_on_every_rank(samples, tmp_path):
    mp.spawn(_ddp_nan_worker, args=(get_free_port(), samples, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert [r["finite"] for r in ranks] == [[False, True], [False, True]]
    initial = list(_fresh_model().parameters())
    for rank in ranks:
        for p, p0 in zip(rank["after_first"], initial, strict=True):
            assert torch.equal(p, p0)  # nobody stepped on the bad step
    for p0, p1 in zip(ranks[0]["after_second"], ranks[1]["after_second"], strict=True):
        assert torch.equal(p0, p1)  # the next step ran on both ranks, with the same all-reduced gradient
    assert any(not torch.equal(p, p0) for p, p0 in zip(ranks[0]["after_second"], initial, strict=True))


def test_autocast_is_fp32_on_cpu_unless_cpu_autocast_is_asked():
    """The trainer's CPU path stays fp32 whatever amp_dtype says; `on_cpu` (bench.speed --amp bf16) casts matmuls."""
    from sam3.engine import autocast

    cpu = torch.device("cpu")
    a, b = torch.randn(4, 8), torch.randn(8, 3)
    with autocast(cpu, torch.bfloat16):
        assert (a @ b).dtype == torch.float32
    with autocast(cpu, torch.bfloat16, on_cpu=True):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(cpu, None, on_cpu=True):
        assert (a @ b).dtype == torch.float32
