"""Inference on a clinician's scans: NIfTI files or DICOM series in; per case a mask in the input's own
geometry, an overlay PNG for visual QA, a DICOM SEG for a DICOM series, and a row of a summary CSV out.

One bad case is reported and skipped, never aborting the batch, and leaves no output of its name; no input
file is ever written (``OutputFolder``); every output is written atomically; the exit code says whether
any case failed (``ExitCode``). What each input problem produces: ``docs/inference.md``.

Modules: ``scans`` (finding cases), ``readers`` (reading and header checks), ``outputs`` (``OutputFolder``:
output names, the input guard, clean-up), ``writers`` (mask, overlay), ``dicom_seg`` (DICOM SEG),
``summary`` (the CSV), ``evaluator`` (``CaseDataset``, ``InferenceEvaluator``, exit codes)."""

from aiva_monai.inference.dicom_seg import SaveDicomSegd, write_dicom_seg
from aiva_monai.inference.evaluator import CaseDataset, ExitCode, InferenceEvaluator, InferenceExit, describe_error
from aiva_monai.inference.outputs import OUTPUT_KINDS, InputOverwriteError, OutputFolder
from aiva_monai.inference.readers import LoadScand, check_affine, dicom_series_files, read_dicom_series, read_scan
from aiva_monai.inference.scans import find_scans
from aiva_monai.inference.summary import SUMMARY_FIELDS
from aiva_monai.inference.writers import SaveMaskd, SaveOverlayd, save_overlay, voxel_volume_ml

__all__ = [
    "find_scans",
    "read_scan",
    "read_dicom_series",
    "dicom_series_files",
    "check_affine",
    "LoadScand",
    "OutputFolder",
    "OUTPUT_KINDS",
    "InputOverwriteError",
    "SaveMaskd",
    "SaveOverlayd",
    "save_overlay",
    "SaveDicomSegd",
    "write_dicom_seg",
    "voxel_volume_ml",
    "CaseDataset",
    "InferenceEvaluator",
    "ExitCode",
    "InferenceExit",
    "describe_error",
    "SUMMARY_FIELDS",
]
