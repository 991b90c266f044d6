"""Clinicians' inference (brain bundle config + aiva_monai.inference): per case a mask in the input's
geometry, an overlay PNG and a summary CSV row; bad cases reported and skipped; progress bar; the organ
and mask suffix from the config (what a prostate bundle reuses)."""

import csv
import hashlib
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, run

from aiva_monai.inference import SUMMARY_FIELDS, ExitCode, describe_error, find_scans, save_overlay
from aiva_monai.networks import PreActResUNet
from tests.test_bundle_brain import CONFIGS, head_like, oblique_affine, write_dicom_series, write_oblique_nifti

BUNDLES = CONFIGS.parents[1]

SMALL = {"network_def#channels": [8, 16, 32, 64], "network_def#blocks_per_level": 1}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """Random weights of the small inference network (the pipeline, not the model, is under test)."""
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.manual_seed(0)
    torch.save(PreActResUNet(channels=(8, 16, 32, 64), blocks_per_level=1).state_dict(), path)
    return path


def infer(dataset_dir, output_dir, checkpoint, exit_code=ExitCode.OK, config=CONFIGS / "inference.json", **overrides):
    """Runs the inference config in-process; checks its exit code (``InferenceExit`` is a ``SystemExit``)."""
    try:
        run(
            config_file=str(config),
            dataset_dir=str(dataset_dir),
            output_dir=str(output_dir),
            checkpoint=str(checkpoint),
            logging_file=False,
            **SMALL,
            **overrides,
        )
        code = ExitCode.OK
    except SystemExit as ended:
        code = ended.code
    assert code == exit_code
    return read_summary(Path(output_dir) / "summary.csv")


def read_summary(path):
    with open(path, newline="") as stream:
        reader = csv.DictReader(stream)
        assert tuple(reader.fieldnames) == SUMMARY_FIELDS
        return {row["case"]: row for row in reader}


def is_png(path):
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_bad_case_is_reported_and_skipped_and_the_others_get_mask_overlay_and_row(tmp_path, small_checkpoint, caplog):
    scans = tmp_path / "scans"
    nifti, affine = write_oblique_nifti(scans)
    write_dicom_series(scans / "dicom_case")
    (scans / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in scans.rglob("*") if p.is_file()}
    with caplog.at_level(logging.INFO, logger="aiva_monai.inference"):
        rows = infer(scans, tmp_path / "out", small_checkpoint, exit_code=ExitCode.SOME_FAILED)

    assert list(rows) == [
        "broken",
        "oblique_case",
        "dicom_case",
    ]  # find_scans order, the bad one in the middle of the batch
    broken = rows["broken"]
    assert broken["status"] == "failed" and broken["mask"] == broken["overlay"] == broken["volume_ml"] == ""
    assert broken["message"] == (
        f"{scans / 'broken.nii.gz'}: cannot be read as a nifti image "
        f"(File {scans / 'broken.nii.gz'} is not a gzip file)."
    )
    assert any(r.levelname == "ERROR" and "case broken: FAILED, skipped" in r.getMessage() for r in caplog.records)

    for case, shape in (("oblique_case", (70, 60, 30)), ("dicom_case", (40, 50, 24))):
        row = rows[case]
        assert row["status"] == "ok" and float(row["seconds"]) > 0
        mask = nib.load(row["mask"])
        assert Path(row["mask"]) == tmp_path / "out" / f"{case}_brainmask.nii.gz" and mask.shape == shape
        voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        assert float(row["volume_ml"]) == pytest.approx(
            np.asarray(mask.dataobj).astype(bool).sum() * voxel_ml, abs=0.01
        )
        assert Path(row["overlay"]) == tmp_path / "out" / f"{case}_brainmask.png" and is_png(row["overlay"])
        assert row["input"] in (str(nifti), str(scans / "dicom_case"))
    np.testing.assert_allclose(nib.load(rows["oblique_case"]["mask"]).affine, affine, atol=1e-4)
    # inputs untouched; no temporary file left behind; outputs readable by others (umask, not mkstemp's 0600)
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in scans.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [
            "summary.csv",
            "oblique_case_brainmask.nii.gz",
            "oblique_case_brainmask.png",
            "dicom_case_brainmask.nii.gz",
            "dicom_case_brainmask.png",
            "dicom_case_brainmask.seg.dcm",
        ]
    )
    assert (tmp_path / "out" / "summary.csv").stat().st_mode & 0o044 == 0o044


def test_a_rerun_replaces_its_cases_rows_and_keeps_the_others(tmp_path, small_checkpoint):
    write_oblique_nifti(tmp_path / "first")
    nib.save(nib.Nifti1Image(head_like((40, 40, 20)), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / "second.nii.gz"))
    infer(tmp_path / "first", tmp_path / "out", small_checkpoint)
    mask_before = (tmp_path / "out" / "oblique_case_brainmask.nii.gz").read_bytes()
    rows = infer(tmp_path / "second.nii.gz", tmp_path / "out", small_checkpoint)
    assert list(rows) == ["oblique_case", "second"] and {r["status"] for r in rows.values()} == {"ok"}
    assert (tmp_path / "out" / "oblique_case_brainmask.nii.gz").read_bytes() == mask_before


def test_organ_and_mask_suffix_come_from_the_config(tmp_path, small_checkpoint):
    """What a prostate bundle overrides: file names, messages and the plausible volume range."""
    write_oblique_nifti(tmp_path / "scans")
    rows = infer(
        tmp_path / "scans",
        tmp_path / "out",
        small_checkpoint,
        organ="prostate",
        mask_suffix="_prostate",
        volume_range_ml=[1e6, 2e6],
    )
    row = rows["oblique_case"]
    assert row["mask"].endswith("oblique_case_prostate.nii.gz") and row["overlay"].endswith("oblique_case_prostate.png")
    assert (
        "prostate volume" in row["message"]
        and "outside the expected 1e+06-2e+06 mL; check the overlay" in row["message"]
    )


def test_progress_bar_on_request_only(tmp_path, small_checkpoint, capsys):
    write_oblique_nifti(tmp_path / "scans")
    infer(tmp_path / "scans", tmp_path / "quiet", small_checkpoint)  # progress null: stderr is not a terminal here
    assert "brain masks" not in capsys.readouterr().err
    infer(tmp_path / "scans", tmp_path / "shown", small_checkpoint, progress=True)
    assert "brain masks: 100%" in capsys.readouterr().err


def test_config_keeps_the_model_zoo_inference_properties(tmp_path):
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        workflow_type="infer",
        logging_file=False,
        dataset_dir=str(write_oblique_nifti(tmp_path / "in")[0]),
        output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    for key in (
        "organ",
        "mask_suffix",
        "summary_file",
        "volume_range_ml",
        "progress",
        "preprocessing",
        "postprocessing",
        "inferer",
    ):
        assert key in workflow.parser
    assert workflow.parser["mask_suffix"] == "_brainmask" and workflow.parser["organ"] == "brain"


def test_find_scans_skips_hidden_files_and_the_output_folder_and_keeps_names_unique(tmp_path):
    data = head_like((20, 20, 10))
    for name in ("a.nii", "a.nii.gz", ".a.tmp123.nii.gz", "out/a_brainmask.nii.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / name))
    cases = find_scans(tmp_path, exclude=tmp_path / "out")
    assert [(Path(c["image"]).name, c["case"]) for c in cases] == [("a.nii", "a"), ("a.nii.gz", "a_2")]
    assert len(find_scans(tmp_path)) == 3  # without exclude the output folder is searched too
    assert len(find_scans(tmp_path, exclude=tmp_path)) == 3  # the input folder itself is never excluded


def test_overlay_of_an_oblique_anisotropic_volume(tmp_path):
    image = head_like((70, 60, 30))
    mask = (image > 50).astype(np.uint8)
    path = save_overlay(image, mask, oblique_affine(), tmp_path / "qa" / "case.png", title="case: 12 mL")
    assert is_png(path) and path.stat().st_size > 5_000 and [p.name for p in path.parent.iterdir()] == ["case.png"]
    assert is_png(save_overlay(image, np.zeros_like(mask), np.eye(4), tmp_path / "empty.png"))  # no contour to draw


def test_describe_error_reports_the_innermost_cause_and_the_file():
    try:
        try:
            raise KeyError("native_image")
        except KeyError as inner:
            raise RuntimeError("applying transform <Compose>") from inner
    except RuntimeError as error:
        assert describe_error(error, "/data/x.nii.gz") == "/data/x.nii.gz: KeyError: 'native_image'"
    assert describe_error(ValueError("/data/x.nii.gz: bad"), "/data/x.nii.gz") == "/data/x.nii.gz: bad"


@pytest.mark.parametrize(
    "bundle, label, code", [("aiva_brain", "brain", "12738006"), ("aiva_prostate", "prostate", "41216001")]
)
def test_a_dicom_series_gets_a_dicom_seg_equal_to_its_mask_and_referencing_it(
    bundle, label, code, tmp_path, small_checkpoint
):
    import highdicom as hd
    import pydicom

    series = write_dicom_series(tmp_path / "scans" / "dicom_case")
    write_oblique_nifti(tmp_path / "scans")
    overrides = {"pixdim": [2.0, 2.0, 0.0], "in_plane_size": [48, 48]} if bundle == "aiva_prostate" else {}
    rows = infer(
        tmp_path / "scans",
        tmp_path / "out",
        small_checkpoint,
        config=BUNDLES / bundle / "configs" / "inference.json",
        **overrides,
    )
    row = rows["dicom_case"]
    suffix = "_brainmask" if bundle == "aiva_brain" else "_prostate"
    assert row["status"] == "ok" and row["dicom_seg"] == str(tmp_path / "out" / f"dicom_case{suffix}.seg.dcm")
    assert rows["oblique_case"]["dicom_seg"] == "" and not list(
        (tmp_path / "out").glob("oblique_case*.dcm")
    )  # NIfTI in: no SEG

    seg = hd.seg.segread(row["dicom_seg"])
    sources = sorted(
        (pydicom.dcmread(p, stop_before_pixels=True) for p in series.glob("*.dcm")), key=lambda d: int(d.InstanceNumber)
    )
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert (
        seg.StudyInstanceUID == sources[0].StudyInstanceUID
        and seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    )
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} <= {
        d.SOPInstanceUID for d in sources
    }
    description = seg.get_segment_description(1)
    assert description.segment_label == label and description.segmented_property_type.value == code
    # the segment's voxels, slice by slice of the source series, equal the NIfTI mask (x, y, z) = (column, row, slice)
    mask = np.asarray(nib.load(row["mask"]).dataobj) > 0
    assert mask.any(), "random weights happen to segment nothing: the comparison would be empty"
    pixels = seg.get_pixels_by_source_instance(
        [d.SOPInstanceUID for d in sources],
        segment_numbers=[1],
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels[..., 0].transpose(2, 1, 0) > 0, mask)
