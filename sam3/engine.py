"""One optimiser step, spelled out: forward, criterion, non-finite check, backward, unscale, clip, step.

    for each micro-batch (gradient accumulation):
        outputs = model(batch)                          # under bf16/fp16 autocast on CUDA, fp32 on CPU
        losses  = criterion(outputs, targets, normalisers of the WHOLE accumulated batch)
        stop here if losses["loss"] is not finite      # on any rank; nothing is stepped; the caller decides (guard)
        backward(losses["loss"])                        # DDP all-reduces only on the last micro-batch
    unscale (fp16 only), clip the global gradient L2 norm, optimizer.step()

Accumulation gives the same update as the larger batch because every micro-batch's loss is normalised by the
counts of the whole accumulated batch (target boxes, queries), not its own: batch 4 x 1 == batch 2 x 2.
The schedule (`sam3.optim.set_lr`) is applied by the caller before the step. `model` is a `Sam3Detector` on
`PromptBatch`es, or a `sam3.features.CachedDetector` on the `FeatureBatch`es of a feature cache (DDP may wrap either).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from sam3.batch import PromptBatch
from sam3.config import GRAD_CLIP


@dataclass
class StepResult:
    """Tensors stay on the device: reading them (`.item()`) is a host sync, done only at log steps."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    finite: bool


def autocast(
    device: torch.device, amp_dtype: torch.dtype | None, *, on_cpu: bool = False
) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; plain fp32 elsewhere (CPU autocast is slow and not what we train with).

    `on_cpu`: autocast on the CPU too. Only `bench.speed --amp bf16` asks for it, to see on a machine without a GPU
    what a bf16 step keeps in memory (the activations that autocast saves in bf16).
    """
    if amp_dtype is not None and (device.type == "cuda" or on_cpu):
        return torch.autocast(device.type, dtype=amp_dtype)
    return contextlib.nullcontext()


def train_step(
    model: nn.Module,
    criterion: Callable[..., dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    micro_batches: list[PromptBatch],
    *,
    device: torch.device,
    with_masks: bool = False,
    amp_dtype: torch.dtype | None = None,
    grad_clip: float | None = GRAD_CLIP,
    scaler: torch.amp.GradScaler | None = None,
    cpu_autocast: bool = False,
) -> StepResult:
    """Accumulate gradients over `micro_batches`, then take one optimiser step (skipped if the loss is not finite).

    `amp_dtype` autocasts the forward on CUDA; on the CPU only with `cpu_autocast` (see `autocast`)."""
    optimizer.zero_grad(set_to_none=True)
    num_boxes = float(sum(b.num_target_boxes for b in micro_batches))
    num_queries = sum(b.num_queries for b in micro_batches)
    total = torch.zeros((), device=device)
    terms: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        batch = batch.to(device, non_blocking=True)
        last = i == len(micro_batches) - 1
        # DDP: skip the gradient all-reduce until the last micro-batch
        no_sync = model.no_sync() if (hasattr(model, "no_sync") and not last) else contextlib.nullcontext()
        with no_sync:
            with autocast(device, amp_dtype, on_cpu=cpu_autocast):
                outputs = model(batch, with_masks=with_masks)
            losses = criterion(outputs, batch.targets, num_boxes=num_boxes, num_queries=num_queries)
            loss = losses["loss"]
            if not _finite_on_every_rank(loss):  # a host sync, but a NaN must never reach the weights
                optimizer.zero_grad(set_to_none=True)
                return StepResult(loss.detach(), _detached(losses), None, finite=False)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
        for name, value in losses.items():
            terms[name] = terms.get(name, 0) + value.detach()
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else _grad_norm(params)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(total, terms, grad_norm.detach(), finite=True)


def _finite_on_every_rank(loss: torch.Tensor) -> bool:
    """Whether `loss` is finite here and on every other rank (one scalar all_reduce under torch.distributed).

    Every rank must take the same branch: a rank that skipped backward alone would leave the others waiting in
    DDP's gradient all-reduce, and the next collective of each side would pair with the wrong one.
    """
    finite = torch.isfinite(loss.detach()).to(torch.float32)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def _detached(losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in losses.items()}


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
