"""``OutputFolder``: the one place that decides which files inference writes, and refuses to write (or remove)
any file that is an input.

Every writer of the inference pipeline (masks, overlays, DICOM SEG, the summary CSV) asks it for its target
path and writes through ``OutputFolder.atomic``; before the first case, ``protect`` records the real path
(symbolic links resolved) of every input file, and ``atomic`` / ``remove`` refuse any path that resolves to
one of them, whatever the folder layout, names or links."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from aiva_monai.inference.summary import SUMMARY_FIELDS, read_summary, summary_text
from aiva_monai.io import atomic_path, check_writable_dir

__all__ = ["OutputFolder", "OUTPUT_KINDS", "InputOverwriteError"]

logger = logging.getLogger(__name__)

# kind of output -> file name ending after "<case><suffix>"
OUTPUT_KINDS = {"mask": ".nii.gz", "overlay": ".png", "seg": ".seg.dcm"}

# the temporary files of aiva_monai.io.atomic_path (".<stem>.<8 characters from mkstemp><suffixes>") and of
# check_writable_dir (".write_test.<8 characters>"): what a killed run leaves behind
_TEMPORARY = re.compile(
    r"^\.(write_test\.[a-z0-9_]{8}|[^/]*\.[a-z0-9_]{8}(\.nii\.gz|\.nii|\.png|\.csv|\.seg\.dcm|\.dcm|\.json|\.tmp))$"
)


class InputOverwriteError(PermissionError):
    """An output path resolves to an input file."""


def _real(path) -> str:
    return os.path.realpath(os.fspath(path))


class OutputFolder:
    """Where inference writes: ``<output_dir>/<case><suffix>.nii.gz`` (mask), ``.png`` (overlay),
    ``.seg.dcm`` (DICOM SEG) and the summary CSV, never onto an input.

    Args:
        output_dir: the folder (created if needed).
        suffix: between the case name and the extension, e.g. "_brainmask".
        summary_file: the summary CSV (default ``<output_dir>/summary.csv``).
    """

    def __init__(self, output_dir, suffix: str = "_mask", summary_file=None) -> None:
        self.path = Path(output_dir)
        self.suffix = suffix
        self.summary_file = Path(summary_file) if summary_file else self.path / "summary.csv"
        self.rows: dict[str, dict] = {}
        self._protected: dict[str, str] = {}  # real path -> the input path as discovered

    # -- before any case ------------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Checks that the folders are writable (``PermissionError`` naming them), reads the rows of an earlier
        run and removes the temporary files a killed run left behind."""
        check_writable_dir(self.path, "output_dir")
        if self.summary_file.parent != self.path:
            check_writable_dir(self.summary_file.parent, "summary_file folder")
        self.rows = read_summary(self.summary_file)
        removed = 0
        for folder in {self.path, self.summary_file.parent}:
            for entry in folder.iterdir():
                if (
                    _TEMPORARY.match(entry.name)
                    and entry.is_file()
                    and not entry.is_symlink()
                    and _real(entry) not in self._protected
                ):
                    entry.unlink(missing_ok=True)
                    removed += 1
        if removed:
            logger.info(f"removed {removed} temporary file(s) left in {self.path} by an interrupted run")

    def recorded_outputs(self) -> set[str]:
        """Real paths of the files earlier runs wrote here (from the summary): never taken as input scans."""
        return {_real(row[k]) for row in self.rows.values() for k in ("mask", "overlay", "dicom_seg") if row.get(k)}

    def protect(self, cases: Sequence[dict]) -> None:
        """Records the real path of every input file of ``cases`` (a NIfTI file; every file of a DICOM series
        folder) and gives each case a name whose outputs are free: not an input, not an earlier run's outputs
        of another input, not another case's. Renames ``case["case"]`` where needed (``_2``, ``_3``...)."""
        for case in cases:
            for file in self._input_files(case):
                self._protected.setdefault(_real(file), str(file))
        earlier = {name: row.get("input", "") for name, row in self.rows.items()}
        wanted_names = [case["case"] for case in cases]  # unique among themselves (find_scans)
        assigned: set[str] = set()
        for case in cases:
            wanted = name = case["case"]
            others = {n.lower() for n in wanted_names if n != wanted} | assigned
            number = 1
            while name.lower() in others or not self._free(name, case, earlier):
                number += 1
                name = f"{wanted}_{number}"
            if name != wanted:
                logger.info(f"case {wanted} ({case.get('image')}): outputs named {name} (the name {wanted} is taken)")
            case["case"] = name
            assigned.add(name.lower())

    @staticmethod
    def _input_files(case: dict) -> list[Path]:
        image = Path(case["image"])
        if case.get("format") == "dicom" and image.is_dir():
            return [p for p in image.iterdir() if p.is_file()] + [image]
        return [image]

    def _free(self, name: str, case: dict, earlier: dict) -> bool:
        if name in earlier and _real(earlier[name]) != _real(case["image"]):
            return False  # an earlier run's case of another input: its outputs and row stay
        return not any(_real(self.path_for(name, kind)) in self._protected for kind in OUTPUT_KINDS)

    # -- paths and writing ----------------------------------------------------------------------------------------

    def path_for(self, case: str, kind: str) -> Path:
        """The output of ``kind`` ("mask", "overlay", "seg") for ``case``."""
        return self.path / f"{case}{self.suffix}{OUTPUT_KINDS[kind]}"

    def check(self, path, also: Iterable = ()) -> Path:
        """``path`` if writing it cannot touch an input, else ``InputOverwriteError`` naming both. ``also``:
        more input files to protect (a writer's own case, when used without ``protect``)."""
        real = _real(path)
        protected = dict(self._protected)
        for extra in also:
            if extra:
                protected.setdefault(_real(extra), str(extra))
        if real in protected:
            raise InputOverwriteError(
                f"{path}: refusing to write over the input {protected[real]}; choose another output_dir."
            )
        return Path(path)

    @contextmanager
    def atomic(self, path, also: Iterable = ()):
        """A temporary path beside ``path`` renamed onto it when the block completes (``aiva_monai.io.atomic_path``),
        after ``check``."""
        self.check(path, also)
        with atomic_path(path) as temporary:
            yield temporary

    def remove(self, path) -> bool:
        """Removes an output file (never an input); True if one was removed."""
        path = Path(path)
        if not (path.exists() or path.is_symlink()):
            return False
        self.check(path)
        path.unlink()
        return True

    def discard(self, case: str) -> list[str]:
        """Removes every output of ``case`` (after a failure: no mask or overlay of its name stays, stale or new)."""
        removed = [str(self.path_for(case, kind)) for kind in OUTPUT_KINDS if self.remove(self.path_for(case, kind))]
        if removed:
            logger.info(f"case {case}: removed its outputs {removed}")
        return removed

    def write_summary(self, fields: Sequence[str] = SUMMARY_FIELDS) -> Path:
        """Writes ``rows`` to the summary CSV (atomically, never over an input)."""
        with self.atomic(self.summary_file) as temporary:  # UTF-8 whatever the locale (names like "Müller")
            temporary.write_bytes(summary_text(self.rows.values(), fields).encode("utf-8"))
        return self.summary_file
