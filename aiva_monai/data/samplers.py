"""A resumable sampling order: where a checkpoint was taken, a restarted run continues exactly."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import numpy as np
import torch

__all__ = ["SeededEndlessSampler"]


class SeededEndlessSampler(torch.utils.data.Sampler[int]):
    """An endless stream of dataset indices: pass ``p`` over the data is the permutation drawn from
    ``numpy.random.default_rng([seed, p])`` (or the identity with ``shuffle=False``).

    The order is a pure function of ``(seed, position)``, so a trainer that knows how many samples it
    has consumed can set ``position`` before the loader's iterator is created and a resumed run sees
    exactly the batches an uninterrupted one would (the AIVA and baseline trainers do this). The global
    torch RNG is not used. Being endless, a loader over it needs an ``epoch_length`` in the trainer.

    Args:
        data_source: the dataset (only its length is used).
        seed: seeds every pass's permutation.
        shuffle: permute each pass; False keeps the dataset order.
        rank, world_size: for distributed training: rank ``r`` of ``world_size`` processes takes every
            ``world_size``-th element of the one global seeded stream, starting at element ``r``. Together
            the ranks' first ``b`` samples are exactly the global stream's first ``world_size * b``
            samples, so ``world_size`` ranks with batch ``b`` see the samples of a single process with
            batch ``world_size * b`` (global batch ``i`` = the union of the ranks' batches ``i``).

    ``position`` counts the samples *this rank* has drawn (``world_size = 1``: the global position); the
    global stream position is ``position * world_size + rank``. A checkpoint therefore resumes exactly
    with the same ``world_size``; resuming with another number of processes keeps the seeded order but
    not the exact batches.
    """

    def __init__(
        self, data_source: Sized, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1
    ) -> None:
        self.size = len(data_source)
        if self.size == 0:
            raise ValueError("SeededEndlessSampler got an empty dataset.")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.position = 0
        self.rank, self.world_size = int(rank), int(world_size)
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise ValueError(
                f"SeededEndlessSampler needs 0 <= rank < world_size, got rank {rank}, world_size {world_size}."
            )

    def order(self, current_pass: int) -> np.ndarray:
        """The (n,) index order of pass ``current_pass``."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, int(current_pass)]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        step = self.world_size
        current_pass, offset = divmod(int(self.position) * step + self.rank, self.size)
        while True:
            order = self.order(current_pass)
            for index in order[offset::step]:
                yield int(index)
            # the next element of this rank's share in the following pass
            taken = len(range(offset, self.size, step))
            offset = offset + taken * step - self.size
            current_pass += 1
            while offset >= self.size:  # world_size larger than the dataset: skip whole passes
                offset -= self.size
                current_pass += 1
