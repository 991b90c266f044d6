"""Inference that never writes an input and never loses a case (issue 15): one test per defect found by the
bad-input probe, through both bundles' inference configs (the shared ``aiva_monai.inference`` code).

Each test builds its inputs (synthetic NIfTI volumes, DICOM series written with SimpleITK)."""

import csv
import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import run

from aiva_monai.inference import (
    ExitCode,
    InputOverwriteError,
    LoadScand,
    OutputFolder,
    SaveMaskd,
    find_scans,
    read_scan,
)
from aiva_monai.networks import PreActResUNet
from tests.test_bundle_brain import head_like

REPOSITORY = Path(__file__).resolve().parents[1]
BUNDLES = {
    "aiva_brain": ("_brainmask", {"network_def#channels": [8, 16, 32, 64], "network_def#blocks_per_level": 1}),
    "aiva_prostate": (
        "_prostate",
        {
            "network_def#channels": [8, 16, 32, 64],
            "network_def#blocks_per_level": 1,
            "pixdim": [2.0, 2.0, 0.0],
            "in_plane_size": [48, 48],
        },
    ),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """Random weights of the small network both bundles' overrides build (the pipeline is under test)."""
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.manual_seed(0)
    torch.save(PreActResUNet(channels=(8, 16, 32, 64), blocks_per_level=1).state_dict(), path)
    return path


def infer(bundle, dataset_dir, output_dir, checkpoint, exit_code=ExitCode.OK, **overrides):
    """Runs ``bundle``'s inference.json in-process, checks the exit code, returns the summary rows by case."""
    suffix, small = BUNDLES[bundle]
    try:
        run(
            config_file=str(REPOSITORY / "bundles" / bundle / "configs" / "inference.json"),
            dataset_dir=str(dataset_dir),
            output_dir=str(output_dir),
            checkpoint=str(checkpoint),
            logging_file=False,
            **small,
            **overrides,
        )
        code = ExitCode.OK
    except SystemExit as ended:
        code = ended.code
    assert code == exit_code
    return summary_rows(Path(output_dir) / "summary.csv")


def summary_rows(path):
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    cases = [row["case"] for row in rows]
    assert len(cases) == len(set(cases)), f"duplicate rows: {cases}"
    return {row["case"]: row for row in rows}


def save(path, array=None, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    array = head_like((24, 24, 12)) if array is None else array
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([2.0, 2.0, 2.0, 1.0]) if affine is None else affine), str(path))
    return path


def fingerprints(folder):
    """sha256 of every file under ``folder`` (links followed), by path."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def write_series(
    folder,
    shape=(32, 32, 10),
    spacing=2.0,
    series_uid="1.2.826.0.1.3680043.2.1125.7.1",
    first_instance=1,
    scale=1.0,
    skip=(),
    tags=None,
):
    """An axial DICOM series (SimpleITK writer): ``shape`` (x, y, slices), slices ``spacing`` mm apart; slices
    whose index is in ``skip`` are not written (a series with missing slices); ``tags`` ("gggg|eeee": value)
    added or replaced in every slice."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = (head_like(shape) * scale).astype(np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(shape[2]):
        if z in skip:
            continue
        image = sitk.GetImageFromArray(volume[:, :, z].T[None])
        image.SetSpacing((1.0, 1.0, spacing))
        instance = first_instance + z
        slice_tags = {
            "0008|0060": "MR",
            "0020|000e": series_uid,
            "0020|000d": series_uid + ".1",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series_uid}.{instance}",
            "0020|0013": str(instance),
            "0020|0032": f"0\\0\\{z * spacing}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0018|0050": str(spacing),
            "0028|0030": "1\\1",
            "0020|0052": series_uid + ".2",
            **(tags or {}),
        }
        for tag, value in slice_tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"im{instance:04d}.dcm"))
        writer.Execute(image)
    return folder


# -- 1. HIGH: an input overwritten when output_dir is the input folder ---------------------------------------------


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_an_input_named_like_an_output_is_never_overwritten_and_a_rerun_adds_no_case(bundle, tmp_path, checkpoint):
    suffix = BUNDLES[bundle][0]
    folder = tmp_path / "scans"
    save(folder / "Subj1.nii.gz", head_like((24, 24, 12)))
    save(folder / f"Subj1{suffix}.nii.gz", head_like((20, 20, 10)))  # an input that happens to be named like an output
    inputs = fingerprints(folder)

    rows = infer(bundle, folder, folder, checkpoint)  # output_dir == the input folder
    assert {p: h for p, h in fingerprints(folder).items() if p in inputs} == inputs
    assert sorted(rows) == ["Subj1_2", f"Subj1{suffix}"]
    assert {row["input"] for row in rows.values()} == {str(p) for p in inputs}
    masks = [Path(row["mask"]) for row in rows.values()]
    assert len(set(masks)) == 2 and not set(masks) & set(inputs) and all(m.is_file() for m in masks)

    again = infer(bundle, folder, folder, checkpoint)  # earlier masks are not taken as scans
    assert sorted(again) == sorted(rows) and {p: h for p, h in fingerprints(folder).items() if p in inputs} == inputs
    assert not list(folder.glob(f"*{suffix}{suffix}{suffix}*"))


def test_the_guard_refuses_any_output_path_that_resolves_to_an_input(tmp_path):
    """The one place: ``OutputFolder`` knows every input's real path; a write or removal through it that would
    land on one (directly, through a link, or through the writers) is refused and the input stays."""
    scan = save(tmp_path / "scans" / "b.nii.gz")
    before = scan.read_bytes()
    outputs = OutputFolder(tmp_path / "out", suffix="_brainmask")
    outputs.prepare()
    outputs.protect([{"image": str(scan), "case": "b", "format": "nifti"}])
    (tmp_path / "out" / "a_brainmask.nii.gz").symlink_to(scan)  # an output name that is a link to an input
    for target in (scan, tmp_path / "out" / "a_brainmask.nii.gz", tmp_path / "out" / ".." / "scans" / "b.nii.gz"):
        with pytest.raises(InputOverwriteError, match=f"refusing to write over the input {scan}"):
            with outputs.atomic(target) as temporary:
                temporary.write_bytes(b"mask")
        with pytest.raises(InputOverwriteError):
            outputs.remove(target)
    image = read_scan({"image": str(scan)})
    with pytest.raises(InputOverwriteError):
        SaveMaskd(outputs=outputs)({"case": "a", "image": image, "pred": image.clone()[None][0]})
    assert scan.read_bytes() == before
    # protect() names a case so that none of its outputs is an input: "a" would write through the link
    cases = [
        {"image": str(scan), "case": "b", "format": "nifti"},
        {"image": str(tmp_path / "x.nii.gz"), "case": "a", "format": "nifti"},
    ]
    outputs.protect(cases)
    assert [c["case"] for c in cases] == ["b", "a_2"]


# -- 2. HIGH: a case lost by a name collision ----------------------------------------------------------------------


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_colliding_names_each_get_their_own_mask_and_row(bundle, tmp_path, checkpoint, caplog):
    folder = tmp_path / "scans"
    for name, size in (("a.nii", 24), ("a.nii.gz", 22), ("a_2.nii.gz", 20)):
        save(folder / name, head_like((size, size, 12)))
    with caplog.at_level(logging.INFO, logger="aiva_monai.inference"):
        rows = infer(bundle, folder, tmp_path / "out", checkpoint)
    assert len(rows) == 3 and {row["status"] for row in rows.values()} == {"ok"}
    assert {row["input"] for row in rows.values()} == {str(folder / n) for n in ("a.nii", "a.nii.gz", "a_2.nii.gz")}
    masks = {row["input"]: nib.load(row["mask"]).shape for row in rows.values()}
    assert masks == {
        str(folder / "a.nii"): (24, 24, 12),
        str(folder / "a.nii.gz"): (22, 22, 12),
        str(folder / "a_2.nii.gz"): (20, 20, 12),
    }
    assert any("inference: 3 case(s): 3 ok, 0 failed" in r.getMessage() for r in caplog.records)


def test_two_folders_with_the_same_case_name_into_one_output_folder_keep_both(tmp_path, checkpoint):
    save(tmp_path / "site_a" / "patient01.nii.gz", head_like((24, 24, 12)))
    save(tmp_path / "site_b" / "patient01.nii.gz", head_like((20, 20, 12)))
    first = infer("aiva_brain", tmp_path / "site_a", tmp_path / "out", checkpoint)
    mask_a = Path(first["patient01"]["mask"]).read_bytes()
    rows = infer("aiva_brain", tmp_path / "site_b", tmp_path / "out", checkpoint)
    assert sorted(rows) == ["patient01", "patient01_2"]
    assert rows["patient01"]["input"] == str(tmp_path / "site_a" / "patient01.nii.gz")
    assert rows["patient01_2"]["input"] == str(tmp_path / "site_b" / "patient01.nii.gz")
    assert Path(rows["patient01"]["mask"]).read_bytes() == mask_a
    assert nib.load(rows["patient01_2"]["mask"]).shape == (20, 20, 12)
    # the same input again keeps its name (a rerun replaces its own row)
    assert sorted(infer("aiva_brain", tmp_path / "site_b", tmp_path / "out", checkpoint)) == [
        "patient01",
        "patient01_2",
    ]


# -- 3. MEDIUM: a stale or new mask beside a failed row ------------------------------------------------------------
# (a case that fails on a rerun: tests/test_robustness.py::test_a_case_that_fails_on_a_rerun_leaves_no_stale_output)


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_a_case_failing_after_its_mask_was_written_leaves_no_mask(bundle, tmp_path, checkpoint):
    """The overlay (after the mask) fails: the row says failed and the new mask is removed with it."""
    suffix = BUNDLES[bundle][0]
    save(tmp_path / "scans" / "case.nii.gz")
    transforms = json.loads((REPOSITORY / "bundles" / bundle / "configs" / "inference.json").read_text())[
        "postprocessing"
    ]["transforms"]
    overlay = next(i for i, t in enumerate(transforms) if t["_target_"].endswith("SaveOverlayd"))
    rows = infer(
        bundle,
        tmp_path / "scans",
        tmp_path / "out",
        checkpoint,
        exit_code=ExitCode.ALL_FAILED,
        **{f"postprocessing#transforms#{overlay}#image_key": "no_such_key"},
    )
    assert rows["case"]["status"] == "failed" and "KeyError" in rows["case"]["message"] and rows["case"]["mask"] == ""
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]
    assert not (tmp_path / "out" / f"case{suffix}.nii.gz").exists()


def test_a_single_slice_image_is_a_clear_failure_with_no_output(tmp_path, checkpoint):
    save(tmp_path / "scans" / "flat.nii.gz", head_like((40, 40, 1)))
    rows = infer("aiva_brain", tmp_path / "scans", tmp_path / "out", checkpoint, exit_code=ExitCode.ALL_FAILED)
    assert rows["flat"]["message"] == (
        f"{tmp_path / 'scans' / 'flat.nii.gz'}: a single slice of shape (40, 40, 1): "
        "expected a volume with at least 2 voxels along each axis."
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]


# -- 4. MEDIUM: a DICOM series with a missing slice, or mixed series -----------------------------------------------


def test_a_dicom_series_with_a_missing_slice_fails_clearly(tmp_path, checkpoint):
    write_series(tmp_path / "scans" / "complete")
    write_series(tmp_path / "scans" / "gappy", series_uid="1.2.826.0.1.3680043.2.1125.7.2", skip=(5,))
    rows = infer("aiva_brain", tmp_path / "scans", tmp_path / "out", checkpoint, exit_code=ExitCode.SOME_FAILED)
    assert rows["complete"]["status"] == "ok"
    assert rows["gappy"]["status"] == "failed" and rows["gappy"]["mask"] == ""
    assert rows["gappy"]["message"] == (
        f"{tmp_path / 'scans' / 'gappy'}: uneven slice spacing: 4 mm between im0005.dcm and "
        "im0007.dcm, 2 mm elsewhere (about 1 slice(s) missing); the series is incomplete or "
        "mixed: export it again."
    )
    assert not list((tmp_path / "out").glob("gappy*"))


def test_two_acquisitions_under_one_series_uid_fail_clearly(tmp_path):
    """Mixed series: a second acquisition with the same SeriesInstanceUID in the folder (other instances)."""
    folder = write_series(tmp_path / "mixed")
    write_series(folder, first_instance=101, scale=2.0)
    with pytest.raises(ValueError, match=r"mixed: .*slices share a position .*several acquisitions or mixed series"):
        read_scan({"image": str(folder), "format": "dicom", "series": "1.2.826.0.1.3680043.2.1125.7.1"})
    # two series (two UIDs) in one folder are two cases
    write_series(tmp_path / "two", series_uid="1.2.826.0.1.3680043.2.1125.7.3")
    write_series(tmp_path / "two", series_uid="1.2.826.0.1.3680043.2.1125.7.4", first_instance=101)
    assert [(c["case"], c["series"]) for c in find_scans(tmp_path / "two")] == [
        ("two", "1.2.826.0.1.3680043.2.1125.7.3"),
        ("two_1", "1.2.826.0.1.3680043.2.1125.7.4"),
    ]


# -- 5. MEDIUM: the exit code says whether cases failed --------------------------------------------------------------


def command(bundle, dataset_dir, output_dir, checkpoint, cwd):
    """``python -m monai.bundle run`` of ``bundle``'s inference.json (the small network), as a user runs it."""
    args = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(REPOSITORY / "bundles" / bundle / "configs" / "inference.json"),
        "--dataset_dir",
        str(dataset_dir),
        "--output_dir",
        str(output_dir),
        "--checkpoint",
        str(checkpoint),
    ]
    for key, value in BUNDLES[bundle][1].items():
        args += [f"--{key}", str(value).replace(" ", "")]
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, encoding="utf-8", timeout=600)


def test_exit_codes_of_the_command(tmp_path, checkpoint):
    save(tmp_path / "mixed" / "good.nii.gz")
    (tmp_path / "mixed" / "bad.nii.gz").write_bytes(b"not a NIfTI file")
    done = command("aiva_brain", tmp_path / "mixed", tmp_path / "out", checkpoint, tmp_path)
    assert done.returncode == ExitCode.SOME_FAILED == 3, done.stderr[-2000:]
    assert "inference: 2 case(s): 1 ok, 1 failed" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr

    (tmp_path / "empty").mkdir()
    done = command("aiva_brain", tmp_path / "empty", tmp_path / "out2", checkpoint, tmp_path)
    assert done.returncode == ExitCode.SETUP_FAILED == 2
    assert (
        f"inference not started: {tmp_path / 'empty'}: no NIfTI file (.nii, .nii.gz) and no DICOM series under it."
        in done.stdout + done.stderr
    )
    assert "Traceback" not in done.stderr and "Failed to evaluate" not in done.stderr


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_exit_code_when_every_case_fails_or_the_setup_fails(bundle, tmp_path, checkpoint):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "one.nii.gz").write_bytes(b"garbage")
    (tmp_path / "bad" / "two.nii").write_bytes(b"garbage")
    rows = infer(bundle, tmp_path / "bad", tmp_path / "out", checkpoint, exit_code=ExitCode.ALL_FAILED)
    assert {row["status"] for row in rows.values()} == {"failed"} and len(rows) == 2
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as ended:
        run(
            config_file=str(REPOSITORY / "bundles" / bundle / "configs" / "inference.json"),
            dataset_dir=str(tmp_path / "bad"),
            output_dir=str(blocker / "out"),
            checkpoint=str(checkpoint),
            logging_file=False,
            **BUNDLES[bundle][1],
        )
    assert ended.value.code == ExitCode.SETUP_FAILED
    assert ended.value.message.startswith(f"inference not started: output_dir {blocker / 'out'} is not writable")


# -- 6. LOW-MEDIUM: the volume of a sheared grid ---------------------------------------------------------------------


def test_a_sheared_affine_gives_the_determinant_volume_and_a_warning(tmp_path, checkpoint):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[0, 1] = 0.8  # x depends on j: the voxel axes are not perpendicular
    save(tmp_path / "scans" / "sheared.nii.gz", head_like((24, 24, 12)), affine)
    row = infer("aiva_brain", tmp_path / "scans", tmp_path / "out", checkpoint)["sheared"]
    mask = nib.load(row["mask"])
    voxels = int(np.asarray(mask.dataobj).astype(bool).sum())
    assert voxels > 0
    assert float(row["volume_ml"]) == pytest.approx(voxels * 8.0 / 1000, abs=0.01)  # |det| = 8 mm^3, not 2 * 2.15 * 2
    assert "the affine is sheared (voxel axes 21.8 degrees from perpendicular)" in row["message"]


# -- 7. LOW: symbolic links ------------------------------------------------------------------------------------------


def test_symlinks_loops_dangling_and_outside_folders(tmp_path, checkpoint, caplog):
    folder = tmp_path / "scans"
    save(folder / "a.nii.gz")
    save(tmp_path / "elsewhere" / "b.nii.gz")
    (folder / "loop").symlink_to(folder)
    (folder / "outside").symlink_to(tmp_path / "elsewhere")
    (folder / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (folder / "notes.txt").symlink_to(tmp_path / "gone.txt")
    (folder / "linked.nii.gz").symlink_to(tmp_path / "elsewhere" / "b.nii.gz")  # a link to a file is a case
    with caplog.at_level(logging.INFO, logger="aiva_monai.inference"):
        rows = infer("aiva_brain", folder, tmp_path / "out", checkpoint, exit_code=ExitCode.SOME_FAILED)
    assert sorted(rows) == ["a", "dangling", "linked"]
    assert rows["dangling"]["status"] == "failed"
    assert rows["dangling"]["message"] == (
        f"{folder / 'dangling.nii.gz'}: a broken link (to {tmp_path / 'gone.nii.gz'}): "
        "the file it points to does not exist."
    )
    assert rows["a"]["status"] == rows["linked"]["status"] == "ok"
    messages = [r.getMessage() for r in caplog.records]
    assert any(f"{folder / 'loop'}: a link to the folder {folder}, not followed" in m for m in messages)
    assert any(
        f"{folder / 'outside'}: a link to the folder {tmp_path / 'elsewhere'}, not followed" in m for m in messages
    )
    assert any(f"{folder / 'notes.txt'}: a broken link" in m for m in messages)


# -- 8. LOW (security): CSV formula injection ------------------------------------------------------------------------


def test_names_that_look_like_spreadsheet_formulas_are_escaped(tmp_path, checkpoint):
    name = '=HYPERLINK("example.invalid","open")'  # no "/" in a file name
    save(tmp_path / "scans" / f"{name}.nii.gz")
    save(tmp_path / "scans" / "-1+2.nii.gz")
    infer("aiva_brain", tmp_path / "scans", tmp_path / "out", checkpoint)
    with open(tmp_path / "out" / "summary.csv", newline="") as stream:
        cells = [cell for row in csv.reader(stream) for cell in row]
    assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")]
    assert f"'{name}" in cells and "'-1+2" in cells
    # a rerun reads the escaped names back: still one row per case
    rows = infer("aiva_brain", tmp_path / "scans", tmp_path / "out", checkpoint)
    assert sorted(rows) == ["'-1+2", f"'{name}"]


# -- 9. LOW: clean-up and messages -----------------------------------------------------------------------------------


def test_temporary_files_of_a_killed_run_are_removed_by_the_rerun(tmp_path, checkpoint):
    save(tmp_path / "scans" / "a.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    leftovers = [
        ".a_brainmask.k2j9_x0q.nii.gz",
        ".a_brainmask.p0o9i8u7.png",
        ".summary.abcdefgh.csv",
        ".write_test.zz11yy22",
    ]
    for name in leftovers:
        (out / name).write_bytes(b"half")
    (out / ".keep_me").write_text("not ours")
    infer("aiva_brain", tmp_path / "scans", out, checkpoint)
    assert sorted(p.name for p in out.iterdir()) == [".keep_me", "a_brainmask.nii.gz", "a_brainmask.png", "summary.csv"]


def test_implausible_and_singular_headers_are_named_not_allocated(tmp_path, checkpoint):
    folder = tmp_path / "scans"
    save(folder / "microns.nii.gz", head_like((24, 24, 12)), np.diag([1000.0, 1000.0, 1000.0, 1.0]))
    singular = nib.Nifti1Image(head_like((24, 24, 12)), None)
    singular.set_sform(np.diag([2.0, 0.0, 2.0, 1.0]), code=1)  # a header nibabel cannot write as an affine
    nib.save(singular, str(folder / "singular.nii.gz"))
    save(folder / "fine.nii.gz")
    rows = infer("aiva_brain", folder, tmp_path / "out", checkpoint, exit_code=ExitCode.SOME_FAILED)
    assert rows["microns"]["message"] == (
        f"{folder / 'microns.nii.gz'}: voxel size [1000.0, 1000.0, 1000.0] mm is implausible for "
        "an MRI scan (expected 0.01-50 mm): is the header in microns or metres? fix pixdim."
    )
    assert rows["singular"]["message"].startswith(
        f"{folder / 'singular.nii.gz'}: the header's affine is singular or not finite"
    )
    assert rows["fine"]["status"] == "ok"
    # the resampled grid is capped before it is allocated
    image = save(tmp_path / "fine.nii.gz")
    with pytest.raises(
        ValueError,
        match=r"fine\.nii\.gz: resampling to \[0\.05, 0\.05, 0\.05\] mm would make a grid of 960 x 960 x 480 voxels",
    ):
        LoadScand(pixdim=[0.05, 0.05, 0.05])({"image": str(image)})
    assert LoadScand(pixdim=[2.0, 2.0, 2.0])({"image": str(image)})["image"].shape == (1, 24, 24, 12)
