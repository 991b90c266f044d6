"""2D slices of cached, preprocessed 3D volumes."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import Compose

from aiva_monai.progress import RoundProgress

__all__ = ["SliceDataset", "check_volume_files"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nifti_header(path: str, key: str):
    try:
        return nib.load(path)
    except Exception as error:  # a corrupt or foreign file: say which one
        raise ValueError(f"{key} file {path} cannot be read as NIfTI: {error}") from None


def check_volume_files(entry: dict, keys: Sequence[str] = ("image", "label"), affine_atol: float = 1e-3) -> None:
    """Header-only checks of one datalist entry's NIfTI files (no voxel data read): each readable, 3D (a
    trailing axis of length 1 allowed), and every other key's file (the masks) of the same shape and
    affine (within ``affine_atol``) as the first key's (the image). Keys missing from the entry, and
    values that are not NIfTI file paths (arrays, other formats), are skipped.

    Raises:
        ValueError naming the file(s) and the problem.
    """
    headers = {}
    for key in keys:
        value = entry.get(key)
        if isinstance(value, (str, Path)) and str(value).endswith(NIFTI_SUFFIXES):
            image = _nifti_header(str(value), key)
            shape = tuple(image.shape)
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            if len(shape) != 3:
                kind = {2: "2D (one slice)", 4: "4D (a time series or several volumes)"}.get(
                    len(shape), f"{len(shape)}D"
                )
                raise ValueError(
                    f"{key} file {value}: expected a 3D volume, got a {kind} image of shape {tuple(image.shape)}."
                )
            headers[key] = (str(value), shape, image.affine)
    if not headers or keys[0] not in headers:
        return
    reference, shape, affine = headers[keys[0]]
    for key, (path, other_shape, other_affine) in headers.items():
        if key == keys[0]:
            continue
        if other_shape != shape:
            raise ValueError(
                f"{key} file {path} has shape {other_shape} but {keys[0]} file {reference} has shape {shape}: "
                "they must be in the same voxel grid."
            )
        if not np.allclose(other_affine, affine, atol=affine_atol):
            raise ValueError(
                f"{key} file {path} and {keys[0]} file {reference} have different affines (largest difference "
                f"{np.abs(other_affine - affine).max():.4g}, tolerance {affine_atol:g}): "
                "they must be in the same voxel grid.\n"
                f"{keys[0]}: {np.array2string(affine, precision=3)}\n"
                f"{key}: {np.array2string(other_affine, precision=3)}"
            )


class _VolumeCache(CacheDataset):
    """A ``CacheDataset`` whose loading errors name the volume (MONAI's say only "applying transform ...") and
    whose filling logs its progress (a line at most every 10 s: minutes at a real data set's scale)."""

    def __init__(self, data, *args, **kwargs) -> None:
        self._loaded, self._lock = 0, threading.Lock()  # items are loaded by worker threads, in any order
        self._progress = RoundProgress(logger, every_s=10.0, clock=None, units={"caching": "volumes"})
        self._progress("caching", 0, len(data))
        super().__init__(data, *args, **kwargs)
        del self._loaded, self._lock, self._progress  # filled; a lock would make it unpicklable (spawned workers)

    def _load_cache_item(self, idx: int):
        try:
            item = super()._load_cache_item(idx)
            if hasattr(self, "_lock"):  # only while __init__ fills the cache
                with self._lock:
                    self._loaded += 1
                    self._progress("caching", self._loaded, len(self.data))
            return item
        except Exception as error:
            root = error
            while root.__cause__ is not None:
                root = root.__cause__
            entry = self.data[idx]
            files = ", ".join(
                f"{k} {v}" for k, v in entry.items() if isinstance(v, (str, Path)) and k not in ("subject", "site")
            )
            raise ValueError(
                f"volume ({files}) cannot be loaded and preprocessed: {type(root).__name__}: {root}"
            ) from error


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

    Raises:
        ValueError naming the file(s): before caching (``check_volume_files``, headers only) a NIfTI file
        that cannot be read, is not 3D, or a mask whose shape or affine differs from its image's; while
        caching, a volume that cannot be loaded or preprocessed (e.g. a truncated file); after caching, a
        NaN or Inf value left in a volume after preprocessing. NaN intensities always end there (they
        spread through resampling and intensity scaling); a few Inf voxels (under 0.5 %) are clipped to
        the 99.5th percentile by the "percentile" scaling like any outlier, and then train normally.
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
        for entry in data:  # fail before minutes of caching, naming the files
            if isinstance(entry, dict):
                check_volume_files(entry, keys)
        self.data = list(data)
        self.keys = tuple(keys)
        self.slice_axis = slice_axis
        self.index_key = index_key
        self.slice_transform = slice_transform
        if isinstance(transform, Compose):
            # CacheDataset stops caching at the first Randomizable step, and a nested Compose counts as one
            transform = transform.flatten()
        self.volumes = _VolumeCache(
            self.data,
            transform=transform,
            cache_rate=1.0,
            num_workers=cache_num_workers,
            copy_cache=False,
            progress=progress,
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
                    f"volume {self._describe(position)}: expected channel-first 3D arrays of one shape "
                    f"for {self.keys}, "
                    f"got shapes {[tuple(a.shape) for a in arrays]}."
                )
            for key in self.keys:
                if key in volume and torch.is_floating_point(torch.as_tensor(volume[key])):
                    bad = int((~torch.isfinite(torch.as_tensor(volume[key]))).sum())
                    if bad:
                        raise ValueError(
                            f"volume {self._describe(position)}: {bad} NaN or Inf values in '{key}' "
                            "after preprocessing "
                            "(the file holds NaN or Inf intensities, or overflows the cache type); "
                            "fix the file or drop it from the datalist."
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
