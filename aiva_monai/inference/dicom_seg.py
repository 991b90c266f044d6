"""DICOM Segmentation (SEG) output for a DICOM series input, written with highdicom: the mask as one binary
segment that references the source series (Study / Series / SOP Instance UIDs, frame of reference, the
slices' geometry), so PACS, OHIF or 3D Slicer show it over the series."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from monai.transforms import MapTransform

from aiva_monai.inference.outputs import OutputFolder
from aiva_monai.inference.readers import dicom_series_files

__all__ = ["write_dicom_seg", "SaveDicomSegd"]

logger = logging.getLogger(__name__)


def _code(name: str):
    """A SNOMED CT code by its pydicom keyword ("Brain", "Prostate", "AnatomicalStructure")."""
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    return getattr(codes.SCT, name)


def write_dicom_seg(
    mask_xyz: np.ndarray,
    series_files: list[str],
    path,
    outputs: OutputFolder,
    *,
    label: str,
    property_type: str,
    property_category: str = "AnatomicalStructure",
    algorithm: str = "aiva-monai",
    version: str = "0.1.0",
    description: str | None = None,
) -> Path:
    """Writes ``mask_xyz`` (X, Y, Z) label map of the series read by ``read_dicom_series`` (voxel (x, y, z) =
    column x, row y of ``series_files[z]``) as a binary DICOM SEG at ``path`` (through ``outputs``: atomic, never
    over an input). Empty slices are left out of the SEG (highdicom's default), as viewers expect.

    Args:
        label: the segment label ("brain"); ``property_type`` / ``property_category``: SNOMED CT keywords
            (pydicom ``codes.SCT``: "Brain", "Prostate"; "AnatomicalStructure").
        algorithm, version: the algorithm identification (the bundle's name and version).
        description: the SEG's content description (default: "<label> segmentation by <algorithm>").
    """
    import highdicom as hd  # noqa: PLC0415  (only DICOM inputs need it)
    import pydicom  # noqa: PLC0415
    from pydicom.sr.codedict import codes  # noqa: PLC0415

    sources = [pydicom.dcmread(file, stop_before_pixels=True) for file in series_files]
    frames = np.ascontiguousarray(np.asarray(mask_xyz).transpose(2, 1, 0) > 0)  # (x, y, z) -> (slice, row, column)
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise ValueError(
            f"{path}: mask of shape {np.shape(mask_xyz)} does not fit the series ({len(sources)} slices of "
            f"{sources[0].Columns} x {sources[0].Rows})."
        )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=_code(property_category),
        segmented_property_type=_code(property_type),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm[:64], version=version[:64], family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=int(getattr(sources[0], "SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="aiva-monai",
        manufacturer_model_name=algorithm[:64],
        software_versions=version[:64],
        device_serial_number="none",
        content_description=(description or f"{label} segmentation by {algorithm}")[:64],
        content_label="SEGMENTATION",
    )
    with outputs.atomic(path, also=series_files) as temporary:
        seg.save_as(str(temporary))
    return Path(path)


class SaveDicomSegd(MapTransform):
    """For a DICOM series case (``data["format"] == "dicom"``): writes ``data[key]`` (a (1, X, Y, Z) label map in
    the series' grid, after ``SaveMaskd``) as ``outputs.path_for(case, "seg")`` (``<case><suffix>.seg.dcm``) and
    adds ``seg_path``. Other cases pass through unchanged.

    Args:
        outputs: the shared ``OutputFolder``.
        label, property_type, property_category, algorithm, version: as ``write_dicom_seg`` (the bundle config
            takes them from its metadata).
    """

    def __init__(
        self,
        keys="pred",
        outputs: OutputFolder | None = None,
        label: str = "mask",
        property_type: str = "AnatomicalStructure",
        property_category: str = "AnatomicalStructure",
        algorithm: str = "aiva-monai",
        version: str = "0.1.0",
    ) -> None:
        super().__init__(keys)
        self.outputs = outputs if outputs is not None else OutputFolder(".")
        self.options = {
            "label": label,
            "property_type": property_type,
            "property_category": property_category,
            "algorithm": algorithm,
            "version": version,
        }

    def __call__(self, data):
        if data.get("format") != "dicom":
            return data
        out = dict(data)
        for key in self.key_iterator(out):
            mask = np.asarray(out[key].detach().cpu())[0]
            files = dicom_series_files(
                out["input"] if "input" in out else out["image"].meta["filename_or_obj"], out.get("series", "")
            )
            target = self.outputs.path_for(out.get("case", "case"), "seg")
            write_dicom_seg(mask, files, target, self.outputs, **self.options)
            out["seg_path"] = str(target)
        return out
