"""DistributedDataParallel for the trainer: wrapping the model, loss values averaged over ranks, rank 0's validation
metric shared, and the run folder's lock taken by rank 0 for all ranks.

Every rank must take the same decisions (divergence guard): the step's loss is averaged over ranks where the step
reads it (`sam3.engine`, one all-reduce with its finite flag). Rank 0 logs the global batch's terms, all-reduced
here at log steps: a rank's term is its share S_r / N of the global sum (N: the normaliser averaged over ranks,
`sam3.losses.normalisers`), so the global batch's term S / (W N) is the mean over the W ranks' terms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from sam3.config import DDPConfig
from sam3.distributed import DistInfo
from sam3.run_lock import RunLocked, run_lock


def wrap_ddp(detector: torch.nn.Module, ddp: DDPConfig, dist_info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around the detector when there is more than one process: gradients as views of the
    all-reduce buckets, no buffer broadcast (comments below), ddp.static_graph when asked (valid when every step
    uses the same parameters: same freeze, same mode, no parameter left unused by some step)."""
    if not dist_info.enabled:
        return detector
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = torch.nn.parallel.DistributedDataParallel(
        detector,
        device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
        find_unused_parameters=ddp.find_unused_parameters,
        static_graph=ddp.static_graph,
        # the gradients are views into DDP's all-reduce buckets, not a second copy of them (3.4 GB for the full
        # model trained whole)
        gradient_as_bucket_view=True,
        # SAM 3's buffers (position encodings, RoPE tables) are constants built alike on every rank: broadcasting
        # them from rank 0 before each forward would only cost time
        broadcast_buffers=False,
    )
    if ddp.gradient_compression == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif ddp.gradient_compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return model


def global_means(terms: dict[str, torch.Tensor], dist_info: DistInfo) -> dict[str, torch.Tensor]:
    """Each loss term averaged over ranks (one all_reduce), i.e. the term of the whole global batch.

    A rank's term is its share S_r / N of the global sum (N: the normaliser averaged over ranks, `sam3.losses`), so
    the global batch's term S / (W N) is the mean of the ranks' terms; rank 0's own term is not it.
    """
    if not dist_info.enabled:
        return terms
    stacked = torch.stack([value.detach().float() for value in terms.values()])
    torch.distributed.all_reduce(stacked)
    return dict(zip(terms, stacked / dist_info.world_size, strict=True))


def from_main_rank(value: float | None, dist_info: DistInfo) -> float | None:
    """Rank 0's `value` on every rank (one broadcast): a validation metric, which rank 0 alone computes, must lead
    every rank to the same best-checkpoint and early-stopping decisions."""
    if not dist_info.enabled:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def main_rank_lock(run_dir: Path, dist_info: DistInfo) -> Iterator[None]:
    """The run folder's lock (`sam3.run_lock`) for the whole run: taken by rank 0 alone, its outcome shared.

    Why rank 0 alone, not every rank nor local rank 0 of each node: rank 0 is the one process that writes the run
    folder (checkpoints, logs, export), and a multi-node run's folder sits on a file system all nodes share, where
    a lock taken per node would find the first node's and refuse the run itself (every rank would block every
    other). The other ranks learn through one broadcast whether rank 0 got it, so a refused run stops on every rank
    at once, with the same one-line RunLocked, instead of leaving them waiting at the next collective until the
    DDP timeout.
    """
    if not dist_info.enabled:
        with run_lock(run_dir, "training run"):
            yield
        return
    with contextlib.ExitStack() as held:
        refusal = [None]
        if dist_info.is_main:
            try:
                held.enter_context(run_lock(run_dir, "training run"))
            except RunLocked as err:
                refusal = [str(err)]
        torch.distributed.broadcast_object_list(refusal, src=0)
        if refusal[0] is not None:
            raise RunLocked(refusal[0])
        yield
