"""End-to-end inference time of the aiva_brain bundle on one 3D brain-sized volume.

Writes one SYNTHETIC T1-like volume (default 256 x 256 x 256 at 1 mm, an ellipsoidal "brain" in a
darker "head") as NIfTI, then runs configs/inference.json on it the way a user does (reading, resampling
to the model grid, slice-by-slice network, resampling back, writing the mask NIfTI, the overlay PNG and
the summary CSV row) with the shipped models/model.pt, and prints a table: total wall time of the
bundle run (process start-up and imports excluded, reported separately), the per-case time the bundle
itself records in summary.csv, and the device.

    python benchmarks/inference_volume.py                     # CPU here; the GPU when one is present
    python benchmarks/inference_volume.py --repeats 3 --device cuda
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "bundles" / "aiva_brain" / "configs"


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    head = (grid**2).sum(0) < 0.9**2
    brain = ((grid / np.array([0.75, 0.65, 0.7])[:, None, None, None]) ** 2).sum(0) < 1
    image = 200.0 * head + 400.0 * brain + rng.normal(0, 20, shape)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.0, 1.0, 1.0, 1.0])), str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", type=int, nargs=3, default=[256, 256, 256])
    parser.add_argument(
        "--repeats", type=int, default=2, help="bundle runs on the same volume (the first includes warm-up)"
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--json", default=None, help="also write every number here (for benchmarks/gpu/summary.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()

    start = time.perf_counter()
    import torch
    from monai.bundle import run

    import aiva_monai  # noqa: F401

    imports = time.perf_counter() - start
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    name = (
        torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores visible"
    )
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        volume = folder / "subject.nii.gz"
        start = time.perf_counter()
        make_volume(volume, tuple(args.shape))
        print(
            f"synthetic volume {tuple(args.shape)} at 1 mm written in {time.perf_counter() - start:.1f} s "
            "(not timed below)"
        )
        for repeat in range(args.repeats):
            output = folder / f"out{repeat}"
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(
                config_file=str(CONFIGS / "inference.json"),
                dataset_dir=str(volume),
                output_dir=str(output),
                device=f"$torch.device('{device}')",
                amp=device.startswith("cuda"),
                progress=False,
            )
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            with open(output / "summary.csv") as handle:
                row = next(csv.DictReader(handle))
            assert (output / "subject_brainmask.nii.gz").is_file(), "no mask written"
            case_time = float(row.get("seconds") or "nan")
            rows.append((repeat + 1, wall, case_time, row.get("status", "?")))
    print()
    print(
        f"device: {device} ({name}); volume {args.shape[0]}x{args.shape[1]}x{args.shape[2]} at 1 mm; "
        f"python + torch + MONAI imports {imports:.1f} s (not included)"
    )
    print()
    print(
        "| run | bundle run wall s (parse + read + infer + write mask/PNG/CSV) | case time s (summary.csv) | status |"
    )
    print("|---|---|---|---|")
    for repeat, wall, case_time, status in rows:
        print(f"| {repeat} | {wall:.2f} | {case_time:.2f} | {status} |")
    if args.json:
        import json

        runs = [{"run": r, "bundle_wall_s": w, "case_s": c, "status": s} for r, w, c, s in rows]
        record = {"device": device, "device_name": name, "shape": args.shape, "imports_s": imports, "runs": runs}
        Path(args.json).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
