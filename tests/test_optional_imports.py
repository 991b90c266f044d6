"""POT (SegJDoT only, a 33 MB wheel), SimpleITK (DICOM only, 53 MB) and jsonschema (the metadata check only) are
imported where they are used, so the trainers, the clustering handler, the bundle helpers and NIfTI inference run
without them: the GPU benchmark script carries its
wheels to a machine that lacks them, within a 64 MiB limit (benchmarks/gpu/)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BLOCKED = textwrap.dedent(
    """
    import sys
    sys.modules["ot"] = None  # "import ot" now raises ImportError, as on a machine without POT
    sys.modules["SimpleITK"] = None
    sys.modules["jsonschema"] = None  # only verify_metadata needs it
    """
)


def _run(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    script = tmp_path / "probe.py"
    script.write_text(BLOCKED + textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def test_trainers_and_nifti_inference_need_no_pot_simpleitk_or_jsonschema(tmp_path):
    result = _run(
        """
        import nibabel as nib, numpy as np, torch
        import aiva_monai.engines, aiva_monai.handlers, aiva_monai.inference, aiva_monai.bundle
        from aiva_monai.inference.readers import read_scan
        from aiva_monai.inference.scans import find_scans
        from aiva_monai.jdot import jdot_plan

        volume = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
        from pathlib import Path
        Path("scans").mkdir()  # a folder of NIfTI files only (other files would be probed for DICOM series)
        nib.save(nib.Nifti1Image(volume, np.diag([2.0, 2.0, 2.0, 1.0])), "scans/scan.nii.gz")
        (case,) = find_scans("scans")
        image = read_scan(case)
        assert tuple(image.shape) == (1, 6, 7, 8), image.shape
        assert np.allclose(image[0].numpy(), volume)
        try:  # the import is deferred, not gone: SegJDoT still needs POT and says so
            jdot_plan(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 2), torch.zeros(2, 2))
        except ImportError as error:
            print("jdot:", error)
        print("ok")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok" in result.stdout
    assert "jdot:" in result.stdout and "ot" in result.stdout, result.stdout
