"""LengthGroupedSampler: a permutation of the rows per epoch, fixed by seed and epoch, whose batches pad
less than a free shuffle's."""

from __future__ import annotations

import random

import pytest

from prism_lightning.data.length_sampler import LengthGroupedSampler

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(8, 300) for _ in range(103)]


def _padding(batches: list[list[int]]) -> int:
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_every_row_once_per_epoch_and_the_order_is_fixed_by_seed_and_epoch():
    s = LengthGroupedSampler(LENGTHS, batch_size=8, group_batches=4, seed=3)
    first = list(s)
    assert sorted(first) == list(range(len(LENGTHS)))
    assert list(LengthGroupedSampler(LENGTHS, 8, 4, seed=3)) == first
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == sorted(first) and second != first
    assert list(LengthGroupedSampler(LENGTHS, 8, 4, seed=4)) != first


def test_batches_are_the_dataloaders_cuts_and_pad_less_than_a_free_shuffle():
    s = LengthGroupedSampler(LENGTHS, batch_size=8, group_batches=4, seed=0)
    batches = s.batches()
    order = list(s)
    assert [order[i : i + 8] for i in range(0, len(order), 8)] == batches  # only the last one is short
    assert [len(b) for b in batches[:-1]] == [8] * (len(batches) - 1) and len(batches[-1]) == 103 % 8
    free = list(range(len(LENGTHS)))
    random.Random(0).shuffle(free)
    assert _padding(batches) < 0.5 * _padding([free[i : i + 8] for i in range(0, len(free), 8)])


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="group_batches"):
        LengthGroupedSampler(LENGTHS, batch_size=8, group_batches=0)
