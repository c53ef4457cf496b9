"""A resumable, distributed, seeded sampler.

Epoch e visits a permutation of the dataset drawn from (seed, e); rank r of W takes every W-th index of it
(padded by wrapping so every rank gets the same count, as DDP needs equal step counts). `start` skips the first
indices of this rank's share, so a run resumed mid-epoch sees exactly the samples it would have seen
uninterrupted, without loading and discarding the ones before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the permutation of `epoch` and skip this rank's first `start` indices."""
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = (order * math.ceil(self.per_rank * self.world_size / self.size))[: self.per_rank * self.world_size]
        mine = padded[self.rank :: self.world_size]
        return iter(mine[self.start :])
