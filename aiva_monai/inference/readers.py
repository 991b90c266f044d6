"""Reading a case into a (1, X, Y, Z) MetaTensor in RAS millimetres, with the header checks that turn a
scan the pipeline would get silently wrong into a clear per-case error (or a warning in its row)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

if TYPE_CHECKING:
    import SimpleITK

__all__ = [
    "read_scan",
    "read_dicom_series",
    "dicom_series_files",
    "check_affine",
    "LoadScand",
    "PLAUSIBLE_SPACING_MM",
    "MAX_RESAMPLED_VOXELS",
]

# voxel sizes outside this range (mm) are a header error (e.g. pixdim in microns), not an MRI scan
PLAUSIBLE_SPACING_MM = (0.01, 50.0)
# the largest grid preprocessing may resample a scan to (about 2 GB as float32): a guard against a wrong header
MAX_RESAMPLED_VOXELS = 512**3
# relative tolerance on DICOM slice spacing before a gap counts as missing slices
SLICE_GAP_TOLERANCE = 0.05
SHEAR_TOLERANCE_DEGREES = 0.1


def dicom_series_files(folder: str | Path, series: str = "") -> list[str]:
    """The files of one DICOM series in ``folder``, in GDCM's slice order."""
    import SimpleITK as sitk  # noqa: PLC0415  (only DICOM inputs need it: NIfTI runs go without its 50 MB)

    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series or ""))


def _floats(text: str) -> np.ndarray:
    return np.asarray([float(v) for v in text.replace(" ", "").split("\\") if v != ""], dtype=np.float64)


def _check_slices(path, files: list[str], reader: SimpleITK.ImageSeriesReader) -> None:
    """Slices of one series: same orientation and size, evenly spaced along the slice normal, no duplicates.

    Raises ValueError naming the folder, the files and the gap: ITK would make the grid uniform in silence
    (a missing slice at 2 mm gives 2.02 mm everywhere) or stack two acquisitions into one volume."""
    if len(files) < 2:
        return
    try:
        positions = np.stack([_floats(reader.GetMetaData(i, "0020|0032")) for i in range(len(files))])
        orientations = np.stack([_floats(reader.GetMetaData(i, "0020|0037")) for i in range(len(files))])
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"{path}: a slice lacks Image Position / Orientation (Patient) ({error}); cannot check the slice order."
        ) from error
    if positions.shape[1] != 3 or orientations.shape[1] != 6:
        raise ValueError(f"{path}: malformed Image Position / Orientation (Patient) tags.")
    if np.abs(orientations - orientations[0]).max() > 1e-3:
        changed = int(np.argmax(np.abs(orientations - orientations[0]).max(1)))
        raise ValueError(
            f"{path}: slices of different orientations in one series "
            f"({Path(files[0]).name} and {Path(files[changed]).name}): "
            "mixed series or a localizer; export the series alone."
        )
    normal = np.cross(orientations[0, :3], orientations[0, 3:])
    depth = positions @ normal
    ordered = np.argsort(depth, kind="stable")
    close = np.abs(np.diff(depth[ordered])) < 1e-3
    if close.any():
        first = int(np.argmax(close))
        raise ValueError(
            f"{path}: {int(close.sum()) + 1} slices share a position with another "
            f"({Path(files[ordered[first]]).name} and {Path(files[ordered[first + 1]]).name}): several acquisitions or "
            "mixed series in one series; export each acquisition as its own series."
        )
    steps = np.diff(depth)
    spacing = float(np.median(np.abs(steps)))
    worst = int(np.argmax(np.abs(np.abs(steps) - spacing)))
    if abs(abs(steps[worst]) - spacing) > SLICE_GAP_TOLERANCE * spacing or np.any(np.sign(steps) != np.sign(steps[0])):
        missing = abs(steps[worst]) / spacing - 1
        raise ValueError(
            f"{path}: uneven slice spacing: {abs(steps[worst]):.3g} mm between {Path(files[worst]).name} and "
            f"{Path(files[worst + 1]).name}, {spacing:.3g} mm elsewhere"
            + (f" (about {missing:.0f} slice(s) missing)" if missing >= 0.5 else "")
            + "; the series is incomplete or mixed: export it again."
        )


def read_dicom_series(folder: str | Path, series: str = "") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(array (X, Y, Z) float32, RAS affine (4, 4), slice files in order) of one DICOM series, after
    ``_check_slices``. LPS (DICOM) is converted to RAS."""
    files = dicom_series_files(folder, series)
    if not files:
        raise ValueError(f"{folder}: no DICOM series {series!r} in this folder.")
    import SimpleITK as sitk  # noqa: PLC0415  (only DICOM inputs need it)

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's "non uniform sampling" goes to stderr only: checked below
    try:
        image = reader.Execute()
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    _check_slices(folder, files, reader)
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    return array, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, files


def check_affine(path, affine: np.ndarray) -> None:
    """Raises ValueError for a singular or non-finite affine or implausible voxel sizes; warns (the warning
    goes to the case's row) for a sheared one, whose voxel volume is |det| and whose overlay shows the
    nearest orthogonal grid."""
    linear = np.asarray(affine, dtype=np.float64)[:3, :3]
    if not np.isfinite(linear).all() or abs(np.linalg.det(linear)) < 1e-9:
        raise ValueError(
            f"{path}: the header's affine is singular or not finite ({np.round(linear, 4).tolist()}): "
            "voxels have no position in space; fix the header (qform/sform)."
        )
    spacing = np.linalg.norm(linear, axis=0)
    low, high = PLAUSIBLE_SPACING_MM
    if spacing.min() < low or spacing.max() > high:
        raise ValueError(
            f"{path}: voxel size {np.round(spacing, 4).tolist()} mm is implausible for an MRI scan "
            f"(expected {low:g}-{high:g} mm): is the header in microns or metres? fix pixdim."
        )
    unit = linear / spacing
    cosines = np.abs(unit.T @ unit - np.eye(3)).max()
    off = 90.0 - np.degrees(np.arccos(min(cosines, 1.0)))
    if off > SHEAR_TOLERANCE_DEGREES:
        warnings.warn(
            f"{path}: the affine is sheared (voxel axes {off:.1f} degrees from perpendicular): volumes use its "
            "determinant, the overlay shows the nearest orthogonal grid",
            stacklevel=2,
        )


def read_scan(case: dict) -> MetaTensor:
    """A (1, X, Y, Z) float32 MetaTensor whose affine maps voxels to RAS millimetres.

    NIfTI files are read with nibabel; DICOM series with SimpleITK (LPS converted to RAS), after checking that
    the slices are evenly spaced, of one orientation and not duplicated. A 4D file whose last axis has
    length 1 is taken as 3D.

    Raises:
        ValueError naming the file when it cannot be read (corrupt, truncated, not an image, a broken link),
        is not a 3D image (2D, 4D time series / multi-channel, a single slice (X, Y, 1)), holds NaN or Inf
        intensities, has a singular affine or implausible voxel sizes, or is a DICOM series with missing,
        duplicate or mixed slices.
    """
    path = case["image"]
    kind = case.get("format", "nifti")
    if os.path.islink(path) and not os.path.exists(path):
        raise ValueError(f"{path}: a broken link (to {os.readlink(path)}): the file it points to does not exist.")
    try:
        if kind == "dicom":
            array, affine, _ = read_dicom_series(path, case.get("series", ""))
        else:
            loaded = nib.load(path)
            affine = loaded.affine
            check_affine(path, affine)  # before the data: a wrong header must not allocate terabytes
            array = np.asarray(loaded.dataobj, dtype=np.float32)
    except ValueError as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: cannot be read as a {kind} image ({error}).") from error
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a {kind} image ({error}).") from error
    if kind == "dicom":
        check_affine(path, affine)
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        shape = {2: "a 2D image (one slice)", 4: "a 4D image (a time series or several volumes)"}.get(
            array.ndim, f"a {array.ndim}D array"
        )
        raise ValueError(f"{path}: expected a 3D image, got {shape} of shape {array.shape}.")
    if min(array.shape) < 2:
        raise ValueError(
            f"{path}: a single slice of shape {array.shape}: expected a volume with at least 2 voxels along each axis."
        )
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise ValueError(
            f"{path}: {nan} NaN and {int((~finite).sum()) - nan} Inf intensities (of {array.size} voxels); "
            "a scan with missing values is not segmented: fix or re-export the file."
        )
    meta = {
        "filename_or_obj": path,
        "original_affine": torch.as_tensor(affine),
        "spatial_shape": np.asarray(array.shape),
    }
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine), meta=meta)


class LoadScand(MapTransform):
    """Reads ``data[key]`` (a case from ``find_scans``) into a (1, X, Y, Z) MetaTensor.

    Args:
        native_key: also keep the image as read (input grid, before any preprocessing) under this key,
            as a plain tensor, for ``SaveOverlayd``; None keeps nothing. Not ``<key>_...``: MONAI's
            ``Spacingd`` takes every ``image_*`` entry for a metadata dict.
        pixdim: the spacing preprocessing resamples to (0 or None on an axis: kept), to refuse a scan whose
            resampled grid would exceed ``max_voxels`` (a header error, not a scan) before allocating it.
        max_voxels: that limit.
    """

    def __init__(
        self, keys="image", native_key: str | None = None, pixdim=None, max_voxels: int = MAX_RESAMPLED_VOXELS
    ) -> None:
        super().__init__(keys)
        self.native_key = native_key
        self.pixdim = None if pixdim is None else np.asarray(pixdim, dtype=np.float64)
        self.max_voxels = int(max_voxels)

    def _check_resampled_size(self, image: MetaTensor, path) -> None:
        if self.pixdim is None:
            return
        shape = np.asarray(image.shape[1:], dtype=np.float64)
        spacing = np.linalg.norm(np.asarray(image.affine, dtype=np.float64)[:3, :3], axis=0)
        target = np.where(
            self.pixdim > 0, np.ceil(shape * spacing / np.where(self.pixdim > 0, self.pixdim, 1.0)), shape
        )
        if float(np.prod(target)) > self.max_voxels:
            raise ValueError(
                f"{path}: resampling to {self.pixdim.tolist()} mm would make a grid of "
                f"{' x '.join(str(int(n)) for n in target)} "
                f"voxels (more than {self.max_voxels}): check the header's voxel size."
            )

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = read_scan({**data, "image": data[key]})
            self._check_resampled_size(out[key], data[key])
            if self.native_key:
                out[self.native_key] = out[key].as_tensor().clone()
        return out
