"""Atomic file writing: every output goes to a temporary file beside its target and is renamed into
place when complete, so an interrupted run never leaves a half-written file under the final name."""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["atomic_path", "write_text_atomic", "write_json_atomic", "write_nifti_atomic"]


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
