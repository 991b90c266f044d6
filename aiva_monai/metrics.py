"""Per-volume 3D surface Dice in millimetres, with each volume's own voxel spacing."""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import SurfaceDiceMetric
from monai.metrics.surface_dice import compute_surface_dice

__all__ = ["voxel_spacing", "VolumeSurfaceDiceMetric"]


def voxel_spacing(image: torch.Tensor) -> list[np.ndarray]:
    """Physical size (mm) of a voxel along each array axis, from the MetaTensor's affine.

    Args:
        image: (B, C, *spatial) MetaTensor; its affine is (4, 4) (shared) or (B, 4, 4).

    Returns:
        B arrays of len(spatial) spacings, in the order of the array's spatial axes: the norm of
        the affine's i-th column is the step in mm of the i-th array index, whatever the orientation.
    """
    if not isinstance(image, MetaTensor):
        raise ValueError(
            "surface Dice needs each volume's voxel spacing: pass MetaTensors that carry their affine "
            "(MONAI LoadImage keeps it), or give spacing= explicitly."
        )
    n_spatial = image.ndim - 2
    affine = torch.as_tensor(image.affine, dtype=torch.float64).cpu()
    if affine.ndim == 2:
        affine = affine[None].expand(image.shape[0], -1, -1)
    if affine.shape[0] != image.shape[0]:
        raise ValueError(f"{affine.shape[0]} affines for a batch of {image.shape[0]} volumes.")
    return [np.linalg.norm(a[:n_spatial, :n_spatial].numpy(), axis=0) for a in affine]


class VolumeSurfaceDiceMetric(SurfaceDiceMetric):
    """MONAI ``SurfaceDiceMetric`` with the tolerance in millimetres and the spacing read per volume.

    Args:
        tolerance_mm: accepted boundary deviation, in mm (paper: 1 mm), for every foreground class.
        include_background: score the background channel too.
        use_subvoxels: DeepMind surface-distance boundary elements (the reference's library); False
            counts boundary voxels instead.
        reduction, get_not_nans: as ``SurfaceDiceMetric``.

    Inputs are one-hot (B, C, *spatial) predictions and labels; the spacing of each volume comes from
    the label's (else the prediction's) affine, so volumes of different resolutions can share a batch.
    """

    def __init__(
        self,
        tolerance_mm: float = 1.0,
        include_background: bool = False,
        use_subvoxels: bool = True,
        reduction="mean",
        get_not_nans: bool = False,
    ) -> None:
        if not np.isfinite(tolerance_mm) or tolerance_mm < 0:
            raise ValueError(f"tolerance_mm must be a finite value >= 0, got {tolerance_mm}.")
        super().__init__(
            class_thresholds=[float(tolerance_mm)],
            include_background=include_background,
            reduction=reduction,
            get_not_nans=get_not_nans,
            use_subvoxels=use_subvoxels,
        )
        self.tolerance_mm = float(tolerance_mm)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:  # type: ignore[override]
        spacing = kwargs.get("spacing")
        if spacing is None:
            spacing = voxel_spacing(y if isinstance(y, MetaTensor) else y_pred)
        n_classes = y_pred.shape[1] - (0 if self.include_background else 1)
        return compute_surface_dice(
            y_pred=y_pred,
            y=y,
            class_thresholds=[self.tolerance_mm] * n_classes,
            include_background=self.include_background,
            distance_metric="euclidean",
            spacing=spacing,
            use_subvoxels=self.use_subvoxels,
        )
