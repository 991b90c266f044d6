"""Datalist JSON files: MONAI decathlon style, one entry per volume, each with a ``site``.

    {
      "description": "...",
      "training":   [{"image": "...", "label": "...", "subject": "...", "site": "..."}, ...],
      "validation": [...],
      "test":       [...]
    }

Relative paths are resolved against ``base_dir`` (default: the JSON file's folder). An entry may also
carry ``"simulate": {...}`` (see ``aiva_monai.data.simulate``): its image is then turned into a
simulated-scanner image when loaded, and its site name says "simulated".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from monai.data import load_decathlon_datalist

__all__ = ["load_datalist", "sites_of"]

SPLITS = ("training", "validation", "test")


def sites_of(datalist_file: str | Path) -> dict[str, list[str]]:
    """Sites present in each split of a datalist file."""
    with open(datalist_file) as stream:
        content = json.load(stream)
    return {split: sorted({e.get("site", "?") for e in content.get(split, [])}) for split in SPLITS if split in content}


def load_datalist(
    datalist_file: str | Path,
    split: str,
    sites: str | Sequence[str] | None = None,
    base_dir: str | Path | None = None,
    require_labels: bool = False,
    check_files: bool = True,
) -> list[dict]:
    """Entries of one split, optionally of some sites, with absolute paths.

    Args:
        datalist_file: the JSON file.
        split: "training", "validation" or "test".
        sites: a site name or several (the union, e.g. five prostate source sites); None keeps all.
        base_dir: folder for relative paths; default the JSON file's folder.
        require_labels: every entry must have a ``label``.
        check_files: every referenced image (and label) must exist.

    Raises:
        FileNotFoundError / ValueError naming the file and the problem.
    """
    datalist_file = Path(datalist_file)
    if not datalist_file.is_file():
        raise FileNotFoundError(f"datalist {datalist_file} does not exist.")
    try:
        with open(datalist_file) as stream:
            content = json.load(stream)
    except json.JSONDecodeError as error:
        raise ValueError(f"datalist {datalist_file} is not valid JSON: {error}") from None
    if split not in content:
        raise ValueError(f"datalist {datalist_file} has no '{split}' list (it has {sorted(content)}).")
    entries = load_decathlon_datalist(
        str(datalist_file), is_segmentation=True, data_list_key=split, base_dir=str(base_dir or datalist_file.parent)
    )
    if sites is not None:
        wanted = {sites} if isinstance(sites, str) else set(sites)
        available = sorted({e.get("site", "?") for e in entries})
        unknown = wanted - set(available)
        if unknown:
            raise ValueError(
                f"datalist {datalist_file}: no '{split}' entries of site(s) {sorted(unknown)}; "
                f"sites present: {available}."
            )
        entries = [e for e in entries if e.get("site") in wanted]
    if not entries:
        raise ValueError(f"datalist {datalist_file}: the '{split}' list is empty.")
    for entry in entries:
        if require_labels and not entry.get("label"):
            raise ValueError(
                f"datalist {datalist_file}: entry {entry.get('image')} has no label, and this split needs labels."
            )
        if check_files:
            for key in ("image", "label"):
                if entry.get(key) and not Path(entry[key]).is_file():
                    raise FileNotFoundError(f"datalist {datalist_file}: {key} file {entry[key]} does not exist.")
    return entries
