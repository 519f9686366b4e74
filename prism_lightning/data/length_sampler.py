"""A training-row order that puts rows of similar length into the same batch, so a right-padded batch
carries few pad tokens through attention and the MLPs.

Every row is still seen once per epoch, in a random order that depends on the seed and the epoch only.
The rows are shuffled, cut into windows of ``group_batches`` batches, each window is sorted by length and
cut into batches, and the full batches are shuffled (a short last batch stays last, so the DataLoader's
consecutive cuts of ``batch_size`` rows are exactly these batches). A row's loss does not depend on the
rows it shares a batch with (right padding is masked); what changes is which rows share a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Row indices in an order whose consecutive ``batch_size`` runs have similar ``lengths``.

    Args:
        lengths: tokens per row (prompt + response).
        batch_size: rows per batch (the DataLoader's).
        group_batches: batches per sorted window; larger windows pad less and shuffle less.
        seed: with the epoch (:meth:`set_epoch`, which Lightning calls every epoch), fixes the order.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, group_batches: int, seed: int = 0) -> None:
        if batch_size < 1 or group_batches < 1:
            raise ValueError(f"batch_size and group_batches must be >= 1, got {batch_size}, {group_batches}")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.group_batches = group_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.lengths)

    def batches(self) -> list[list[int]]:
        """This epoch's batches (the last one may be short)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        window = self.batch_size * self.group_batches
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            part = sorted(order[start : start + window], key=lambda i: -self.lengths[i])  # stable
            batches += [part[i : i + self.batch_size] for i in range(0, len(part), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        # windows of a size that is not a multiple of the batch leave at most one short batch: the last
        # window's, as every earlier window holds whole batches
        return [full[i] for i in torch.randperm(len(full), generator=g).tolist()] + short

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
