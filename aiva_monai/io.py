"""Atomic file writing: every output goes to a temporary file beside its target and is renamed into
place when complete, so an interrupted run never leaves a half-written file under the final name."""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

# the process umask, read once at import (os.umask can only be read by setting it): temporary files are
# created 0600 by mkstemp, and get the mode a plain open() would have given them before the rename
_UMASK = os.umask(0o022)
os.umask(_UMASK)

__all__ = [
    "atomic_path",
    "write_text_atomic",
    "write_json_atomic",
    "write_nifti_atomic",
    "write_csv_atomic",
    "check_writable_dir",
]


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside ``path`` (same suffixes); renames it onto ``path`` on success and
    removes it on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes) or ".tmp"
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name.split('.')[0]}.", suffix=suffix)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o666 & ~_UMASK)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json_atomic(path: str | Path, content) -> Path:
    return write_text_atomic(path, json.dumps(content, indent=2))


def write_nifti_atomic(array, affine, path: str | Path, description: str | None = None) -> Path:
    image = nib.Nifti1Image(np.asarray(array), np.asarray(affine, dtype=np.float64))
    if description:
        image.header["descrip"] = description[:79].encode()
    with atomic_path(path) as temporary:
        nib.save(image, str(temporary))
    return Path(path)


def write_csv_atomic(path: str | Path, rows, fieldnames) -> Path:
    """Writes ``rows`` (dicts; keys outside ``fieldnames`` are dropped) as CSV with a header line."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(fieldnames), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def check_writable_dir(folder: str | Path, what: str = "output_dir") -> Path:
    """Creates ``folder`` if needed and checks that a file can be created in it (by creating and removing
    one), so a run fails before any work rather than after it.

    Raises:
        PermissionError naming the folder (``what`` names the setting, e.g. "output_dir").
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".write_test.")
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise PermissionError(
            f"{what} {folder} is not writable ({error.strerror or error}): "
            f"choose another --{what} or fix its permissions."
        ) from None
    return folder
