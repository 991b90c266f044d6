"""3D preprocessing chains (MONAI transforms) for the AIVA data sets."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.transforms import (
    AsDiscreted,
    Compose,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
)

from aiva_monai.data.simulate import SimulateScannerd

__all__ = ["volume_transforms", "NeighbourSlicesd"]


class NeighbourSlicesd(MapTransform):
    """Adds the ``context`` neighbouring slices on each side as extra channels (2.5D input, as the
    prostate reference code does): (C, X, Y, Z) -> (C * (2 * context + 1), X, Y, Z), channel order
    slice ``s - context`` ... ``s + context``, edges repeated. Geometry is unchanged, so slicing the
    result along ``slice_axis`` gives each slice with its neighbours, for training and 3D inference alike.
    """

    def __init__(self, keys, slice_axis: int, context: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if context < 0:
            raise ValueError(f"context must be >= 0, got {context}.")
        self.slice_axis = int(slice_axis)
        self.context = int(context)

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            volume = torch.as_tensor(out[key])
            axis = self.slice_axis + 1
            length = volume.shape[axis]
            positions = torch.arange(length, device=volume.device)
            shifted = [
                volume.index_select(axis, (positions + offset).clamp(0, length - 1))
                for offset in range(-self.context, self.context + 1)
            ]
            out[key] = torch.cat(shifted, dim=0)
        return out


def volume_transforms(
    keys: Sequence[str] = ("image", "label"),
    pixdim: Sequence[float] | None = (1.0, 1.0, 1.0),
    in_plane_size: Sequence[int] = (256, 256),
    slice_axis: int = 0,
    intensity: str = "percentile",
    percentiles: Sequence[float] = (0.5, 99.5),
    load: bool = True,
    compact: bool = True,
    merge_labels: bool = False,
    context_slices: int = 0,
) -> Compose:
    """Load and preprocess a 3D volume for slicing.

    Orientation RAS; optional resampling to ``pixdim`` mm (bilinear for the image, nearest for the
    others); intensities either clipped at percentiles and scaled to [0, 1] (``"percentile"``, brain)
    or to zero mean and unit variance over the volume (``"zscore"``, prostate); in-plane pad/crop to
    ``in_plane_size`` (the slice axis keeps its length). Cached as float16 image / uint8 masks, which
    halves (quarters) the cache; ``SliceDataset`` hands out float32.

    Args:
        keys: the image key first, then the mask keys; masks may be missing (unlabelled target data).
        pixdim: target voxel size in mm, or None to keep the native grid.
        in_plane_size: (H, W) of every slice.
        slice_axis: the axis slices are taken along (0: sagittal, 1: coronal, 2: axial in RAS).
        intensity: "percentile" or "zscore".
        percentiles: the (lower, upper) clipping percentiles for "percentile".
        load: start with ``LoadImaged``, then give the entries that carry a ``"simulate"`` key their
            simulated scanner change (``aiva_monai.data.simulate.SimulateScannerd``); False when the
            dicts already hold arrays (inference), which also skips the simulation.
        compact: end with the compact cache types (float16 image, uint8 masks) for slice caches;
            False keeps float32, what 3D evaluation and inference feed the network directly.
        merge_labels: masks with labels above 1 (e.g. prostate zones) become one foreground label.
        context_slices: add this many neighbouring slices on each side as image channels
            (``NeighbourSlicesd``); the network then takes ``2 * context_slices + 1`` input channels.
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    image_key, masks = keys[0], keys[1:]
    lower_percentile, upper_percentile = percentiles
    spatial_size = list(in_plane_size)
    spatial_size.insert(slice_axis, -1)
    chain = []
    if load:
        chain.append(LoadImaged(keys, image_only=True, ensure_channel_first=True, allow_missing_keys=True))
        chain.append(SimulateScannerd(image_key, "simulate"))
    if merge_labels and masks:
        chain.append(AsDiscreted(masks, threshold=0.5, allow_missing_keys=True))
    chain.append(
        Orientationd(keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")), allow_missing_keys=True)
    )
    if pixdim is not None:
        modes = ["bilinear" if k == image_key else "nearest" for k in keys]
        chain.append(Spacingd(keys, pixdim=tuple(pixdim), mode=modes, allow_missing_keys=True))
    if intensity == "percentile":
        chain.append(
            ScaleIntensityRangePercentilesd(
                image_key, lower=lower_percentile, upper=upper_percentile, b_min=0.0, b_max=1.0, clip=True
            )
        )
    elif intensity == "zscore":
        chain.append(NormalizeIntensityd(image_key))
    else:
        raise ValueError(f"intensity must be 'percentile' or 'zscore', got {intensity!r}.")
    chain.append(ResizeWithPadOrCropd(keys, spatial_size=spatial_size, allow_missing_keys=True))
    if context_slices:
        chain.append(NeighbourSlicesd(image_key, slice_axis, context_slices))
    if compact:
        chain.append(EnsureTyped(image_key, dtype=torch.float16 if intensity == "percentile" else torch.float32))
        if masks:
            chain.append(EnsureTyped(masks, dtype=torch.uint8, allow_missing_keys=True))
    else:
        chain.append(EnsureTyped(keys, dtype=torch.float32, allow_missing_keys=True))
    return Compose(chain)
