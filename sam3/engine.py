"""One optimiser step, spelled out: forward, criterion, backward, one host read, unscale, clip, step.

    for each micro-batch (gradient accumulation):
        outputs = model(batch)                          # under bf16/fp16 autocast on CUDA, fp32 on CPU
        losses  = criterion(outputs, targets, normalisers of the WHOLE accumulated batch)
        backward(losses["loss"])                        # DDP all-reduces only on the last micro-batch
    read the step's loss, averaged over ranks, and whether it is finite on every rank: ONE all_reduce, ONE host copy
    stop here if it is not finite                       # gradients dropped, nothing stepped; the caller decides (guard)
    unscale (fp16 only), clip the global gradient L2 norm, optimizer.step()

The read is the step's only host sync of its own (the criterion's matching makes the other, sam3.match_pass): on a
GPU the CPU queues the whole forward and backward before it waits once. A NaN loss therefore runs its backward too;
its gradients never reach the weights (they are dropped before any unscale, clip or step), and since every rank
runs the same backward (with DDP's gradient all-reduce) and reads the same verdict, all ranks skip together.

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
from sam3.host_sync import to_host


@dataclass
class StepResult:
    """What a step did. `loss`, `terms` and `grad_norm` stay on the device: reading them is a host sync, done only at
    log steps. `mean_loss` is already on the host: the step's loss averaged over ranks, which the step read anyway
    to decide `finite`; the divergence guard takes it (non-finite whenever `finite` is false)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    finite: bool
    mean_loss: float


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
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total = total + loss.detach()
        for name, value in losses.items():
            terms[name] = terms.get(name, 0) + value.detach()
    mean_loss, finite = read_on_every_rank(total)
    if not finite:  # a NaN must never reach the weights: drop its gradients before anything steps
        optimizer.zero_grad(set_to_none=True)
        return StepResult(total, terms, None, finite=False, mean_loss=mean_loss)
    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip else grad_norm_of(params)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return StepResult(total, terms, grad_norm.detach(), finite=True, mean_loss=mean_loss)


def read_on_every_rank(loss: torch.Tensor) -> tuple[float, bool]:
    """(the loss averaged over ranks, whether it is finite on every rank), read on the host in one copy.

    One all_reduce (SUM) of [loss, 1 if loss is not finite] under torch.distributed, then one `to_host`: every rank
    gets the same verdict, so all take the same branch (a rank that stepped alone would leave the ranks out of step).
    A non-finite loss on any rank makes the mean non-finite too, so the guard flags it.
    """
    status = torch.stack([loss.detach().float(), (~torch.isfinite(loss.detach())).float()])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(status)
        status = torch.cat([status[:1] / dist.get_world_size(), status[1:]])  # the mean loss, the count of bad ranks
    (host,) = to_host(status)
    mean_loss, non_finite_ranks = host.tolist()
    return mean_loss, non_finite_ranks == 0


def grad_norm_of(params: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
