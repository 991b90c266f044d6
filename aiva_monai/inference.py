"""Inference on a clinician's scans: NIfTI files or DICOM series in; per case a mask in the input's own
geometry, an overlay PNG for visual QA and a row of a summary CSV out. One bad case is reported and
skipped, never aborting the batch; inputs are never modified; every output is written atomically."""

from __future__ import annotations

import csv
import logging
import shutil
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from monai.data import Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.transforms import MapTransform
from monai.utils import CommonKeys as Keys
from tqdm import tqdm

from aiva_monai.io import check_writable_dir, write_csv_atomic, write_nifti_atomic

__all__ = [
    "find_scans",
    "read_scan",
    "LoadScand",
    "SaveMaskd",
    "SaveOverlayd",
    "save_overlay",
    "CaseDataset",
    "InferenceEvaluator",
    "describe_error",
    "SUMMARY_FIELDS",
]

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(NIFTI_SUFFIXES) and not path.name.startswith(".")


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES[::-1]:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _dicom_series(folder: Path) -> list[str]:
    if not any(p.is_file() and not _is_nifti(p) and not p.name.startswith(".") for p in folder.iterdir()):
        return []
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns on every folder without a series
    try:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or [])
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def find_scans(input_path: str | Path, exclude: str | Path | None = None) -> list[dict]:
    """Cases under ``input_path``: a NIfTI file, a DICOM series folder, or a folder holding NIfTI
    files and/or DICOM series folders (searched recursively). Each case: ``image`` (file or folder),
    ``case`` (a name for its outputs, unique: a repeated name gets ``_2``, ``_3``...), ``format``
    ("nifti" or "dicom"), ``series`` (DICOM series id). Hidden files (names starting with ".", e.g. the
    temporary files of an interrupted write) are skipped, and so is ``exclude`` (e.g. the output
    folder) when it lies strictly inside ``input_path``, so a rerun never takes earlier masks as scans.

    Raises:
        ValueError: no input given, or a file that is not NIfTI.
        FileNotFoundError: the path does not exist, or holds no NIfTI file and no DICOM series.
    """
    if not input_path:
        raise ValueError("no input given: pass --dataset_dir with a NIfTI file, a folder of NIfTI files or DICOM series.")
    input_path = Path(input_path)
    if not input_path.exists():
        raise FileNotFoundError(f"input {input_path} does not exist.")
    if input_path.is_file():
        if not input_path.name.endswith(NIFTI_SUFFIXES):
            raise ValueError(f"input {input_path} is neither a NIfTI file (.nii, .nii.gz) nor a folder.")
        return [{"image": str(input_path), "case": _case_name(input_path), "format": "nifti"}]
    skipped = Path(exclude).resolve() if exclude else None
    if skipped is not None and skipped == input_path.resolve():
        skipped = None
    cases = []
    folders = [input_path, *sorted(p for p in input_path.rglob("*") if p.is_dir() and not p.name.startswith("."))]
    for folder in folders:
        if _inside(folder.resolve(), skipped) or any(part.startswith(".") for part in folder.relative_to(input_path).parts):
            continue
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
    seen: dict[str, int] = {}
    for case in cases:  # e.g. a.nii and a.nii.gz side by side: distinct outputs
        seen[case["case"]] = seen.get(case["case"], 0) + 1
        if seen[case["case"]] > 1:
            case["case"] = f"{case['case']}_{seen[case['case']]}"
    return cases


def read_scan(case: dict) -> MetaTensor:
    """A (1, X, Y, Z) float32 MetaTensor whose affine maps voxels to RAS millimetres.

    NIfTI files are read with nibabel; DICOM series with SimpleITK (LPS converted to RAS). A 4D file
    whose last axis has length 1 is taken as 3D.

    Raises:
        ValueError naming the file when it cannot be read (corrupt, truncated, not an image), is not a
        3D image (2D, 4D time series / multi-channel), or holds NaN or Inf intensities.
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
        kind = {2: "a 2D image (one slice)", 4: "a 4D image (a time series or several volumes)"}.get(array.ndim, f"a {array.ndim}D array")
        raise ValueError(f"{path}: expected a 3D image, got {kind} of shape {array.shape}.")
    finite = np.isfinite(array)
    if not finite.all():
        nan = int(np.isnan(array).sum())
        raise ValueError(
            f"{path}: {nan} NaN and {int((~finite).sum()) - nan} Inf intensities (of {array.size} voxels); "
            "a scan with missing values is not segmented: fix or re-export the file."
        )
    meta = {"filename_or_obj": path, "original_affine": torch.as_tensor(affine), "spatial_shape": np.asarray(array.shape)}
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(affine), meta=meta)


class LoadScand(MapTransform):
    """Reads ``data[key]`` (a case from ``find_scans``) into a (1, X, Y, Z) MetaTensor.

    Args:
        native_key: also keep the image as read (input grid, before any preprocessing) under this key,
            as a plain tensor, for ``SaveOverlayd``; None keeps nothing. Not ``<key>_...``: MONAI's
            ``Spacingd`` takes every ``image_*`` entry for a metadata dict.
    """

    def __init__(self, keys="image", native_key: str | None = None) -> None:
        super().__init__(keys)
        self.native_key = native_key

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            out[key] = read_scan({**data, "image": data[key]})
            if self.native_key:
                out[self.native_key] = out[key].as_tensor().clone()
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


class SaveOverlayd(MapTransform):
    """Writes an overlay PNG for visual QA: ``<output_dir>/<case><suffix>.png``, slices of the image as read
    (``image_key``, from ``LoadScand(native_key=...)``) with ``data[key]`` (the mask in the same grid)
    outlined. Adds ``overlay_path``. See ``save_overlay``.
    """

    def __init__(self, keys="pred", image_key="native_image", output_dir=".", suffix="_mask", organ: str = "") -> None:
        super().__init__(keys)
        self.image_key = image_key
        self.output_dir = Path(output_dir)
        self.suffix = suffix
        self.organ = organ

    def __call__(self, data):
        out = dict(data)
        for key in self.key_iterator(out):
            mask = out[key]
            affine = mask.affine if isinstance(mask, MetaTensor) else out["image"].meta.get("original_affine")
            image = np.asarray(torch.as_tensor(out[self.image_key]).detach().cpu(), dtype=np.float32)
            case = out.get("case", "case")
            title = f"{case}: {self.organ} mask {out['mask_ml']:.1f} mL" if "mask_ml" in out else str(case)
            target = self.output_dir / f"{case}{self.suffix}.png"
            labels = np.asarray(mask.detach().cpu())[0]
            save_overlay(image[0] if image.ndim == 4 else image, labels, np.asarray(affine, dtype=np.float64), target, title=title)
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
            f"{path}: the overlay needs a 3D image and a mask of the same shape, got {np.shape(image)} and {np.shape(mask)}."
        )
    orientation = nib.orientations.io_orientation(affine)
    volume = nib.orientations.apply_orientation(np.asarray(image, dtype=np.float32), orientation)
    labels = nib.orientations.apply_orientation((np.asarray(mask) > 0).astype(np.uint8), orientation)
    spacing = np.empty(3)
    spacing[orientation[:, 0].astype(int)] = np.linalg.norm(affine[:3, :3], axis=0)
    low, high = np.percentile(volume, [1.0, 99.5]) if volume.size else (0.0, 1.0)
    figure, axes = plt.subplots(2, 3, figsize=(10.5, 7.5))
    for axis, (name, picture, labelled, aspect) in zip(axes.flat, _display_slices(volume, labels, spacing)):
        axis.imshow(picture, cmap="gray", vmin=low, vmax=high if high > low else low + 1, origin="lower", aspect=aspect,
                    interpolation="nearest")
        if labelled.any():
            axis.imshow(np.ma.masked_equal(labelled, 0), cmap="autumn", alpha=0.3, origin="lower", aspect=aspect,
                        interpolation="nearest")
            axis.contour(labelled, levels=[0.5], colors="red", linewidths=0.8, origin="lower")
        axis.set_title(name, fontsize=9)
        axis.set_axis_off()
    figure.suptitle(f"{title}\n(input grid, not resampled; patient right on image right)" if title else
                    "input grid, not resampled; patient right on image right", fontsize=10)
    figure.tight_layout()
    return save_figure_atomic(figure, path, dpi=90)


# -- the per-case batch: bad cases reported and skipped ----------------------------------------------------------

SUMMARY_FIELDS = ("case", "input", "mask", "overlay", "volume_ml", "seconds", "status", "message")
_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def describe_error(error: BaseException, path=None) -> str:
    """One line for a case's failure: the innermost cause (MONAI wraps a transform's error in
    "applying transform ..." RuntimeErrors), its type unless a ValueError / OSError, and the input path
    unless the message already names it."""
    root = error
    while root.__cause__ is not None:
        root = root.__cause__
    text = " ".join(str(root).split()) or type(root).__name__
    if not isinstance(root, (ValueError, OSError)):
        text = f"{type(root).__name__}: {text}"
    if path and str(path) not in text:
        text = f"{path}: {text}"
    return text


def _warning_messages(caught) -> list[str]:
    return list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught if not issubclass(w.category, _NOISE)))


def _first(value):
    """The single item of a batch of one (list/tuple/tensor), or the value itself."""
    if isinstance(value, (list, tuple)):
        return value[0] if value else None
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item() if value.numel() else None
    return value


class CaseDataset(Dataset):
    """A MONAI ``Dataset`` of cases (dicts from ``find_scans``) that never raises on a bad case.

    An item is the preprocessed case plus ``input`` (the input path), ``warnings`` (" | "-joined warnings
    raised while reading and preprocessing) and ``load_seconds``; when reading or preprocessing fails
    (``read_scan`` errors: unreadable file, not 3D, NaN / Inf intensities; or any transform error),
    the item is the case's plain fields plus ``error``, a one-line message naming the file, which
    ``InferenceEvaluator`` reports and skips.
    """

    def _transform(self, index: int):
        case = dict(self.data[index])
        source = str(case.get("image", ""))
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                item = self.transform(case)
            except Exception as error:  # one bad case must not abort the batch
                item = {k: v for k, v in case.items() if isinstance(v, (str, int, float))}
                item["error"] = describe_error(error, source)
        item["input"] = source
        item["warnings"] = " | ".join(_warning_messages(caught))
        item["load_seconds"] = time.perf_counter() - start
        return item


class InferenceEvaluator(SupervisedEvaluator):
    """A ``SupervisedEvaluator`` over ``CaseDataset`` cases, one per iteration (``batch_size`` 1), that
    reports and skips a bad case instead of stopping.

    Per case: the network, inferer and ``postprocessing`` (from the config: inversion to the input
    grid, ``SaveMaskd``, ``SaveOverlayd``) run inside a try block; the case's row (``SUMMARY_FIELDS``:
    case, input, mask, overlay, volume_ml, seconds, status "ok" / "failed", message: warnings or the
    error) is added to ``summary_file``, rewritten atomically after every case, so an interrupted run
    keeps the rows so far. Rows of cases from earlier runs into the same file are kept (a case run again
    replaces its row). Failures are logged at ERROR, warnings at WARNING.

    Before any case: ``output_dir`` must be writable (``PermissionError`` naming it) and every
    checkpoint a handler loads (a ``load_path``, e.g. ``CheckpointLoader``) must exist
    (``FileNotFoundError`` naming it).

    Fallbacks, logged and written to the row's message: a constant image (every voxel equal, e.g. all
    zero) gets an empty mask (the network output is discarded); an empty mask or, with ``volume_range_ml``, a mask
    volume outside that range is flagged for checking the overlay.

    Args:
        output_dir: folder of the masks, overlays and summary.
        summary_file: the CSV (default ``<output_dir>/summary.csv``).
        organ: the segmented structure's name, for messages ("brain", "prostate").
        volume_range_ml: (low, high) plausible mask volume in mL, or None.
        progress: progress bar over cases on stderr; None: only when stderr is a terminal.
        other arguments: as ``SupervisedEvaluator``.
    """

    def __init__(self, device, val_data_loader, network, *, output_dir, summary_file=None, organ: str = "mask",
                 volume_range_ml: Sequence[float] | None = None, progress: bool | None = None, **kwargs) -> None:
        batch_size = getattr(val_data_loader, "batch_size", 1)
        if batch_size not in (1, None):
            raise ValueError(
                f"InferenceEvaluator runs one case per iteration: set the data loader's batch_size to 1, not {batch_size}."
            )
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
        self.output_dir = Path(output_dir)
        self.summary_file = Path(summary_file) if summary_file else self.output_dir / "summary.csv"
        self.organ = organ
        self.volume_range_ml = tuple(float(v) for v in volume_range_ml) if volume_range_ml else None
        self.progress = progress
        self.rows: dict[str, dict] = {}
        self._handlers_seen = list(kwargs.get("val_handlers") or [])
        self._constant_input = False
        self._bar = None
        self._counts = {"ok": 0, "failed": 0}
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._empty_prediction_for_constant_input)

    # -- before any case ------------------------------------------------------------------------------------------

    def _preflight(self) -> None:
        check_writable_dir(self.output_dir, "output_dir")
        if self.summary_file.parent != self.output_dir:
            check_writable_dir(self.summary_file.parent, "summary_file folder")
        for handler in self._handlers_seen:
            path = getattr(handler, "load_path", None)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"checkpoint {path} does not exist: set --checkpoint to the model weights file (.pt).")

    def _read_summary(self) -> dict[str, dict]:
        if not self.summary_file.is_file():
            return {}
        try:
            with open(self.summary_file, newline="") as stream:
                rows = [row for row in csv.DictReader(stream) if row.get("case")]
        except (OSError, UnicodeDecodeError, csv.Error) as error:
            backup = self.summary_file.with_name(self.summary_file.name + ".unreadable")
            shutil.copy2(self.summary_file, backup)
            logger.warning(f"summary {self.summary_file} cannot be read ({error}): kept as {backup}, starting a new one.")
            return {}
        return {row["case"]: {field: row.get(field) or "" for field in SUMMARY_FIELDS} for row in rows}

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        self._preflight()
        self.rows = self._read_summary()
        self._counts = {"ok": 0, "failed": 0}
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        total = len(self.data_loader) if hasattr(self.data_loader, "__len__") else None
        self._bar = tqdm(total=total, desc=f"{self.organ} masks", unit="case", disable=not show, file=sys.stderr)
        try:
            super().run(global_epoch)
        finally:
            self._bar.close()
            self._bar = None
        logger.info(
            f"inference: {self._counts['ok']} case(s) ok, {self._counts['failed']} failed; masks and overlays in "
            f"{self.output_dir}, summary {self.summary_file}"
        )

    # -- one case ------------------------------------------------------------------------------------------------

    def _empty_prediction_for_constant_input(self, engine) -> None:
        if not self._constant_input:
            return
        pred = engine.state.output[Keys.PRED]
        empty = torch.full_like(pred, -1e4)  # background wins everywhere, with softmax or sigmoid post-processing
        if pred.shape[1] > 1:
            empty[:, 0] = 1e4
        engine.state.output[Keys.PRED] = empty

    def _iteration(self, engine, batchdata):
        start = time.perf_counter()
        case = str(_first(batchdata.get("case")) or f"case_{engine.state.iteration}")
        source = str(_first(batchdata.get("input")) or "")
        notes = [n for n in str(_first(batchdata.get("warnings")) or "").split(" | ") if n]
        error = _first(batchdata.get("error"))
        row = dict.fromkeys(SUMMARY_FIELDS, "")
        row.update(case=case, input=source)
        output: dict | list = {}
        if error is None:
            image = batchdata[Keys.IMAGE]
            self._constant_input = bool(torch.amax(image) == torch.amin(image))
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    output = super()._iteration(engine, batchdata)
                notes += _warning_messages(caught)
                item = output[0] if isinstance(output, list) else output
                volume = float(item["mask_ml"]) if "mask_ml" in item else None
                row.update(mask=item.get("mask_path", ""), overlay=item.get("overlay_path", ""), status="ok",
                           volume_ml="" if volume is None else f"{volume:.2f}")
                if self._constant_input:
                    notes.insert(0, f"the image is constant (every voxel has the same value, e.g. all zero): no {self.organ} "
                                    "to segment, an empty mask was written (the network output is discarded)")
                elif volume == 0:
                    notes.insert(0, f"empty mask: no {self.organ} voxel found; check the image and the overlay")
                elif volume is not None and self.volume_range_ml and not self.volume_range_ml[0] <= volume <= self.volume_range_ml[1]:
                    low, high = self.volume_range_ml
                    notes.insert(
                        0, f"{self.organ} volume {volume:.0f} mL is outside the expected {low:g}-{high:g} mL; check the overlay"
                    )
            except Exception as failure:  # one bad case must not abort the batch
                logger.debug(f"case {case} failed", exc_info=True)
                error = describe_error(failure, source)
                output = {}
            finally:
                self._constant_input = False
        seconds = time.perf_counter() - start + float(_first(batchdata.get("load_seconds")) or 0.0)
        row["seconds"] = f"{seconds:.2f}"
        if error is not None:
            row.update(status="failed", message=str(error))
            logger.error(f"case {case}: FAILED, skipped: {error}")
        else:
            row["message"] = " | ".join(notes)
            logger.info(f"case {case}: {self.organ} {row['volume_ml']} mL in {seconds:.1f} s -> {row['mask']}")
            if notes:
                logger.warning(f"case {case}: {row['message']}")
        self._counts[row["status"]] += 1
        self.rows[case] = row
        write_csv_atomic(self.summary_file, self.rows.values(), SUMMARY_FIELDS)
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{case}: {row['status']}", refresh=False)
        return output
