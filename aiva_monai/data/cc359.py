"""Reader for Calgary-Campinas-359 (CC359): six sites by vendor and field strength.

Images ``CCxxxx_<vendor>_<field>_<age>_<sex>.nii.gz`` and their silver-standard brain masks
``..._ss.nii.gz`` are found anywhere under the data folder (the release keeps them in ``Original/``
and ``Silver-standard/``). Sites: siemens_15, siemens_3, ge_15, ge_3, philips_15, philips_3.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from aiva_monai.io import write_json_atomic

__all__ = ["CC359_SITES", "find_cc359", "cc359_datalist", "write_cc359_datalist"]

CC359_SITES = ("siemens_15", "siemens_3", "ge_15", "ge_3", "philips_15", "philips_3")
_NAME = re.compile(
    r"^(?P<subject>CC\d{4})_(?P<vendor>philips|siemens|ge)_(?P<field>15|3)_(?P<age>\d+)_(?P<sex>[MF])(?P<mask>_ss)?\.nii(\.gz)?$"
)


def find_cc359(dataset_dir: str | Path) -> list[dict]:
    """One entry per subject, sorted by subject id: image, label (when its mask exists), subject, site,
    vendor, field, age, sex.

    Raises:
        FileNotFoundError: the folder is missing or holds no CC359 image.
        ValueError: two files claim the same subject's image or mask.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"CC359 folder {dataset_dir} does not exist.")
    images: dict[str, tuple[Path, dict]] = {}
    masks: dict[str, Path] = {}
    for path in sorted(dataset_dir.rglob("CC*.nii*")):
        found = _NAME.match(path.name)
        if found is None:
            continue
        subject = found["subject"]
        table = masks if found["mask"] else images
        if subject in table:
            previous = table[subject][0] if table is images else table[subject]
            raise ValueError(
                f"CC359: two files for subject {subject}{' mask' if found['mask'] else ''}: {previous} and {path}."
            )
        table[subject] = path if found["mask"] else (path, found.groupdict())
    if not images:
        raise FileNotFoundError(
            f"{dataset_dir}: no CC359 image named CCxxxx_<vendor>_<field>_<age>_<sex>.nii.gz under it."
        )
    entries = []
    for subject in sorted(images):
        path, fields = images[subject]
        entry = {
            "image": str(path),
            "subject": subject,
            "site": f"{fields['vendor']}_{fields['field']}",
            "vendor": fields["vendor"],
            "field": 1.5 if fields["field"] == "15" else 3.0,
            "age": int(fields["age"]),
            "sex": fields["sex"],
        }
        if subject in masks:
            entry["label"] = str(masks[subject])
        entries.append(entry)
    return entries


def cc359_datalist(dataset_dir: str | Path, split: tuple[int, int, int] = (45, 5, 10), seed: int = 0) -> dict:
    """Deterministic per-site subject split into training / validation / test.

    Within each site the subjects (sorted by id) are shuffled with ``seed`` and cut into
    ``split`` = (n_train, n_val, n_test) subjects; the reference code's split sizes are 45/5/10.

    Raises:
        ValueError: a site with fewer subjects than the split needs.
    """
    entries = find_cc359(dataset_dir)
    datalist = {
        "description": (
            f"CC359 from {Path(dataset_dir).resolve()}, per-site split {split[0]}/{split[1]}/{split[2]}, seed {seed}"
        ),
        "training": [],
        "validation": [],
        "test": [],
    }
    for site_number, site in enumerate(CC359_SITES):
        subjects = [e for e in entries if e["site"] == site]
        if not subjects:
            continue
        if len(subjects) < sum(split):
            raise ValueError(
                f"CC359 site {site} has {len(subjects)} subjects under {dataset_dir}, "
                f"fewer than the split {split} needs."
            )
        order = np.random.default_rng(seed + site_number).permutation(len(subjects))
        chosen = [subjects[i] for i in order]
        datalist["training"] += chosen[: split[0]]
        datalist["validation"] += chosen[split[0] : split[0] + split[1]]
        datalist["test"] += chosen[split[0] + split[1] : sum(split)]
    return datalist


def write_cc359_datalist(dataset_dir: str | Path, output_file: str | Path, split=(45, 5, 10), seed: int = 0) -> Path:
    """Build the CC359 datalist and write it as JSON (atomically)."""
    return write_json_atomic(output_file, cc359_datalist(dataset_dir, tuple(split), seed))
