"""A resumable, distributed, seeded sampler.

Epoch e visits a permutation of the dataset drawn from (seed, e); rank r of W takes every W-th index of it
(padded by wrapping so every rank gets the same count, as DDP needs equal step counts). `start` skips the first
indices of this rank's share, so a run resumed mid-epoch sees exactly the samples it would have seen
uninterrupted, without loading and discarding the ones before.

With `with_epoch`, it yields (epoch, index) keys instead of bare indices, for datasets wrapped in
`EpochKeyed` (below): the epoch then travels with each key to the DataLoader's workers, so the workers can be
persistent (started once per run, not once per epoch) and still draw each epoch's augmentation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Dataset, Sampler


class EpochDataset(Dataset):
    """A dataset whose samples depend on the epoch (`CocoPromptDataset`, `CachedPromptDataset`).

    Subclasses implement `sample(index, epoch)` and `__len__`; `dataset[i]` is `sample(i, epoch)` for the epoch last
    given to `set_epoch` (0 at first). `EpochKeyed` calls `sample` with the epoch each key carries instead.
    """

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws `__getitem__` makes (call before iterating each epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int):
        return self.sample(index, self.epoch)

    def sample(self, index: int, epoch: int):
        raise NotImplementedError


class ResumableSampler(Sampler):
    def __init__(
        self,
        size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        with_epoch: bool = False,
    ):
        if size <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.with_epoch = with_epoch
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the permutation of `epoch` and skip this rank's first `start` indices."""
        self.epoch, self.start = epoch, start

    @property
    def per_rank(self) -> int:
        return math.ceil(self.size / self.world_size)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def __iter__(self) -> Iterator[int] | Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        padded = (order * math.ceil(self.per_rank * self.world_size / self.size))[: self.per_rank * self.world_size]
        mine = padded[self.rank :: self.world_size][self.start :]
        if self.with_epoch:
            return iter([(self.epoch, index) for index in mine])
        return iter(mine)


class EpochKeyed(Dataset):
    """`dataset` indexed by (epoch, index) keys: `keyed[(e, i)]` is `dataset.sample(indices[i], e)`.

    `indices` selects a subset (the seeded N-image subset), as torch's Subset would; None: every sample. Built for
    `ResumableSampler(with_epoch=True)` and a DataLoader with persistent workers, whose dataset copies never see a
    `set_epoch` call made in the main process after they start.
    """

    def __init__(self, dataset: EpochDataset, indices: Sequence[int] | None = None) -> None:
        self.dataset = dataset
        self.indices = list(indices) if indices is not None else None

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        return self.dataset.sample(self.indices[index] if self.indices is not None else index, epoch)
