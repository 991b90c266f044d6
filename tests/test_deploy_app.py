"""The MONAI Deploy application (``aiva_monai.deploy_app``, monai-deploy-app-sdk) on CPU: a synthetic DICOM
study of two series (T1 and T2) in; the brain bundle segments the T1 series only and writes a DICOM SEG that
references it. Run in a subprocess: the SDK's Holoscan executor runs native threads."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_inference_safety import write_series

pytest.importorskip("monai.deploy", reason="monai-deploy-app-sdk is not installed (pip install -e '.[deploy]')")

REPOSITORY = Path(__file__).resolve().parents[1]
STUDY = "1.2.826.0.1.3680043.2.1125.9"


def test_the_deploy_app_segments_the_t1_series_of_a_study_into_a_dicom_seg(tmp_path):
    import highdicom as hd

    common = {"0020|000d": STUDY, "0010|0020": "PATIENT1", "0010|0010": "Test^Patient"}
    write_series(
        tmp_path / "study" / "t1",
        shape=(40, 40, 16),
        series_uid=f"{STUDY}.1",
        tags={**common, "0008|103e": "T1 MPRAGE", "0020|0011": "1"},
    )
    write_series(
        tmp_path / "study" / "t2",
        shape=(40, 40, 16),
        series_uid=f"{STUDY}.2",
        first_instance=101,
        tags={**common, "0008|103e": "T2 FLAIR", "0020|0011": "2"},
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "aiva_monai.deploy_app",
            "-i",
            str(tmp_path / "study"),
            "-o",
            str(tmp_path / "out"),
            "--bundle",
            str(REPOSITORY / "bundles" / "aiva_brain"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    segs = sorted((tmp_path / "out").glob("*.seg.dcm"))
    assert [p.name for p in segs] == [f"{STUDY}.1_brainmask.seg.dcm"]  # the T1 series only
    seg = hd.seg.segread(segs[0])
    assert seg.StudyInstanceUID == STUDY and seg.ReferencedSeriesSequence[0].SeriesInstanceUID == f"{STUDY}.1"
    assert seg.get_segment_description(1).segment_label == "brain"
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert len(summary) == 2 and summary[1].startswith(f"{STUDY}.1,") and ",ok," in summary[1]
