"""Inference on a clinician's scans: NIfTI files or DICOM series in, masks in each input's own geometry out."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform

from aiva_monai.io import write_nifti_atomic

__all__ = ["find_scans", "read_scan", "LoadScand", "SaveMaskd"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES)


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dicom_series(folder: Path) -> list[str]:
    if not any(p.is_file() and not _is_nifti(p) for p in folder.iterdir()):
        return []
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without a series
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)


def find_scans(input_path: str | Path) -> list[dict]:
    """Cases under ``input_path``: a NIfTI file, a DICOM series folder, or a folder holding NIfTI
    files and/or DICOM series folders (searched recursively). Each case: ``image`` (file or folder),
    ``case`` (a name for its outputs), ``format`` ("nifti" or "dicom"), ``series`` (DICOM series id).

    Raises:
        FileNotFoundError: the path does not exist, or holds no NIfTI file and no DICOM series.
    """
    if not input_path:
        raise ValueError("no input given: pass --dataset_dir with a NIfTI file, a folder of NIfTI files or DICOM series.")
    input_path = Path(input_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input {input_path} does not exist.")
    if input_path.is_file():
        if not _is_nifti(input_path):
            raise ValueError(f"input {input_path} is neither a NIfTI file (.nii, .nii.gz) nor a folder.")
        return [{"image": str(input_path), "case": _case_name(input_path), "format": "nifti"}]
    cases = []
    folders = [input_path, *sorted(p for p in input_path.rglob("*") if p.is_dir())]
    for folder in folders:
        for file in sorted(folder.iterdir()):
            if _is_nifti(file):
                relative = file.relative_to(input_path).parent
                prefix = "_".join(relative.parts)
                cases.append({"image": str(file), "case": f"{prefix}_{_case_name(file)}" if prefix else _case_name(file), "format": "nifti"})
        for number, series in enumerate(_dicom_series(folder)):
            name = "_".join(folder.relative_to(input_path).parts) or folder.name
            cases.append({"image": str(folder), "case": name if number == 0 else f"{name}_{number}", "format": "dicom", "series": series})
    if not cases:
        raise FileNotFoundError(f"{input_path}: no NIfTI file (.nii, .nii.gz) and no DICOM series under it.")
    return cases


def read_scan(case: dict) -> MetaTensor:
    """A (1, X, Y, Z) float32 MetaTensor whose affine maps voxels to RAS millimetres.

    NIfTI files are read with nibabel; DICOM series with SimpleITK (LPS converted to RAS).

    Raises:
        ValueError naming the file when it cannot be read or is not a 3D image.
    """
    path = case["image"]
    try:
        if case.get("format", "nifti") == "dicom":
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(path, case.get("series", "")))
            image = reader.Execute()
            array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
            direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
            lps = np.eye(4)
            lps[:3, :3] = direction * np.asarray(image.GetSpacing())
            lps[:3, 3] = image.GetOrigin()
            affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
        else:
            loaded = nib.load(path)
            array = np.asarray(loaded.dataobj, dtype=np.float32)
            affine = loaded.affine
    except Exception as error:
        raise ValueError(f"{path}: cannot be read as a {case.get('format', 'nifti')} image ({error}).") from None
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise ValueError(f"{path}: expected a 3D image, got an array of shape {array.shape}.")
    meta = {"filename_or_obj": path, "original_affine": torch.as_tensor(affine), "spatial_shape": np.asarray(array.shape)}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine), meta=meta)


class LoadScand(MapTransform):
    """Reads ``data[key]`` (a case from ``find_scans``) into a (1, X, Y, Z) MetaTensor."""

    def __init__(self, keys="image") -> None:
        super().__init__(keys)

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = read_scan({**data, "image": data[key]})
        return out


class SaveMaskd(MapTransform):
    """Writes ``data[key]`` (a (1, X, Y, Z) label map already in the input's grid) as
    ``<output_dir>/<case><suffix>.nii.gz`` with the input's affine, through a temporary file renamed
    when complete. Refuses to write onto an input file.

    Adds ``mask_path`` and ``mask_ml`` (foreground volume in mL) to the data.
    """

    def __init__(self, keys="pred", output_dir=".", suffix="_mask", image_key="image") -> None:
        super().__init__(keys)
        self.output_dir = Path(output_dir)
        self.suffix = suffix
        self.image_key = image_key

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            mask = out[key]
            affine = np.asarray(mask.affine if isinstance(mask, MetaTensor) else out[self.image_key].affine, dtype=np.float64)
            array = np.asarray(mask.detach().cpu()).astype(np.uint8)[0]
            target = self.output_dir / f"{out.get('case', 'case')}{self.suffix}.nii.gz"
            source = Path(str(out[self.image_key].meta.get("filename_or_obj", ""))) if isinstance(out[self.image_key], MetaTensor) else None
            if source is not None and source.exists() and target.resolve() == source.resolve():
                raise ValueError(f"{target}: refusing to overwrite the input scan; choose another output_dir.")
            write_nifti_atomic(array, affine, target)
            spacing = np.linalg.norm(affine[:3, :3], axis=0)
            out["mask_path"] = str(target)
            out["mask_ml"] = float(array.astype(bool).sum() * np.prod(spacing) / 1000.0)
        return out
