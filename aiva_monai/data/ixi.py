"""Reader for the IXI-HH folder (../shared/data/ixi_hh): images/<ID>.nii.gz and labels/<ID>.nii.gz."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ixi_datalist"]


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
