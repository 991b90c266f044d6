"""Finding the cases under a clinician's input: NIfTI files and DICOM series, with unique output names.

Symbolic links: a link to a file is a case (its target is read, and protected from writing); a link to a
folder is not followed (a loop ``loop -> .`` or a folder outside the input would be searched again or
leave the input), and is logged; a broken link named like a NIfTI file is a case that fails with a clear
message, any other broken link is logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ["find_scans", "case_name", "dicom_series_ids", "NIFTI_SUFFIXES"]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti_name(name: str) -> bool:
    return name.endswith(NIFTI_SUFFIXES) and not name.startswith(".")


def case_name(path: Path) -> str:
    """The file name without its NIfTI extension."""
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dicom_series_ids(folder: Path) -> list[str]:
    """The DICOM series (SeriesInstanceUID) of the files directly in ``folder`` (GDCM), [] if none."""
    if not any(p.is_file() and not _is_nifti_name(p.name) and not p.name.startswith(".") for p in folder.iterdir()):
        return []
    import SimpleITK as sitk  # noqa: PLC0415  (only folders with DICOM files need it)

    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without a series
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def _walk(root: Path, skipped: Path | None):
    """(folder, files) of ``root`` and its sub-folders, hidden ones and ``skipped`` left out, links to folders
    not followed (logged)."""

    def unreadable(error: OSError) -> None:
        logger.warning(f"{error.filename}: cannot be read ({error.strerror}); its scans are not included")

    for folder, folders, files in os.walk(root, onerror=unreadable, followlinks=False):
        here = Path(folder)
        kept = []
        for name in sorted(folders):
            sub = here / name
            if name.startswith("."):
                continue
            if sub.is_symlink():
                logger.warning(
                    f"{sub}: a link to the folder {os.readlink(sub)}, not followed (copy or link its files instead)"
                )
                continue
            if _inside(sub.resolve(), skipped):
                continue
            kept.append(name)
        folders[:] = kept
        yield here, sorted(files)


def find_scans(input_path: str | Path | None, exclude: str | Path | None = None, skip=()) -> list[dict]:
    """Cases under ``input_path``: a NIfTI file, a DICOM series folder, or a folder holding NIfTI files and/or
    DICOM series folders (searched recursively).

    Each case: ``image`` (file or folder), ``case`` (a name for its outputs: the file name without extension,
    prefixed by its sub-folders, unique: a repeated name gets ``_2``, ``_3``..., never one already taken),
    ``format`` ("nifti" or "dicom"), ``series`` (DICOM series id). Hidden files and folders (names starting with
    ".", e.g. the temporary files of an interrupted write) are skipped, and so is ``exclude`` (e.g. the output
    folder) when it lies strictly inside ``input_path``, and every file whose real path is in ``skip`` (the
    outputs of earlier runs), so a rerun never takes earlier masks as scans.

    Raises:
        ValueError: no input given, or a file that is not NIfTI.
        FileNotFoundError: the path does not exist, or holds no NIfTI file and no DICOM series.
        PermissionError: the input folder cannot be read.
    """
    if not input_path:
        raise ValueError(
            "no input given: pass --dataset_dir with a NIfTI file, a folder of NIfTI files or DICOM series."
        )
    input_path = Path(input_path)
    if input_path.is_symlink() and not input_path.exists():
        raise FileNotFoundError(f"input {input_path} is a broken link (to {os.readlink(input_path)}).")
    if not input_path.exists():
        raise FileNotFoundError(f"input {input_path} does not exist.")
    if input_path.is_file():
        if not input_path.name.endswith(NIFTI_SUFFIXES):
            raise ValueError(f"input {input_path} is neither a NIfTI file (.nii, .nii.gz) nor a folder.")
        return [{"image": str(input_path), "case": case_name(input_path), "format": "nifti"}]
    if not os.access(input_path, os.R_OK | os.X_OK):
        raise PermissionError(f"input folder {input_path} cannot be read (permission denied).")
    skipped = Path(exclude).resolve() if exclude else None
    if skipped is not None and skipped == input_path.resolve():
        skipped = None
    skip = {os.path.realpath(p) for p in skip}
    cases = []
    for folder, files in _walk(input_path, skipped):
        relative = folder.relative_to(input_path).parts
        for name in files:
            file = folder / name
            if name.startswith("."):
                continue
            if file.is_symlink() and not file.exists():
                if _is_nifti_name(name):  # a case that fails when read, with the reason in its row
                    cases.append(
                        {"image": str(file), "case": "_".join([*relative, case_name(file)]), "format": "nifti"}
                    )
                else:
                    logger.warning(f"{file}: a broken link (to {os.readlink(file)}), skipped")
                continue
            if _is_nifti_name(name) and os.path.realpath(file) not in skip:
                cases.append({"image": str(file), "case": "_".join([*relative, case_name(file)]), "format": "nifti"})
        for number, series in enumerate(dicom_series_ids(folder)):
            name = "_".join(relative) or folder.name
            cases.append(
                {
                    "image": str(folder),
                    "case": name if number == 0 else f"{name}_{number}",
                    "format": "dicom",
                    "series": series,
                }
            )
    if not cases:
        raise FileNotFoundError(f"{input_path}: no NIfTI file (.nii, .nii.gz) and no DICOM series under it.")
    # unique names: a.nii and a.nii.gz side by side, or a.nii, a.nii.gz and a_2.nii.gz, never share outputs
    wanted = [case["case"] for case in cases]
    assigned: set[str] = set()
    for index, case in enumerate(cases):
        name, number = case["case"], 1
        others = {n.lower() for i, n in enumerate(wanted) if i != index and n != case["case"]}
        while name.lower() in assigned or name.lower() in others:
            number += 1
            name = f"{case['case']}_{number}"
        case["case"] = name
        assigned.add(name.lower())
    return cases
