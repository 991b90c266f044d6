"""Reader for the common multi-site prostate T2 layout (six sites A-F), and a SYNTHETIC set in that layout.

The layout (as shared by the multi-site prostate segmentation works the AIVA paper uses) is one
folder per site, each holding ``CaseNN.nii.gz`` and its mask ``CaseNN_segmentation.nii.gz`` (some
releases capitalise ``Segmentation``)::

    <dataset_dir>/[any sub-folders/]ISBI/Case00.nii.gz, Case00_segmentation.nii.gz, ...
                                    ISBI_1.5/  I2CVB/  UCL/  BIDMC/  HK/

Site letters: A = ISBI (RUNMC), B = ISBI_1.5 (BMC), C = I2CVB (HCRUDB), D = UCL, E = BIDMC, F = HK.
Masks with labels above 1 (zonal labels) are merged into one prostate label by the preprocessing
(``volume_transforms(merge_labels=True)``); files are never rewritten.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from scipy import ndimage

from aiva_monai.io import write_json_atomic, write_nifti_atomic

__all__ = ["PROSTATE_SITES", "find_prostate", "prostate_datalist", "write_prostate_datalist", "make_prostate_demo"]

# letter -> (folder in the release, institution)
PROSTATE_SITES = {
    "A": ("ISBI", "RUNMC"),
    "B": ("ISBI_1.5", "BMC"),
    "C": ("I2CVB", "HCRUDB"),
    "D": ("UCL", "UCL"),
    "E": ("BIDMC", "BIDMC"),
    "F": ("HK", "HK"),
}
_FOLDER_TO_LETTER = {folder.lower(): letter for letter, (folder, _) in PROSTATE_SITES.items()}
_NAME = re.compile(r"^(?P<case>case\d+)(?P<mask>_segmentation)?\.nii(\.gz)?$", re.IGNORECASE)


def _site_folders(dataset_dir: Path) -> dict[str, Path]:
    folders: dict[str, Path] = {}
    for path in sorted([dataset_dir, *dataset_dir.rglob("*")]):
        letter = _FOLDER_TO_LETTER.get(path.name.lower()) if path.is_dir() else None
        if letter is None:
            continue
        if letter in folders:
            raise ValueError(
                f"prostate data: two folders for site {letter} ({PROSTATE_SITES[letter][0]}): "
                f"{folders[letter]} and {path}."
            )
        folders[letter] = path
    return folders


def find_prostate(dataset_dir: str | Path) -> list[dict]:
    """One entry per case, sorted by site letter and case: ``image``, ``label`` (when its mask exists),
    ``subject`` (e.g. ``"F_Case03"``), ``site`` (letter), ``site_folder``, ``institution``.

    Raises:
        FileNotFoundError: the folder is missing or holds no site folder with a ``CaseNN`` image.
        ValueError: two folders of one site, two masks (or images) of one case, or a mask without its image.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"prostate folder {dataset_dir} does not exist.")
    entries = []
    for letter, folder in sorted(_site_folders(dataset_dir).items()):
        images: dict[str, Path] = {}
        masks: dict[str, Path] = {}
        for path in sorted(folder.iterdir()):
            found = _NAME.match(path.name) if path.is_file() else None
            if found is None:
                continue
            case = "Case" + found["case"][4:]
            table = masks if found["mask"] else images
            if case in table:
                raise ValueError(
                    f"prostate site {letter}: two {'masks' if found['mask'] else 'images'} for {case}: "
                    f"{table[case]} and {path}."
                )
            table[case] = path
        orphans = sorted(set(masks) - set(images))
        if orphans:
            raise ValueError(f"prostate site {letter}: masks without an image in {folder}: {orphans}.")
        for case in sorted(images, key=lambda c: int(c[4:])):
            entry = {
                "image": str(images[case]),
                "subject": f"{letter}_{case}",
                "site": letter,
                "site_folder": PROSTATE_SITES[letter][0],
                "institution": PROSTATE_SITES[letter][1],
            }
            if case in masks:
                entry["label"] = str(masks[case])
            entries.append(entry)
    if not entries:
        expected = ", ".join(folder for folder, _ in PROSTATE_SITES.values())
        raise FileNotFoundError(
            f"{dataset_dir}: no prostate site folder ({expected}) holding CaseNN.nii.gz images under it."
        )
    return entries


def prostate_datalist(
    dataset_dir: str | Path, fractions: tuple[float, float, float] = (0.6, 0.15, 0.25), seed: int = 0
) -> dict:
    """Deterministic per-site case split into training / validation / test.

    Within each site the cases are shuffled with ``seed`` and cut by ``fractions`` (validation and test
    get at least one case each, rounded to the nearest case; the rest is training). The sites have
    12 to 30 cases, so the default gives e.g. 18/5/7 for A and 8/2/2 for F. The validation cases of
    the source sites select checkpoints; the target site's training cases are its unlabelled
    adaptation data, its test cases the evaluation.

    Raises:
        ValueError: a site with fewer than 3 cases.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}.")
    entries = find_prostate(dataset_dir)
    datalist = {
        "description": (
            f"multi-site prostate from {Path(dataset_dir).resolve()}, per-site split {fractions}, seed {seed}"
        ),
        "training": [],
        "validation": [],
        "test": [],
    }
    for number, letter in enumerate(PROSTATE_SITES):
        cases = [e for e in entries if e["site"] == letter]
        if not cases:
            continue
        if len(cases) < 3:
            raise ValueError(
                f"prostate site {letter} under {dataset_dir} has {len(cases)} cases; a split needs at least 3."
            )
        n_val = max(1, int(round(fractions[1] * len(cases))))
        n_test = max(1, int(round(fractions[2] * len(cases))))
        order = np.random.default_rng(seed + number).permutation(len(cases))
        chosen = [cases[i] for i in order]
        datalist["validation"] += chosen[:n_val]
        datalist["test"] += chosen[n_val : n_val + n_test]
        datalist["training"] += chosen[n_val + n_test :]
    return datalist


def write_prostate_datalist(
    dataset_dir: str | Path, output_file: str | Path, fractions=(0.6, 0.15, 0.25), seed: int = 0, **extra
) -> Path:
    """Build the prostate datalist (``extra`` keys are added at the top level) and write it as JSON (atomically)."""
    return write_json_atomic(output_file, {**prostate_datalist(dataset_dir, tuple(fractions), seed), **extra})


# -- SYNTHETIC data in the release layout (demo and CI) ----------------------------------------------------------

# per site: in-plane voxel size (mm), slice thickness (mm), intensity scale, contrast exponent, noise, bias
_DEMO_SCANNERS = {
    "A": (2.0, 4.0, 900.0, 1.0, 0.03, 0.0),
    "B": (2.2, 4.0, 300.0, 1.2, 0.05, 0.2),
    "C": (1.8, 4.5, 2000.0, 0.9, 0.02, 0.1),
    "D": (2.0, 3.5, 600.0, 1.1, 0.04, 0.3),
    "E": (2.4, 4.0, 120.0, 1.3, 0.06, 0.2),
    "F": (2.0, 4.0, 1500.0, 1.8, 0.08, 0.4),
}


def phantom_pelvis(shape=(48, 48, 14), spacing=(2.0, 2.0, 4.0), seed=0, gamma=1.0, noise=0.03, bias=0.0):
    """A synthetic T2-like pelvis: body, muscle, bladder, rectum and a two-zone prostate.

    Returns:
        image: float32 (X, Y, Z), RAS, intensities about 0..1 before any scale.
        mask: uint8 (X, Y, Z): 1 = central gland, 2 = peripheral zone (a zonal mask, merged to 1 by the
        preprocessing, as releases with zonal labels need).
    """
    rng = np.random.default_rng(seed)
    coords = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing)], indexing="ij")

    def ellipsoid(centre, radii):
        return sum(((c - m) / r) ** 2 for c, m, r in zip(coords, centre, radii)) <= 1.0

    centre = rng.normal(scale=3.0, size=3) * [1, 1, 0.5]
    size = rng.uniform(0.85, 1.15)
    body = ellipsoid([0, 0, 0], [46, 36, 80])
    muscle = ellipsoid([0, -4, 0], [34, 26, 80]) & body
    prostate = ellipsoid(centre, np.array([17.0, 14.0, 15.0]) * size)
    central = ellipsoid(centre + [0, 3, 0], np.array([10.0, 8.0, 11.0]) * size) & prostate
    bladder = ellipsoid(centre + [0, 6, 22], [16, 14, 12]) & ~prostate
    rectum = ellipsoid(centre + [0, -22, 0], [9, 7, 30])
    image = np.zeros(shape)
    image[body] = 0.55  # fat
    image[muscle] = 0.25
    image[prostate] = 0.6  # peripheral zone: bright in T2
    image[central] = 0.35
    image[bladder] = 1.0  # urine
    image[rectum] = 0.1
    image = ndimage.gaussian_filter(image, 0.7)
    if bias:
        x, y = coords[0] / 50.0, coords[1] / 40.0
        image = image * np.exp(bias * (rng.uniform(-1, 1) * x + rng.uniform(-1, 1) * y))
    image = np.clip(image, 0, None) ** gamma + rng.normal(scale=noise, size=shape)
    mask = np.zeros(shape, np.uint8)
    mask[prostate] = 2
    mask[central] = 1
    return np.clip(image, 0, None).astype(np.float32), mask


def make_prostate_demo(
    output_dir, cases_per_site: int = 8, shape=(48, 48, 14), target_site: str = "F", seed: int = 0
) -> Path:
    """Write a SYNTHETIC six-site prostate set in the release layout (``SYNTHETIC_prostate/<site folder>/CaseNN.nii.gz``
    and ``CaseNN_segmentation.nii.gz``, with site-specific voxel size, intensity scale, contrast, noise and
    bias), and its datalist built by ``find_prostate``; returns the datalist path. Existing files are reused.

    Nothing here is real data: the folder, every NIfTI description and the datalist say "synthetic".
    """
    output_dir = Path(output_dir)
    datalist_path = output_dir / "datalist.json"
    if datalist_path.is_file():
        return datalist_path
    root = output_dir / "SYNTHETIC_prostate"
    for number, (letter, (folder, _)) in enumerate(PROSTATE_SITES.items()):
        in_plane, thickness, scale, gamma, noise, bias = _DEMO_SCANNERS[letter]
        spacing = (in_plane, in_plane, thickness)
        # every site sees the same ~96 x 96 x 56 mm field of view on its own grid
        grid = tuple(int(round(n * s / t)) for n, s, t in zip(shape, (2.0, 2.0, 4.0), spacing))
        for case in range(cases_per_site):
            image, mask = phantom_pelvis(
                grid, spacing, seed=seed * 100_000 + number * 1000 + case, gamma=gamma, noise=noise, bias=bias
            )
            affine = np.diag([*spacing, 1.0])
            name = f"Case{case:02d}"
            # exercise both spellings of the mask name, as the releases differ
            mask_name = f"{name}_{'Segmentation' if letter in 'CE' else 'segmentation'}.nii.gz"
            write_nifti_atomic(
                image * scale, affine, root / folder / f"{name}.nii.gz", "SYNTHETIC prostate phantom (aiva-monai demo)"
            )
            write_nifti_atomic(
                mask, affine, root / folder / mask_name, "SYNTHETIC prostate phantom mask (aiva-monai demo)"
            )
    description = (
        "SYNTHETIC demo data made by aiva_monai.data.prostate.make_prostate_demo: pelvis phantoms in the multi-site "
        "prostate layout (six simulated scanners), not real MRI."
    )
    return write_prostate_datalist(
        root, datalist_path, seed=seed, synthetic=True, default_target_site=target_site, description=description
    )
