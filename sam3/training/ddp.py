"""DistributedDataParallel for the trainer: wrapping the model, and loss values averaged over ranks.

Every rank must take the same decisions (divergence guard) and rank 0 logs the global batch's terms, so losses are
all-reduced: a rank's term is its share S_r / N of the global sum (N: the normaliser averaged over ranks,
`sam3.losses.normalisers`), so the global batch's term S / (W N) is the mean over the W ranks' terms.
"""

from __future__ import annotations

import torch

from sam3.config import DDPConfig
from sam3.distributed import DistInfo


def wrap_ddp(detector: torch.nn.Module, ddp: DDPConfig, dist_info: DistInfo) -> torch.nn.Module:
    """DistributedDataParallel around the detector when there is more than one process."""
    if not dist_info.enabled:
        return detector
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    model = torch.nn.parallel.DistributedDataParallel(
        detector,
        device_ids=[dist_info.device.index] if dist_info.device.type == "cuda" else None,
        find_unused_parameters=ddp.find_unused_parameters,
        static_graph=ddp.static_graph,
    )
    if ddp.gradient_compression == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif ddp.gradient_compression == "bf16":
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return model


def global_mean(value: torch.Tensor, dist_info: DistInfo) -> float:
    """The loss averaged over ranks, so every rank takes the same divergence decision."""
    if dist_info.enabled:
        value = value.detach().clone()
        torch.distributed.all_reduce(value)
        value /= dist_info.world_size
    return float(value)


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
