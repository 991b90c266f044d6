"""Reader for the IXI-HH folder (../shared/data/ixi_hh): images/<ID>.nii.gz and labels/<ID>.nii.gz."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["ixi_datalist", "ixi_sim_datalist"]


def ixi_datalist(root: str | Path, site: str = "ixi_hh") -> list[dict]:
    """One dict per subject, sorted by subject id: ``image``, ``label``, ``subject``, ``site``.

    Raises:
        FileNotFoundError: when ``root`` has no ``images`` folder, or an image has no mask.
    """
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise FileNotFoundError(f"{root}: no 'images' folder; expected the IXI-HH layout images/ + labels/.")
    datalist = []
    for image in sorted(images.glob("*.nii.gz")):
        subject = image.name[: -len(".nii.gz")]
        label = root / "labels" / image.name
        if not label.is_file():
            raise FileNotFoundError(f"{image}: no brain mask at {label}.")
        datalist.append({"image": str(image), "label": str(label), "subject": subject, "site": site})
    if not datalist:
        raise FileNotFoundError(f"{images}: no *.nii.gz images.")
    return datalist


def ixi_sim_datalist(
    root: str | Path,
    source_split=(80, 5, 15),
    target_split=(60, 5, 20),
    target_change: str = "strong",
    seed: int = 0,
) -> dict:
    """IXI-HH split into two disjoint subject groups: a real source site and a SIMULATED target site.

    Subjects (sorted by id) are shuffled with ``seed``; the first ``sum(source_split)`` form site
    ``ixi_hh`` (train / val / test), the next ``sum(target_split)`` form site
    ``ixi_hh_simulated_<target_change>``, whose entries carry ``"simulate": {"preset": target_change,
    "seed": seed}`` so the images are turned into that simulated scanner when loaded. Paths are
    relative to ``root`` (pass it as ``dataset_dir``).
    """
    entries = ixi_datalist(root)
    needed = sum(source_split) + sum(target_split)
    if len(entries) < needed:
        raise ValueError(f"{root}: {len(entries)} subjects, fewer than the {needed} the splits need.")
    order = np.random.default_rng(seed).permutation(len(entries))
    shuffled = [entries[i] for i in order]
    target_site = f"ixi_hh_simulated_{target_change}"
    datalist = {
        "description": (
            f"IXI-HH (real, Philips 3T, 2 mm) split by subject with seed {seed}: site ixi_hh = {source_split} "
            f"train/val/test subjects; site {target_site} = {target_split} other subjects whose images are passed "
            f"through the SIMULATED scanner change '{target_change}' (aiva_monai.data.simulate). "
            "Not a real second site."
        ),
        "default_source_site": "ixi_hh",
        "default_target_site": target_site,
        "training": [],
        "validation": [],
        "test": [],
    }
    begin = 0
    for site, split, simulate in (
        ("ixi_hh", source_split, None),
        (target_site, target_split, {"preset": target_change, "seed": seed}),
    ):
        for name, count in zip(("training", "validation", "test"), split):
            for entry in shuffled[begin : begin + count]:
                relative = {
                    "image": f"images/{Path(entry['image']).name}",
                    "label": f"labels/{Path(entry['label']).name}",
                    "subject": entry["subject"],
                    "site": site,
                }
                if simulate:
                    relative["simulate"] = dict(simulate)
                datalist[name].append(relative)
            begin += count
    return datalist
