"""A small SYNTHETIC two-site head-MRI set the package makes itself, for the demo and CI.

Each subject is a random phantom head (scalp, skull, CSF, grey and white matter, ventricles) with its
brain mask. The two sites differ the way real sites do, not only by an intensity curve (``DEMO_SITE_SPECS``):

- population and field of view: the target site's heads are smaller and sit elsewhere in the field of view;
- slice coverage: the target protocol does not reach the top of the head (the vertex is cut off);
- tissue contrast: the target sequence suppresses scalp fat and has less grey/white contrast and brighter CSF;
- scanner: a bias field, thicker slices and more noise (``aiva_monai.data.simulate``, applied on loading).

Nothing here is real data: every file, site name and description says "synthetic".
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from aiva_monai.io import write_json_atomic, write_nifti_atomic

__all__ = ["PhantomSite", "DEMO_SITE_SPECS", "DEMO_SITES", "phantom_head", "make_demo_dataset"]

# bumped when the demo data changes, so an old demo folder is rebuilt rather than reused
DEMO_VERSION = 2

T1_TISSUE = {"scalp": 0.55, "bone": 0.08, "grey": 0.55, "white": 0.8, "csf": 0.15}


@dataclass(frozen=True)
class PhantomSite:
    """How one synthetic site's scans look.

    Attributes:
        name: site name.
        head_scale: range of the random head size (population), relative to an adult head.
        offset_mm: systematic (x, y, z) head position in the field of view (on top of a random 4 mm jitter).
        coverage: fraction of the field of view acquired along z (superior-inferior), from the bottom; the
            rest is not scanned (zero, no mask).
        tissue: mean intensity of scalp, bone, grey matter, white matter and CSF.
        scanner: simulated scanner change (``aiva_monai.data.simulate`` preset name or ``ScannerChange``
            fields), applied when the image is loaded; None for none.
    """

    name: str
    head_scale: tuple[float, float] = (0.9, 1.05)
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    coverage: float = 1.0
    tissue: dict = field(default_factory=lambda: dict(T1_TISSUE))
    scanner: dict | str | None = None


DEMO_SITE_SPECS = (
    PhantomSite("synthetic_a"),
    PhantomSite(
        "synthetic_b",
        head_scale=(0.82, 0.95),
        offset_mm=(0.0, 9.0, -9.0),
        coverage=0.72,
        tissue={"scalp": 0.3, "bone": 0.05, "grey": 0.62, "white": 0.74, "csf": 0.35},
        scanner={
            "gamma": 1.0,
            "bias_field": 0.35,
            "slice_thickness": 2.0,
            "thickness_axis": 2,
            "ringing": 0.0,
            "noise": 0.04,
        },
    ),
)
DEMO_SITES = tuple(site.name for site in DEMO_SITE_SPECS)


def _wobbly_ellipsoid(coords, centre, radii, rng, wobble):
    """Boolean ellipsoid whose radius varies smoothly with direction by up to ``wobble``."""
    shape = coords[0].shape
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma=max(shape) / 6)
    noise = noise / (np.abs(noise).max() + 1e-9)
    distance = np.sqrt(sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)))
    return distance <= 1.0 + wobble * noise


def phantom_head(
    shape=(48, 64, 64), spacing=3.0, seed=0, site: PhantomSite | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A synthetic head and its brain mask, in RAS with ``spacing`` mm voxels, as seen at ``site``
    (default: the source site, a T1-like contrast).

    Returns:
        image: float32 (X, Y, Z), intensities about 0..1 with noise.
        mask: uint8 (X, Y, Z), 1 = brain.
    """
    site = site or DEMO_SITE_SPECS[0]
    rng = np.random.default_rng(seed)
    coords = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * spacing for n in shape], indexing="ij")
    centre = rng.normal(scale=4.0, size=3) + np.asarray(site.offset_mm)
    head_radii = np.array([68.0, 88.0, 82.0]) * rng.uniform(*site.head_scale)
    head = _wobbly_ellipsoid(coords, centre, head_radii, rng, 0.03)
    skull_outer = _wobbly_ellipsoid(coords, centre, head_radii * 0.93, rng, 0.03)
    brain = _wobbly_ellipsoid(coords, centre, head_radii * rng.uniform(0.78, 0.84), rng, 0.05)
    white = _wobbly_ellipsoid(coords, centre, head_radii * 0.6, rng, 0.15) & brain
    ventricles = _wobbly_ellipsoid(coords, centre + [0, 5, 5], head_radii * np.array([0.12, 0.25, 0.12]), rng, 0.2)
    tissue = site.tissue
    image = np.zeros(shape)
    image[head] = tissue["scalp"]
    image[skull_outer & ~brain] = tissue["bone"]
    image[brain] = tissue["grey"]
    image[white] = tissue["white"]
    image[ventricles & brain] = tissue["csf"]
    image = ndimage.gaussian_filter(image, 0.6) + rng.normal(scale=0.02, size=shape)
    mask = brain.astype(np.uint8)
    if site.coverage < 1.0:  # the protocol's field of view stops below the vertex
        top = int(round(shape[2] * site.coverage))
        image[..., top:] = 0.0
        mask[..., top:] = 0
    return np.clip(image, 0, None).astype(np.float32), mask


def make_demo_dataset(
    output_dir, n_subjects=(16, 2, 6), shape=(48, 64, 64), spacing=3.0, seed=0, sites=DEMO_SITE_SPECS
) -> Path:
    """Write SYNTHETIC phantoms of two sites and their datalist; returns the datalist path.

    ``sites`` = (source, target) ``PhantomSite`` specs; ``n_subjects`` = (train, val, test) per site. Existing
    files of the same demo version are reused, so a second call costs nothing.
    """
    output_dir = Path(output_dir)
    datalist_path = output_dir / "datalist.json"
    if datalist_path.is_file():
        content = json.loads(datalist_path.read_text())
        if content.get("demo_version") == DEMO_VERSION and content.get("n_subjects") == list(n_subjects):
            return datalist_path
    output_dir.mkdir(parents=True, exist_ok=True)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    splits = {"training": [], "validation": [], "test": []}
    number = 0
    for site in sites:
        for split, count in zip(splits, n_subjects):
            for _ in range(count):
                subject = f"synthetic_{number:03d}"
                image, mask = phantom_head(shape, spacing, seed=seed * 10_000 + number, site=site)
                number += 1
                image_path, mask_path = output_dir / f"{subject}.nii.gz", output_dir / f"{subject}_brainmask.nii.gz"
                write_nifti_atomic(image, affine, image_path, f"SYNTHETIC phantom, site {site.name} (aiva-monai demo)")
                write_nifti_atomic(mask, affine, mask_path, "SYNTHETIC phantom mask (aiva-monai demo)")
                entry = {
                    "image": image_path.name,
                    "label": mask_path.name,
                    "subject": subject,
                    "site": site.name,
                    "synthetic": True,
                }
                if site.scanner:
                    entry["simulate"] = {
                        **({"preset": site.scanner} if isinstance(site.scanner, str) else site.scanner),
                        "seed": seed,
                    }
                splits[split].append(entry)
    description = (
        "SYNTHETIC demo data made by aiva_monai.data.demo: phantom heads, not real MRI. "
        f"Source site {sites[0].name}; target site {sites[1].name}: other head sizes and field-of-view placement, "
        "a field of view that stops below the vertex, fat-suppressed scalp with less grey/white contrast, and a "
        "simulated bias field, thicker slices and noise. Site specs: " + json.dumps([asdict(s) for s in sites])
    )
    return write_json_atomic(
        datalist_path,
        {
            "description": description,
            "synthetic": True,
            "demo_version": DEMO_VERSION,
            "n_subjects": list(n_subjects),
            **splits,
        },
    )
