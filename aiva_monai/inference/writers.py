"""Writers of a case's outputs (mask, overlay PNG), through ``OutputFolder``: atomic, never over an input."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from aiva_monai.inference.outputs import OutputFolder

__all__ = ["SaveMaskd", "SaveOverlayd", "save_overlay", "voxel_volume_ml"]


def _folder(outputs, suffix: str | None) -> OutputFolder:
    """``outputs`` as an ``OutputFolder`` (a path makes one, for use outside the bundle's evaluator)."""
    if isinstance(outputs, OutputFolder):
        return outputs
    return OutputFolder(outputs if outputs is not None else ".", suffix=suffix if suffix is not None else "_mask")


def _source(data: dict, image_key: str) -> str | None:
    image = data.get(image_key)
    if isinstance(image, MetaTensor):
        return str(image.meta.get("filename_or_obj", "")) or None
    return data.get("input")


def voxel_volume_ml(affine) -> float:
    """The volume of one voxel in mL: |det| of the affine's 3 x 3 part (right for sheared grids too)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])) / 1000.0)


class SaveMaskd(MapTransform):
    """Writes ``data[key]`` (a (1, X, Y, Z) label map already in the input's grid) as the case's mask
    (``outputs.path_for(case, "mask")``: ``<output_dir>/<case><suffix>.nii.gz``) with the input's affine,
    atomically, never over an input.

    Adds ``mask_path`` and ``mask_ml`` (foreground volume in mL, voxel volume = |det(affine)|) to the data.

    Args:
        outputs: the shared ``OutputFolder`` (or a folder path: one is made with ``suffix``).
        suffix: only with a folder path.
        image_key: the input image (its file is protected even without ``OutputFolder.protect``).
    """

    def __init__(self, keys="pred", outputs=None, suffix: str | None = None, image_key="image") -> None:
        super().__init__(keys)
        self.outputs = _folder(outputs, suffix)
        self.image_key = image_key

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            mask = out[key]
            affine = np.asarray(
                mask.affine if isinstance(mask, MetaTensor) else out[self.image_key].affine, dtype=np.float64
            )
            array = np.asarray(mask.detach().cpu()).astype(np.uint8)[0]
            target = self.outputs.path_for(out.get("case", "case"), "mask")
            with self.outputs.atomic(target, also=[_source(out, self.image_key)]) as temporary:
                nib.save(nib.Nifti1Image(array, affine), str(temporary))
            out["mask_path"] = str(target)
            out["mask_ml"] = float(array.astype(bool).sum() * voxel_volume_ml(affine))
        return out


class SaveOverlayd(MapTransform):
    """Writes an overlay PNG for visual QA (``outputs.path_for(case, "overlay")``): slices of the image as
    read (``image_key``, from ``LoadScand(native_key=...)``) with ``data[key]`` (the mask in the same grid)
    outlined. Adds ``overlay_path``. See ``save_overlay``.
    """

    def __init__(
        self, keys="pred", image_key="native_image", outputs=None, suffix: str | None = None, organ: str = ""
    ) -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.outputs = _folder(outputs, suffix)
        self.organ = organ

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            mask = out[key]
            affine = mask.affine if isinstance(mask, MetaTensor) else out["image"].meta.get("original_affine")
            image = np.asarray(torch.as_tensor(out[self.image_key]).detach().cpu(), dtype=np.float32)
            case = out.get("case", "case")
            title = f"{case}: {self.organ} mask {out['mask_ml']:.1f} mL" if "mask_ml" in out else str(case)
            target = self.outputs.path_for(case, "overlay")
            labels = np.asarray(mask.detach().cpu())[0]
            with self.outputs.atomic(target, also=[_source(out, "image")]) as temporary:
                save_overlay(
                    image[0] if image.ndim == 4 else image,
                    labels,
                    np.asarray(affine, dtype=np.float64),
                    temporary,
                    title=title,
                )
            out["overlay_path"] = str(target)
        return out


def _display_slices(volume: np.ndarray, mask: np.ndarray, spacing: np.ndarray):
    """(name, image slice, mask slice, aspect) panels of a volume in (approximately) RAS voxel order:
    sagittal, coronal, axial through the mask's centre, then three axial slices across the mask."""
    present = np.argwhere(mask > 0)
    if len(present):
        centre = present.mean(0).round().astype(int)
        low, high = present[:, 2].min(), present[:, 2].max()
    else:
        centre = np.asarray(volume.shape) // 2
        low, high = 0, volume.shape[2] - 1
    panels = [
        ("sagittal", volume[centre[0]].T, mask[centre[0]].T, spacing[2] / spacing[1]),
        ("coronal", volume[:, centre[1]].T, mask[:, centre[1]].T, spacing[2] / spacing[0]),
        ("axial", volume[:, :, centre[2]].T, mask[:, :, centre[2]].T, spacing[1] / spacing[0]),
    ]
    for name, fraction in (("inferior", 0.2), ("middle", 0.5), ("superior", 0.8)):
        z = int(round(low + fraction * (high - low)))
        panels.append((f"axial, {name}", volume[:, :, z].T, mask[:, :, z].T, spacing[1] / spacing[0]))
    return panels


def save_overlay(image, mask, affine, path: str | Path, title: str = "") -> Path:
    """A 2 x 3 figure of ``image`` (X, Y, Z) with ``mask`` (same grid) filled and outlined in red: sagittal,
    coronal and axial slices through the mask's centre, then three axial slices spread over the mask.

    The slices are of the input's own grid, not resampled: voxel axes are only permuted and flipped to the
    closest RAS orientation (``nibabel.orientations.io_orientation``), the aspect ratio follows the voxel
    spacing, and the patient's right is on the image's right. Written atomically.
    """
    from aiva_monai.visualize import plt, save_figure_atomic  # noqa: PLC0415  (pyplot on the Agg backend)

    affine = np.asarray(affine, dtype=np.float64)
    if np.shape(image) != np.shape(mask) or np.ndim(image) != 3:
        raise ValueError(
            f"{path}: the overlay needs a 3D image and a mask of the same shape, "
            f"got {np.shape(image)} and {np.shape(mask)}."
        )
    orientation = nib.orientations.io_orientation(affine)
    volume = nib.orientations.apply_orientation(np.asarray(image, dtype=np.float32), orientation)
    labels = nib.orientations.apply_orientation((np.asarray(mask) > 0).astype(np.uint8), orientation)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = np.percentile(volume, [1.0, 99.5]) if volume.size else (0.0, 1.0)
    figure, axes = plt.subplots(2, 3, figsize=(10.5, 7.5))
    for axis, (name, picture, labelled, aspect) in zip(axes.flat, _display_slices(volume, labels, spacing)):
        axis.imshow(
            picture,
            cmap="gray",
            vmin=low,
            vmax=high if high > low else low + 1,
            origin="lower",
            aspect=aspect,
            interpolation="nearest",
        )
        if labelled.any():
            axis.imshow(
                np.ma.masked_equal(labelled, 0),
                cmap="autumn",
                alpha=0.3,
                origin="lower",
                aspect=aspect,
                interpolation="nearest",
            )
            axis.contour(labelled, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
    figure.suptitle(
        f"{title}\n(input grid, not resampled; patient right on image right)"
        if title
        else "input grid, not resampled; patient right on image right",
        fontsize=10,
    )
    figure.tight_layout()
    return save_figure_atomic(figure, path, dpi=90)
