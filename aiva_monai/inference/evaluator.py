"""The per-case batch: ``CaseDataset`` (reading never raises; a bad case carries its error) and
``InferenceEvaluator`` (one case per iteration; a failed case is reported, its outputs removed, and the batch
goes on; the exit code says whether any case failed)."""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Sequence
from enum import IntEnum
from pathlib import Path

import torch
from monai.data import Dataset
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys
from tqdm import tqdm

from aiva_monai.inference.outputs import OutputFolder
from aiva_monai.inference.scans import find_scans
from aiva_monai.inference.summary import SUMMARY_FIELDS

__all__ = ["CaseDataset", "InferenceEvaluator", "describe_error", "ExitCode", "InferenceExit"]

logger = logging.getLogger(__name__)
_NOISE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


class ExitCode(IntEnum):
    """Exit status of an inference command (``python -m monai.bundle run --config_file .../inference.json``)."""

    OK = 0  # every case ok (warnings possible: see the summary's message column)
    # 1: an unexpected error (a Python traceback): a bug, or a bad config override
    SETUP_FAILED = 2  # nothing was processed: no input / no scan found, output folder not writable, no checkpoint
    SOME_FAILED = 3  # at least one case failed and at least one is ok (see summary.csv)
    ALL_FAILED = 4  # every case failed


class InferenceExit(SystemExit):
    """Ends an inference command with an ``ExitCode`` and no traceback (monai.bundle wraps any ``Exception`` of
    a config expression in a long "Failed to evaluate" traceback; ``SystemExit`` passes through). The message
    is logged before; ``message`` keeps it and ``__cause__`` the error, for callers that catch it."""

    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(int(code))
        self.message = message


def describe_error(error: BaseException, path=None) -> str:
    """One line for a case's failure: the error without MONAI's "applying transform ..." wrappers (the first
    error of the ``__cause__`` chain that is not one), its type unless a ValueError / OSError, and the input
    path unless the message already names it."""
    chain = [error]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    root = next(
        (e for e in chain if not (isinstance(e, RuntimeError) and str(e).startswith("applying transform"))), chain[-1]
    )
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

    The cases are either ``data`` or found under ``input_path`` by ``discover()`` (called by
    ``InferenceEvaluator.run``): a config with no input can be initialised and its properties checked (model
    zoo, MONAI Label / Deploy); the "no input" error comes when it runs.

    An item is the preprocessed case plus ``input`` (the input path), ``warnings`` (" | "-joined warnings
    raised while reading and preprocessing) and ``load_seconds``; when reading or preprocessing fails
    (``read_scan`` errors or any transform error), the item is the case's plain fields plus ``error``, a
    one-line message naming the file, which ``InferenceEvaluator`` reports and skips.

    Args:
        data: the cases, or None to find them under ``input_path``.
        transform: preprocessing (reads the scan: ``LoadScand`` first).
        input_path: a NIfTI file, DICOM series folder or folder of them (``--dataset_dir``).
        outputs: the ``OutputFolder`` (its folder is not searched, earlier outputs are not taken as scans).
    """

    def __init__(
        self, data: Sequence | None = None, transform=None, input_path=None, outputs: OutputFolder | None = None
    ) -> None:
        super().__init__(data=list(data) if data is not None else [], transform=transform)
        self.input_path = input_path
        self.outputs = outputs
        self._given = data is not None

    def discover(self) -> list[dict]:
        """Finds the cases under ``input_path`` (``find_scans``; its errors propagate) unless ``data`` was given."""
        if not self._given:
            exclude = self.outputs.path if self.outputs is not None else None
            skip = self.outputs.recorded_outputs() if self.outputs is not None else ()
            self.data = find_scans(self.input_path, exclude=exclude, skip=skip)
        return self.data

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

    Before any case (``run``): ``outputs.prepare()`` (writable folders, rows of earlier runs, temporary files
    of a killed run removed), the cases are found (``CaseDataset.discover``), every checkpoint a handler loads
    (a ``load_path``) must exist, and ``outputs.protect(cases)`` records every input file, so no output
    can be written over one, and gives each case a free output name. A problem here is logged and ends the
    run with ``ExitCode.SETUP_FAILED`` before any output is written.

    Per case: the network, inferer and ``postprocessing`` (from the config: inversion to the input grid,
    ``SaveMaskd``, ``SaveOverlayd``...) run inside a try block; the case's row (``SUMMARY_FIELDS``) replaces
    any earlier row of that case in the summary, rewritten atomically after every case. A failed case's
    outputs (mask, overlay, SEG of its name, stale or new) are removed. Failures are logged at ERROR, warnings
    at WARNING; the last line says how many cases were ok and how many failed.

    Fallbacks, logged and written to the row's message: a constant image (every voxel equal, e.g. all
    zero) gets an empty mask (the network output is discarded); an empty mask or, with ``volume_range_ml``, a
    mask volume outside that range is flagged for checking the overlay.

    Args:
        outputs: the ``OutputFolder`` shared with the writers (output folder, mask suffix, summary file).
        organ: the segmented structure's name, for messages ("brain", "prostate").
        volume_range_ml: (low, high) plausible mask volume in mL, or None.
        progress: progress bar over cases on stderr; None: only when stderr is a terminal.
        exit_on_failure: end ``run`` with ``InferenceExit`` (a ``SystemExit`` carrying an ``ExitCode``) when a
            setup check fails or any case failed; False: setup errors are raised as they are and ``run``
            returns normally (``exit_code`` says what happened).
        other arguments: as ``SupervisedEvaluator``.
    """

    def __init__(
        self,
        device,
        val_data_loader,
        network,
        *,
        outputs: OutputFolder,
        organ: str = "mask",
        volume_range_ml: Sequence[float] | None = None,
        progress: bool | None = None,
        exit_on_failure: bool = True,
        **kwargs,
    ) -> None:
        batch_size = getattr(val_data_loader, "batch_size", 1)
        if batch_size not in (1, None):
            raise ValueError(
                "InferenceEvaluator runs one case per iteration: "
                f"set the data loader's batch_size to 1, not {batch_size}."
            )
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
        self.outputs = outputs
        self.organ = organ
        self.volume_range_ml = tuple(float(v) for v in volume_range_ml) if volume_range_ml else None
        self.progress = progress
        self.exit_on_failure = exit_on_failure
        self.exit_code: ExitCode | None = None
        self._handlers_seen = list(kwargs.get("val_handlers") or [])
        self._constant_input = False
        self._bar = None
        self._counts = {"ok": 0, "failed": 0}
        self.add_event_handler(IterationEvents.FORWARD_COMPLETED, self._empty_prediction_for_constant_input)

    @property
    def rows(self) -> dict[str, dict]:
        return self.outputs.rows

    # -- before any case ------------------------------------------------------------------------------------------

    def _setup(self) -> None:
        self.outputs.prepare()
        dataset = getattr(self.data_loader, "dataset", None)
        cases = dataset.discover() if isinstance(dataset, CaseDataset) else list(getattr(dataset, "data", []))
        for handler in self._handlers_seen:
            path = getattr(handler, "load_path", None)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(
                    f"checkpoint {path} does not exist: set --checkpoint to the model weights file (.pt)."
                )
        self.outputs.protect(cases)
        self.state.epoch_length = len(cases)  # fixed when the engine was built, before the cases were found

    def _finish(self, code: ExitCode, message: str, cause: BaseException | None = None) -> None:
        self.exit_code = code
        if code != ExitCode.OK and self.exit_on_failure:
            raise InferenceExit(code, message) from cause

    def run(self, global_epoch: int = 1) -> None:  # type: ignore[override]
        self._counts = {"ok": 0, "failed": 0}
        try:
            self._setup()
        except (OSError, ValueError) as error:  # named problems of the input, output folder or checkpoint
            message = f"inference not started: {error}"
            logger.error(message)
            if not self.exit_on_failure:
                self.exit_code = ExitCode.SETUP_FAILED
                raise
            self._finish(ExitCode.SETUP_FAILED, message, error)
        show = self.progress if self.progress is not None else sys.stderr.isatty()
        self._bar = tqdm(
            total=self.state.epoch_length, desc=f"{self.organ} masks", unit="case", disable=not show, file=sys.stderr
        )
        try:
            super().run(global_epoch)
        finally:
            self._bar.close()
            self._bar = None
        ok, failed = self._counts["ok"], self._counts["failed"]
        line = (
            f"inference: {ok + failed} case(s): {ok} ok, {failed} failed; masks and overlays in {self.outputs.path}, "
            f"summary {self.outputs.summary_file}"
        )
        (logger.error if failed else logger.info)(line)
        self._finish(ExitCode.OK if not failed else ExitCode.ALL_FAILED if not ok else ExitCode.SOME_FAILED, line)

    # -- one case ------------------------------------------------------------------------------------------------

    def _empty_prediction_for_constant_input(self, engine) -> None:
        if not self._constant_input:
            return
        pred = engine.state.output[Keys.PRED]
        empty = torch.full_like(pred, -1e4)  # background wins everywhere, with softmax or sigmoid post-processing
        if pred.shape[1] > 1:
            empty[:, 0] = 1e4
        engine.state.output[Keys.PRED] = empty

    def _predict(self, engine, batchdata, notes: list[str]) -> tuple[dict | list, dict]:
        """Runs the network and postprocessing (the writers) on one case; (engine output, row fields)."""
        image = batchdata[Keys.IMAGE]
        self._constant_input = bool(torch.amax(image) == torch.amin(image))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                output = super()._iteration(engine, batchdata)
        finally:
            constant, self._constant_input = self._constant_input, False
        notes += _warning_messages(caught)
        item = output[0] if isinstance(output, list) else output
        volume = float(item["mask_ml"]) if "mask_ml" in item else None
        fields = {
            "mask": item.get("mask_path", ""),
            "overlay": item.get("overlay_path", ""),
            "dicom_seg": item.get("seg_path", ""),
            "status": "ok",
            "volume_ml": "" if volume is None else f"{volume:.2f}",
        }
        if constant:
            notes.insert(
                0,
                f"the image is constant (every voxel has the same value, e.g. all zero): no {self.organ} "
                "to segment, an empty mask was written (the network output is discarded)",
            )
        elif volume == 0:
            notes.insert(0, f"empty mask: no {self.organ} voxel found; check the image and the overlay")
        elif (
            volume is not None
            and self.volume_range_ml
            and not self.volume_range_ml[0] <= volume <= self.volume_range_ml[1]
        ):
            low, high = self.volume_range_ml
            notes.insert(
                0, f"{self.organ} volume {volume:.0f} mL is outside the expected {low:g}-{high:g} mL; check the overlay"
            )
        return output, fields

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
            try:
                output, fields = self._predict(engine, batchdata, notes)
                row.update(fields)
            except Exception as failure:  # one bad case must not abort the batch
                logger.debug(f"case {case} failed", exc_info=True)
                error = describe_error(failure, source)
                output = {}
        seconds = time.perf_counter() - start + float(_first(batchdata.get("load_seconds")) or 0.0)
        row["seconds"] = f"{seconds:.2f}"
        if error is not None:
            row.update(status="failed", message=str(error), mask="", overlay="", dicom_seg="", volume_ml="")
            self.outputs.discard(case)  # no mask or overlay of a failed case's name stays, stale or new
            logger.error(f"case {case}: FAILED, skipped: {error}")
        else:
            row["message"] = " | ".join(notes)
            logger.info(f"case {case}: {self.organ} {row['volume_ml']} mL in {seconds:.1f} s -> {row['mask']}")
            if notes:
                logger.warning(f"case {case}: {row['message']}")
        self._counts[row["status"]] += 1
        self.outputs.rows[case] = row
        self.outputs.write_summary()
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(f"{case}: {row['status']}", refresh=False)
        return output
