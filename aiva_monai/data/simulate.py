"""Simulated scanner changes: turn a group of subjects of one real site into a new, *simulated* site.

Each effect is a documented, seeded operation on a 3D image (intensities scaled by their 99.5th
percentile first, scaled back after), applied in acquisition order:

1. contrast curve: ``I -> I ** gamma`` (gamma > 1 darkens mid-grey tissue, < 1 brightens it);
2. bias field: multiplicative ``exp(p(x))`` with ``p`` a degree-3 polynomial whose coefficients are
   drawn from [-bias_field, bias_field] (MONAI ``RandBiasField``), as from receive-coil sensitivity;
3. slice thickness: the image is averaged over ``slice_thickness`` voxels along ``thickness_axis``,
   sub-sampled, and linearly interpolated back to the original grid (a thick-slice acquisition);
4. ringing: k-space truncation (MONAI ``GibbsNoise`` with alpha = ``ringing``), Gibbs artefacts;
5. noise: Rician noise of standard deviation ``noise`` (fraction of the 99.5th percentile).

The same (change, seed, subject) always gives the same image. Use ``SimulateScannerd`` inside a
preprocessing chain (a datalist entry with ``"simulate": {"preset": "...", "seed": N}``), or the
command line to write simulated NIfTI files and their datalist:

    python -m aiva_monai.data.simulate --datalist in.json --split test --sites ixi_hh \
        --preset strong --seed 0 --output-dir out/ --site-name ixi_hh_simulated_strong
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import GibbsNoise, MapTransform, RandBiasField
from scipy import ndimage

from aiva_monai.data.datalist import load_datalist
from aiva_monai.io import write_json_atomic, write_nifti_atomic

__all__ = ["ScannerChange", "PRESETS", "simulate_scanner", "SimulateScannerd", "subject_seed"]


@dataclass(frozen=True)
class ScannerChange:
    """A simulated scanner; every effect is off at its neutral value (see the module docstring)."""

    gamma: float = 1.0
    bias_field: float = 0.0
    slice_thickness: float = 1.0
    thickness_axis: int = 2
    ringing: float = 0.0
    noise: float = 0.0

    def __post_init__(self):
        if (
            self.gamma <= 0
            or self.bias_field < 0
            or self.slice_thickness < 1
            or not 0 <= self.ringing < 1
            or self.noise < 0
        ):
            raise ValueError(
                f"invalid scanner change {self}: need gamma > 0, bias_field >= 0, slice_thickness >= 1, "
                "0 <= ringing < 1, noise >= 0."
            )
        if self.thickness_axis not in (0, 1, 2):
            raise ValueError(f"thickness_axis must be 0, 1 or 2, got {self.thickness_axis}.")


PRESETS = {
    "none": ScannerChange(),
    "mild": ScannerChange(gamma=1.3, bias_field=0.2, slice_thickness=1.5, ringing=0.0, noise=0.01),
    "strong": ScannerChange(gamma=2.0, bias_field=0.4, slice_thickness=2.0, ringing=0.3, noise=0.03),
    "bright": ScannerChange(gamma=0.5, bias_field=0.3, slice_thickness=1.0, ringing=0.2, noise=0.02),
}


def subject_seed(seed: int, subject: str) -> int:
    """A stable per-subject seed (crc32 of the subject id, independent of Python's hash salt)."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(subject).encode())) % 2**31


def simulate_scanner(image, change: ScannerChange, seed: int) -> np.ndarray:
    """Apply ``change`` to a 3D image (X, Y, Z) or channel-first (C, X, Y, Z); returns float32 of the same shape."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        return simulate_scanner(array[None], change, seed)[0]
    if array.ndim != 4:
        raise ValueError(f"simulate_scanner expects a 3D image or (C, X, Y, Z), got shape {array.shape}.")
    rng = np.random.default_rng(seed)
    scale = float(np.percentile(array, 99.5)) or 1.0
    x = np.clip(array / scale, 0.0, None)
    if change.gamma != 1.0:
        x = x**change.gamma
    if change.bias_field > 0:
        bias = RandBiasField(degree=3, coeff_range=(-change.bias_field, change.bias_field), prob=1.0)
        bias.set_random_state(seed=int(rng.integers(2**31)))
        x = np.asarray(bias(torch.as_tensor(x)), dtype=np.float64)
    if change.slice_thickness > 1:
        axis = change.thickness_axis + 1
        size = x.shape[axis]
        thick = ndimage.uniform_filter1d(x, size=int(round(change.slice_thickness)), axis=axis, mode="nearest")
        centres = np.arange(0, size, change.slice_thickness)
        sampled = np.take(thick, np.round(centres).astype(int).clip(0, size - 1), axis=axis)
        x = np.apply_along_axis(lambda line: np.interp(np.arange(size), centres, line), axis, sampled)
    if change.ringing > 0:
        x = np.asarray(GibbsNoise(alpha=change.ringing)(torch.as_tensor(x)), dtype=np.float64)
    if change.noise > 0:
        real = x + rng.normal(scale=change.noise, size=x.shape)
        imaginary = rng.normal(scale=change.noise, size=x.shape)
        x = np.sqrt(real**2 + imaginary**2)
    return (x * scale).astype(np.float32)


def _change_of(spec) -> ScannerChange:
    if isinstance(spec, ScannerChange):
        return spec
    if isinstance(spec, str):
        spec = {"preset": spec}
    preset = spec.get("preset")
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown scanner preset {preset!r}; presets: {sorted(PRESETS)}.")
    fields = {f.name for f in dataclasses.fields(ScannerChange)}
    overrides = {k: v for k, v in spec.items() if k in fields}
    return dataclasses.replace(PRESETS[preset] if preset else ScannerChange(), **overrides)


class SimulateScannerd(MapTransform):
    """Applies the scanner change described by ``data[spec_key]`` to ``data[image_key]``; entries
    without ``spec_key`` pass unchanged. The spec is a preset name or a dict with an optional
    ``preset``, ``ScannerChange`` fields and a ``seed``; the seed is combined with ``data["subject"]``
    so every subject of a simulated site gets its own, reproducible field and noise.

    Deterministic for a given entry, so a ``CacheDataset`` caches its output.
    """

    def __init__(self, image_key: str = "image", spec_key: str = "simulate") -> None:
        super().__init__(keys=[image_key], allow_missing_keys=True)
        self.image_key = image_key
        self.spec_key = spec_key

    def __call__(self, data):
        spec = data.get(self.spec_key)
        if not spec or self.image_key not in data:
            return data
        out = dict(data)
        seed = subject_seed(spec.get("seed", 0) if isinstance(spec, dict) else 0, data.get("subject", ""))
        image = data[self.image_key]
        simulated = torch.as_tensor(simulate_scanner(image, _change_of(spec), seed))
        out[self.image_key] = MetaTensor(simulated, meta=image.meta) if isinstance(image, MetaTensor) else simulated
        return out


def write_simulated_site(datalist_file, split, sites, change, seed, output_dir, site_name, base_dir=None) -> Path:
    """Write simulated images of every (split, sites) entry to ``output_dir`` and a datalist beside them.

    Masks are referenced, not copied (the anatomy is unchanged). Inputs are never overwritten.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if "simulated" not in site_name:
        site_name = f"{site_name}_simulated"
    change = _change_of(change)
    entries = []
    for entry in load_datalist(datalist_file, split, sites, base_dir=base_dir):
        source = Path(entry["image"])
        target = output_dir / source.name
        if target.resolve() == source.resolve():
            raise ValueError(f"{source}: refusing to overwrite an input image; choose another --output-dir.")
        loaded = nib.load(str(source))
        simulated = simulate_scanner(loaded.get_fdata(), change, subject_seed(seed, entry.get("subject", source.name)))
        write_nifti_atomic(simulated, loaded.affine, target, f"SIMULATED scanner ({site_name})")
        entries.append(
            {**entry, "image": str(target), "site": site_name, "simulated": True, "source_site": entry.get("site")}
        )
    description = (
        f"SIMULATED site {site_name}: {dataclasses.asdict(change)}, seed {seed}, from {datalist_file} "
        f"[{split}] sites {sites}. Not a real scanner."
    )
    return write_json_atomic(
        output_dir / "datalist.json", {"description": description, "simulated": True, split: entries}
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Write a simulated site (see the module docstring).")
    parser.add_argument("--datalist", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--sites", nargs="*")
    parser.add_argument("--preset", default="strong", choices=sorted(PRESETS))
    parser.add_argument("--change", default="{}", help="JSON overrides, e.g. '{\"gamma\": 1.5}'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--site-name", default=None)
    args = parser.parse_args(argv)
    change = {"preset": args.preset, **json.loads(args.change)}
    path = write_simulated_site(
        args.datalist,
        args.split,
        args.sites,
        change,
        args.seed,
        args.output_dir,
        args.site_name or f"simulated_{args.preset}",
    )
    print(f"wrote SIMULATED site datalist {path}")


if __name__ == "__main__":
    main()
