"""2D slices of cached, preprocessed 3D volumes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose

__all__ = ["SliceDataset"]


class SliceDataset(torch.utils.data.Dataset):
    """Every 2D slice of a set of 3D volumes, addressable by one flat index.

    The volumes go once through ``transform`` (3D loading and preprocessing) and are kept in a MONAI
    ``CacheDataset``, so no epoch after construction re-reads a file. Slicing is a view of the cache.

    Args:
        data: datalist, one dict per volume (e.g. ``{"image": path, "label": path, "subject": id}``).
        transform: 3D preprocessing ending in channel-first (C, X, Y, Z) arrays whose in-plane size is
            the same for every volume (e.g. ``aiva_monai.data.volume_transforms``).
        keys: array keys to slice. Keys missing from a volume are skipped (a target site without labels).
        slice_axis: spatial axis (0, 1 or 2 of X, Y, Z) to slice along.
        index_key: key holding each slice's flat index (what the AIVA trainer and handler read).
        slice_transform: optional transform applied to each 2D slice dict (augmentation).
        cache_num_workers: workers that fill the cache.
        progress: show the cache-filling progress bar.

    A sample is a dict with, for each present key, a float32 (C, H, W) tensor; ``index_key`` (int);
    ``volume`` (position of its volume in ``data``); ``slice`` (its position along ``slice_axis``);
    and every non-array entry of its volume's dict (``subject``, ``site``, ...).
    """

    def __init__(
        self,
        data: Sequence[dict],
        transform: Callable,
        keys: Sequence[str] = ("image", "label"),
        slice_axis: int = 0,
        index_key: str = "index",
        slice_transform: Callable | None = None,
        cache_num_workers: int = 0,
        progress: bool = True,
    ) -> None:
        if slice_axis not in (0, 1, 2):
            raise ValueError(f"slice_axis must be 0, 1 or 2, got {slice_axis}.")
        if len(data) == 0:
            raise ValueError("SliceDataset got an empty datalist: no volume to slice.")
        self.data = list(data)
        self.keys = tuple(keys)
        self.slice_axis = slice_axis
        self.index_key = index_key
        self.slice_transform = slice_transform
        if isinstance(transform, Compose):
            # CacheDataset stops caching at the first Randomizable step, and a nested Compose counts as one
            transform = transform.flatten()
        self.volumes = CacheDataset(
            self.data, transform=transform, cache_rate=1.0, num_workers=cache_num_workers, copy_cache=False, progress=progress
        )
        counts = []
        for position in range(len(self.volumes)):
            volume = self.volumes[position]
            arrays = [volume[key] for key in self.keys if key in volume]
            if not arrays:
                raise ValueError(f"volume {self._describe(position)} has none of the keys {self.keys}.")
            shapes = {tuple(array.shape[1:]) for array in arrays}
            if len(shapes) != 1 or len(next(iter(shapes))) != 3:
                raise ValueError(
                    f"volume {self._describe(position)}: expected channel-first 3D arrays of one shape for {self.keys}, "
                    f"got shapes {[tuple(a.shape) for a in arrays]}."
                )
            counts.append(next(iter(shapes))[slice_axis])
        self.slice_counts = np.asarray(counts, dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.slice_counts)])

    def _describe(self, position: int) -> str:
        entry = self.data[position]
        return str(entry.get("image", entry)) if isinstance(entry, dict) else str(entry)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(volume position, slice position) of flat index ``index``."""
        if not 0 <= index < len(self):
            raise IndexError(f"slice index {index} out of range for {len(self)} slices.")
        volume = int(np.searchsorted(self._starts, index, side="right") - 1)
        return volume, int(index - self._starts[volume])

    def __getitem__(self, index: int) -> dict:
        volume_position, slice_position = self.locate(int(index))
        volume = self.volumes[volume_position]
        sample = {k: v for k, v in self.data[volume_position].items() if k not in self.keys}
        for key in self.keys:
            if key in volume:
                array = torch.as_tensor(volume[key])
                sample[key] = array.select(self.slice_axis + 1, slice_position).float().as_subclass(torch.Tensor)
        sample.update({self.index_key: int(index), "volume": volume_position, "slice": slice_position})
        if self.slice_transform is not None:
            sample = self.slice_transform(sample)
        return sample
