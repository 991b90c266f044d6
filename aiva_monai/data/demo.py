"""A small SYNTHETIC two-site head-MRI set the package makes itself, for the demo and CI.

Each subject is a random phantom head (scalp, skull, CSF, grey and white matter, ventricles) with its
brain mask; the target site is the same kind of phantom seen through a simulated scanner change
(``aiva_monai.data.simulate``). Nothing here is real data: every file, site name and description
says "synthetic".
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from aiva_monai.io import write_json_atomic, write_nifti_atomic

__all__ = ["phantom_head", "make_demo_dataset", "DEMO_SITES"]

DEMO_SITES = ("synthetic_a", "synthetic_b")


def _wobbly_ellipsoid(coords, centre, radii, rng, wobble):
    """Boolean ellipsoid whose radius varies smoothly with direction by up to ``wobble``."""
    shape = coords[0].shape
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 6)
    field = field / (np.abs(field).max() + 1e-9)
    distance = np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)))
    return distance <= 1.0 + wobble * field


def phantom_head(shape=(48, 64, 64), spacing=3.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic T1-like head and its brain mask, in RAS with ``spacing`` mm voxels.

    Returns:
        image: float32 (X, Y, Z), intensities about 0..1 with noise.
        mask: uint8 (X, Y, Z), 1 = brain.
    """
    rng = np.random.default_rng(seed)
    coords = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing for n in shape], indexing="ij")
    centre = rng.normal(scale=4.0, size=3)
    head_radii = np.array([68.0, 88.0, 82.0]) * rng.uniform(0.9, 1.05)
    head = _wobbly_ellipsoid(coords, centre, head_radii, rng, 0.03)
    skull_outer = _wobbly_ellipsoid(coords, centre, head_radii * 0.93, rng, 0.03)
    brain = _wobbly_ellipsoid(coords, centre, head_radii * rng.uniform(0.78, 0.84), rng, 0.05)
    white = _wobbly_ellipsoid(coords, centre, head_radii * 0.6, rng, 0.15) & brain
    ventricles = _wobbly_ellipsoid(coords, centre + [0, 5, 5], head_radii * np.array([0.12, 0.25, 0.12]), rng, 0.2)
    image = np.zeros(shape)
    image[head] = 0.55  # scalp and fat: bright in T1
    image[skull_outer & ~brain] = 0.08  # bone: dark
    image[brain] = 0.55  # grey matter
    image[white] = 0.8
    image[ventricles & brain] = 0.15  # CSF
    image = ndimage.gaussian_filter(image, 0.6) + rng.normal(scale=0.02, size=shape)
    return np.clip(image, 0, None).astype(np.float32), brain.astype(np.uint8)


def make_demo_dataset(output_dir, n_subjects=(8, 1, 3), shape=(48, 64, 64), spacing=3.0, target_change="strong", seed=0) -> Path:
    """Write SYNTHETIC phantoms of two sites and their datalist; returns the datalist path.

    Site ``synthetic_a`` (the source) is the plain phantom; site ``synthetic_b`` (the target) is the
    phantom through the simulated scanner change ``target_change``. ``n_subjects`` = (train, val, test)
    per site. Existing files are reused, so a second call costs nothing.
    """
    output_dir = Path(output_dir)
    datalist_path = output_dir / "datalist.json"
    if datalist_path.is_file():
        return datalist_path
    output_dir.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    splits = {"training": [], "validation": [], "test": []}
    number = 0
    for site_index, site in enumerate(DEMO_SITES):
        for split, count in zip(splits, n_subjects):
            for _ in range(count):
                subject = f"synthetic_{number:03d}"
                image, mask = phantom_head(shape, spacing, seed=seed * 10_000 + number)
                number += 1
                image_path, mask_path = output_dir / f"{subject}.nii.gz", output_dir / f"{subject}_brainmask.nii.gz"
                write_nifti_atomic(image, affine, image_path, "SYNTHETIC phantom (aiva-monai demo)")
                write_nifti_atomic(mask, affine, mask_path, "SYNTHETIC phantom mask (aiva-monai demo)")
                entry = {"image": image_path.name, "label": mask_path.name, "subject": subject, "site": site, "synthetic": True}
                if site_index == 1:
                    entry["simulate"] = {"preset": target_change, "seed": seed}
                splits[split].append(entry)
    description = (
        "SYNTHETIC demo data made by aiva_monai.data.demo: phantom heads, not real MRI. "
        f"Source site {DEMO_SITES[0]}; target site {DEMO_SITES[1]} = the same phantoms through the simulated "
        f"scanner change '{target_change}'."
    )
    return write_json_atomic(datalist_path, {"description": description, "synthetic": True, **splits})
