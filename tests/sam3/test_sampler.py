"""ResumableSampler: seeded permutations, equal shares per rank, exact resume offsets."""

import pytest

from sam3.data.sampler import ResumableSampler


def test_epochs_are_seeded_permutations():
    sampler = ResumableSampler(10, seed=3)
    first = list(sampler)
    assert sorted(first) == list(range(10))
    assert list(ResumableSampler(10, seed=3)) == first  # same seed, same order
    sampler.set_epoch(1)
    assert list(sampler) != first and sorted(sampler) == list(range(10))
    assert list(ResumableSampler(4, shuffle=False)) == [0, 1, 2, 3]


def test_ranks_split_one_permutation_with_padding():
    # 5 samples over 2 ranks: 3 each, the permutation wrapped by one sample
    full = list(ResumableSampler(5, seed=1, world_size=1))
    rank0 = list(ResumableSampler(5, seed=1, rank=0, world_size=2))
    rank1 = list(ResumableSampler(5, seed=1, rank=1, world_size=2))
    padded = full + full[:1]
    assert rank0 == padded[0::2] and rank1 == padded[1::2]
    assert len(rank0) == len(rank1) == 3


def test_start_skips_exactly_the_consumed_indices():
    sampler = ResumableSampler(8, seed=2)
    sampler.set_epoch(4)
    whole = list(sampler)
    sampler.set_epoch(4, start=3)
    assert list(sampler) == whole[3:] and len(sampler) == 5


def test_empty_dataset_is_an_error():
    with pytest.raises(ValueError, match="empty dataset"):
        ResumableSampler(0)


def test_with_epoch_yields_the_same_order_as_epoch_keys():
    plain = ResumableSampler(6, seed=5, rank=1, world_size=2)
    keyed = ResumableSampler(6, seed=5, rank=1, world_size=2, with_epoch=True)
    for sampler in (plain, keyed):
        sampler.set_epoch(2, start=1)
    assert list(keyed) == [(2, index) for index in plain] and len(keyed) == len(plain) == 2
