"""One matching pass over every decoder layer of a training step: one device->host copy, one upload.

The criterion (sam3.losses) supervises several sets of predictions per step: the final decoder layer, each auxiliary
layer, and the one-to-many half of each. Each is matched to the targets by a matcher with a device half and a host
half (sam3.matcher.HungarianMatcher, sam3.o2m_matcher.OneToManyMatcher):

    prepare(pred_logits, pred_boxes, padded)  -> a tensor on the device (costs, or pass/fail flags), or None
    assign(host_array, sizes)                 -> per query, (pred_idx, tgt_idx) int64 arrays

Matching layer by layer would stop the CPU once per layer (and more: index uploads, nonzero). Here every device
half runs first; their results come to the host in ONE `to_host`; the host halves run on that copy (scipy, numpy);
and the matched indices of all layers go back to the device in ONE non-blocking `to_device`, together with the
`has_target` flags the losses need. The losses then run on the device without further host syncs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from sam3.host_sync import to_device, to_host
from sam3.matcher import PaddedTargets, pad_targets


class Matcher(Protocol):
    def prepare(
        self, pred_logits: torch.Tensor, pred_boxes: torch.Tensor, padded: PaddedTargets
    ) -> torch.Tensor | None: ...

    def assign(self, host: np.ndarray, sizes: list[int]) -> list[tuple[np.ndarray, np.ndarray]]: ...


@dataclass
class LayerMatches:
    """The matched pairs of one set of predictions, on the device; M pairs, ordered by query as the matcher gave them.

    query, pred    long [M]: prediction pred[k] of query query[k] is matched to ...
    target         long [M]: ... target row target[k] of the concatenation of all queries' boxes (query order),
    local_target   long [M]: ... which is target local_target[k] of its own query
    counts         pairs per query, on the host (sum M): `per_query` cuts by them without a host sync
    """

    query: torch.Tensor
    pred: torch.Tensor
    target: torch.Tensor
    local_target: torch.Tensor
    counts: list[int]

    def per_query(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(pred, local_target) of each query: views into the device tensors, the matcher's per-query format."""
        return list(zip(self.pred.split(self.counts), self.local_target.split(self.counts), strict=True))


@dataclass
class StepMatches:
    """Every layer's matches (in the order asked) and has_target, bool [Q] (query q has at least one target)."""

    layers: list[LayerMatches]
    has_target: torch.Tensor


def match_layers(
    layers: Sequence[tuple[Matcher, torch.Tensor, torch.Tensor]], targets: list[dict], device: torch.device
) -> StepMatches:
    """Match each (matcher, pred_logits [Q, N], pred_boxes [Q, N, 4]) of `layers` to `targets` (module docstring).

    Args:
        layers: the prediction sets of one step, each with the matcher for it; logits and boxes float32.
        targets: Q dicts with `boxes` float [n_q, 4] normalised cxcywh (n_q may be 0).
        device: where the losses run (the model's device).

    Returns:
        StepMatches with one LayerMatches per entry of `layers`. One host sync (none when no query has a target).
    """
    num_queries = len(targets)
    padded = pad_targets(targets, num_queries, device, torch.float32)
    device_parts = [matcher.prepare(logits, boxes, padded) for matcher, logits, boxes in layers]
    waiting = [part for part in device_parts if part is not None]
    host_parts = iter(to_host(*waiting) if waiting else ())

    sizes = np.asarray(padded.sizes, dtype=np.int64)
    offsets = np.cumsum(sizes) - sizes  # each query's first row in the concatenation of all target boxes
    uploads, counts = [], []
    for (matcher, *_), part in zip(layers, device_parts, strict=True):
        if part is None:
            pairs = [(np.empty(0, np.int64), np.empty(0, np.int64))] * num_queries
        else:
            pairs = matcher.assign(next(host_parts).numpy(), padded.sizes)
        per_query = [len(pred) for pred, _ in pairs]
        query = np.repeat(np.arange(num_queries, dtype=np.int64), per_query)
        pred = np.concatenate([p for p, _ in pairs] or [np.empty(0)]).astype(np.int64)
        local = np.concatenate([t for _, t in pairs] or [np.empty(0)]).astype(np.int64)
        uploads.append(np.stack([query, pred, offsets[query] + local, local]))
        counts.append(per_query)
    has_target, *indices = to_device([sizes > 0, *uploads], device)
    return StepMatches(
        [LayerMatches(*rows.unbind(0), counts=per_query) for rows, per_query in zip(indices, counts, strict=True)],
        has_target,
    )
