"""The data a bundle runs on: the datalist (given, written from a release folder, or the SYNTHETIC demo), its
sites, and the entries / unlabelled slices of one split."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aiva_monai.data.cc359 import find_cc359, write_cc359_datalist
from aiva_monai.data.datalist import load_datalist
from aiva_monai.data.demo import DEMO_SITES, make_demo_dataset
from aiva_monai.data.prostate import find_prostate, make_prostate_demo, write_prostate_datalist

__all__ = [
    "LAYOUTS",
    "resolve_datalist",
    "is_synthetic",
    "datalist_base_dir",
    "default_site",
    "other_sites",
    "entries",
    "unlabelled_slices",
]

logger = logging.getLogger(__name__)


# layout -> (finder of the release's files, datalist writer, SYNTHETIC demo maker, what the files look like)
LAYOUTS = {
    "cc359": (
        find_cc359,
        write_cc359_datalist,
        make_demo_dataset,
        "CC359 files (CCxxxx_<vendor>_<field>_<age>_<sex>.nii.gz)",
    ),
    "prostate": (
        find_prostate,
        write_prostate_datalist,
        make_prostate_demo,
        "prostate site folders (ISBI, ISBI_1.5, I2CVB, UCL, BIDMC, HK) with CaseNN.nii.gz",
    ),
}


def resolve_datalist(dataset_dir, datalist, output_dir, demo_dir=None, layout: str = "cc359") -> str:
    """Path of the datalist JSON to use.

    - ``datalist`` given: that file (a datalist JSON, see ``aiva_monai.data.datalist``);
    - no ``dataset_dir``: the built-in SYNTHETIC demo set of ``layout``, made under ``demo_dir``
      (default ``<output_dir>/demo_data``) on first use;
    - ``dataset_dir`` holding ``datalist.json``: that file;
    - ``dataset_dir`` holding the release files of ``layout`` ("cc359": per-site 45/5/10 split;
      "prostate": per-site 60/15/25 % split): a datalist written to ``<output_dir>/datalist_<layout>.json``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown data layout {layout!r}; layouts: {sorted(LAYOUTS)}.")
    finder, writer, demo_maker, looks_like = LAYOUTS[layout]
    if datalist:
        path = Path(datalist)
        if not path.is_file():
            raise FileNotFoundError(f"datalist {path} does not exist.")
        return str(path)
    if not dataset_dir:
        return str(demo_maker(Path(demo_dir or Path(output_dir) / "demo_data")))
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset_dir {dataset_dir} does not exist.")
    if (dataset_dir / "datalist.json").is_file():
        return str(dataset_dir / "datalist.json")
    try:
        finder(dataset_dir)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"dataset_dir {dataset_dir}: no {looks_like} and no datalist.json; pass --datalist with a datalist JSON."
        ) from None
    return str(writer(dataset_dir, Path(output_dir) / f"datalist_{layout}.json"))


def is_synthetic(datalist_file) -> bool:
    """True for the built-in SYNTHETIC demo set (its datalist says so); the configs then use demo settings."""
    return bool(json.loads(Path(datalist_file).read_text()).get("synthetic", False))


def datalist_base_dir(dataset_dir, datalist_file) -> str:
    """Relative paths in a datalist are relative to ``dataset_dir`` when given, else to the JSON's folder."""
    return str(Path(dataset_dir) if dataset_dir else Path(datalist_file).parent)


def default_site(datalist_file, role: str, site=None):
    """``site`` if given, else the datalist's ``default_<role>_site`` (role: "source" or "target")."""
    if site:
        return site
    content = json.loads(Path(datalist_file).read_text())
    found = content.get(f"default_{role}_site")
    if found is None and content.get("synthetic"):
        found = DEMO_SITES[0] if role == "source" else DEMO_SITES[1]
    if found is None:
        sites = sorted({e.get("site") for split in ("training", "validation", "test") for e in content.get(split, [])})
        raise ValueError(f"no --{role}_site given and {datalist_file} names no default; sites: {sites}.")
    return found


def other_sites(datalist_file, target: str, sites=None) -> list[str]:
    """Leave-one-site-out sources: ``sites`` if given (a list, or one comma-separated string), else every
    site of the datalist's training split except ``target``. Their union is one source for the clustering."""
    if sites:
        chosen = [s.strip() for s in sites.split(",")] if isinstance(sites, str) else [str(s) for s in sites]
        if target in chosen:
            raise ValueError(f"the target site {target} is also listed as a source site ({chosen}).")
        return chosen
    content = json.loads(Path(datalist_file).read_text())
    chosen = sorted({e.get("site") for e in content.get("training", []) if e.get("site") and e.get("site") != target})
    if not chosen:
        raise ValueError(f"{datalist_file}: no training site other than the target {target}.")
    return chosen


def entries(datalist_file, split, sites, base_dir, labels: bool = True) -> list[dict]:
    """Datalist entries; with ``labels=False`` the ``label`` key is removed, so no code path can read a
    target label (adaptation never sees one)."""
    found = load_datalist(datalist_file, split, sites, base_dir=base_dir, require_labels=labels)
    return found if labels else [{k: v for k, v in e.items() if k != "label"} for e in found]


def unlabelled_slices(datalist_file, split, site, base_dir, transform, slice_axis: int = 0):
    """The image slices of ``site``'s ``split`` subjects with their labels removed (a ``SliceDataset`` of the key
    "image" only), e.g. held-out target slices for label-free model selection; None when that split holds no
    subject of ``site``."""
    from aiva_monai.data import SliceDataset

    content = json.loads(Path(datalist_file).read_text())
    sites = {site} if isinstance(site, str) else set(site)
    if not any(entry.get("site") in sites for entry in content.get(split, [])):
        return None
    found = load_datalist(datalist_file, split, site, base_dir=base_dir, require_labels=False)
    data = [{k: v for k, v in e.items() if k != "label"} for e in found]
    return SliceDataset(data, transform, keys=("image",), slice_axis=slice_axis, progress=False)
