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
    """

    def __init__(self, data_source: Sized, seed: int = 0, shuffle: bool = True) -> None:
        self.size = len(data_source)
        if self.size == 0:
            raise ValueError("SeededEndlessSampler got an empty dataset.")
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.position = 0

    def order(self, current_pass: int) -> np.ndarray:
        """The (n,) index order of pass ``current_pass``."""
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, int(current_pass)]).permutation(self.size)

    def __iter__(self) -> Iterator[int]:
        current_pass, offset = divmod(int(self.position), self.size)
        while True:
            for index in self.order(current_pass)[offset:]:
                yield int(index)
            current_pass, offset = current_pass + 1, 0
