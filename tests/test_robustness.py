"""Bad input and bad settings: each gives a clear error naming the file and the problem (or a documented,
logged fallback), and nothing already written is lost.

Inference (clinicians' scans) reports a bad case in the summary CSV and the log and goes on with the
next; the training path (datalists -> ``SliceDataset``) stops with the error before caching."""

import csv
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import run

from aiva_monai.alignment import alignment_loss
from aiva_monai.bundle import resolve_datalist
from aiva_monai.clustering import cluster_sites
from aiva_monai.data import SliceDataset, load_datalist, volume_transforms
from aiva_monai.evaluation import load_network_weights
from aiva_monai.inference import ExitCode, InferenceExit, find_scans, read_scan
from aiva_monai.io import check_writable_dir
from aiva_monai.losses import AIVALoss
from aiva_monai.networks import PreActResUNet
from tests.test_bundle_brain import CONFIGS, head_like, write_oblique_nifti

SMALL = {"network_def#channels": [8, 16, 32, 64], "network_def#blocks_per_level": 1}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "small.pt"
    torch.manual_seed(0)
    torch.save(PreActResUNet(channels=(8, 16, 32, 64), blocks_per_level=1).state_dict(), path)
    return path


def run_inference(dataset_dir, output_dir, checkpoint):
    run(
        config_file=str(CONFIGS / "inference.json"),
        dataset_dir=str(dataset_dir),
        output_dir=str(output_dir),
        checkpoint=str(checkpoint),
        logging_file=False,
        **SMALL,
    )


def infer(dataset_dir, output_dir, checkpoint, exit_code=ExitCode.OK):
    """The inference config in-process; its exit code checked (an ``InferenceExit`` is a ``SystemExit``)."""
    try:
        run_inference(dataset_dir, output_dir, checkpoint)
        code = ExitCode.OK
    except SystemExit as ended:
        code = ended.code
    assert code == exit_code
    with open(Path(output_dir) / "summary.csv", newline="") as stream:
        return {row["case"]: row for row in csv.DictReader(stream)}


def root_cause(error: BaseException) -> BaseException:
    """monai.bundle wraps a config expression's error ("Failed to evaluate ..."): the error raised by our code."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    return error


def save(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))
    return path


def volume_pair(folder, image=None, label=None, label_affine=None):
    image = head_like((24, 24, 12)) if image is None else image
    label = (head_like((24, 24, 12)) > 50).astype(np.uint8) if label is None else label
    return {
        "image": str(save(folder / "img.nii.gz", image)),
        "label": str(save(folder / "lab.nii.gz", label, label_affine)),
        "subject": "s1",
        "site": "a",
    }


def slices(entry):
    return SliceDataset([entry], volume_transforms(pixdim=None, in_plane_size=(16, 16)), progress=False)


# -- corrupt or truncated NIfTI ----------------------------------------------------------------------------------


def test_corrupt_and_truncated_nifti(tmp_path):
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"not a NIfTI file")
    with pytest.raises(ValueError) as error:
        read_scan({"image": str(garbage)})
    assert str(error.value) == f"{garbage}: cannot be read as a nifti image (File {garbage} is not a gzip file)."

    whole = save(tmp_path / "whole.nii.gz", head_like((24, 24, 12))).read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError) as error:
        read_scan({"image": str(truncated)})
    assert str(error.value) == (
        f"{truncated}: cannot be read as a nifti image "
        "(Compressed file ended before the end-of-stream marker was reached)."
    )
    plain = save(tmp_path / "plain.nii", head_like((24, 24, 12))).read_bytes()
    (tmp_path / "truncated.nii").write_bytes(plain[: len(plain) // 2])
    with pytest.raises(
        ValueError, match=r"truncated\.nii: cannot be read as a nifti image \(Expected \d+ bytes, got \d+ bytes"
    ):
        read_scan({"image": str(tmp_path / "truncated.nii")})

    # the training path: named before caching (header) or while caching (data)
    entry = volume_pair(tmp_path / "pair")
    with pytest.raises(ValueError) as error:
        slices({**entry, "image": str(garbage)})
    assert str(error.value) == f"image file {garbage} cannot be read as NIfTI: File {garbage} is not a gzip file"
    with pytest.raises(ValueError) as error:
        slices({**entry, "image": str(truncated)})
    assert str(error.value) == (
        f"volume (image {truncated}, label {entry['label']}) cannot be loaded and preprocessed: "
        "EOFError: Compressed file ended before the end-of-stream marker was reached"
    )


# -- 2D or 4D where 3D is expected -------------------------------------------------------------------------------


def test_2d_and_4d_images(tmp_path):
    flat = save(tmp_path / "flat.nii.gz", head_like((24, 24, 12))[..., 0])
    series = save(tmp_path / "series.nii.gz", np.stack([head_like((24, 24, 12))] * 3, axis=-1))
    with pytest.raises(ValueError) as error:
        read_scan({"image": str(flat)})
    assert str(error.value) == f"{flat}: expected a 3D image, got a 2D image (one slice) of shape (24, 24)."
    with pytest.raises(ValueError) as error:
        read_scan({"image": str(series)})
    assert (
        str(error.value)
        == f"{series}: expected a 3D image, got a 4D image (a time series or several volumes) of shape (24, 24, 12, 3)."
    )
    single = save(tmp_path / "single.nii.gz", head_like((24, 24, 12))[..., None])
    assert read_scan({"image": str(single)}).shape == (1, 24, 24, 12)  # a trailing axis of length 1 is fine

    entry = volume_pair(tmp_path / "pair")
    with pytest.raises(ValueError) as error:
        slices({**entry, "image": str(flat)})
    assert str(error.value) == f"image file {flat}: expected a 3D volume, got a 2D (one slice) image of shape (24, 24)."
    with pytest.raises(ValueError) as error:
        slices({**entry, "image": str(series)})
    assert str(error.value) == (
        f"image file {series}: expected a 3D volume, got a 4D (a time series or several volumes) "
        "image of shape (24, 24, 12, 3)."
    )


# -- image and mask of different shape or affine -----------------------------------------------------------------


def test_image_and_mask_of_different_shape_or_affine(tmp_path):
    shape = volume_pair(tmp_path / "shape", label=np.zeros((24, 24, 10), np.uint8))
    with pytest.raises(ValueError) as error:
        slices(shape)
    assert str(error.value) == (
        f"label file {shape['label']} has shape (24, 24, 10) but image file {shape['image']} has "
        "shape (24, 24, 12): they must be in the same voxel grid."
    )
    shifted = np.eye(4)
    shifted[:3, 3] = [0.0, 4.0, 0.0]
    affine = volume_pair(tmp_path / "affine", label_affine=shifted)
    with pytest.raises(ValueError) as error:
        slices(affine)
    assert str(error.value).startswith(
        f"label file {affine['label']} and image file {affine['image']} have different affines (largest difference 4, "
        "tolerance 0.001): they must be in the same voxel grid."
    )
    tiny = np.eye(4)
    tiny[0, 3] = 1e-5  # header rounding is not a different grid
    assert len(slices(volume_pair(tmp_path / "tiny", label_affine=tiny))) == 24


# -- NaN or Inf intensities --------------------------------------------------------------------------------------


def test_nan_or_inf_intensities(tmp_path, small_checkpoint):
    """Inference: the case fails with the counts and the file named (no mask guessed from a partial scan);
    training: the volume is named when a NaN / Inf survives preprocessing."""
    image = head_like((24, 24, 12))
    image[3, 4, 5], image[6, 7, 8], image[1, 1, 1] = np.nan, np.inf, -np.inf
    broken = save(tmp_path / "scans" / "broken.nii.gz", image)
    with pytest.raises(ValueError) as error:
        read_scan({"image": str(broken)})
    assert str(error.value) == (
        f"{broken}: 1 NaN and 2 Inf intensities (of 6912 voxels); "
        "a scan with missing values is not segmented: fix or re-export the file."
    )
    save(tmp_path / "scans" / "fine.nii.gz", head_like((24, 24, 12)))
    rows = infer(tmp_path / "scans", tmp_path / "out", small_checkpoint, exit_code=ExitCode.SOME_FAILED)
    assert rows["broken"]["status"] == "failed" and rows["broken"]["message"] == str(error.value)
    assert rows["fine"]["status"] == "ok" and not (tmp_path / "out" / "broken_brainmask.nii.gz").exists()

    nan_only = head_like((24, 24, 12))
    nan_only[3, 4, 5] = np.nan
    entry = volume_pair(tmp_path / "pair", image=nan_only)
    with pytest.raises(ValueError) as error:
        slices(entry)
    assert str(error.value).startswith(f"volume {entry['image']}: ") and str(error.value).endswith(
        "NaN or Inf values in 'image' after preprocessing "
        "(the file holds NaN or Inf intensities, or overflows the cache type); "
        "fix the file or drop it from the datalist."
    )
    # the documented fallback: a few Inf voxels are clipped to the 99.5th percentile by the intensity scaling
    inf_only = head_like((24, 24, 12))
    inf_only[3, 4, 5] = np.inf
    dataset = slices(volume_pair(tmp_path / "inf", image=inf_only))
    assert len(dataset) == 24 and all(torch.isfinite(dataset[i]["image"]).all() for i in range(len(dataset)))


# -- an all-zero image -------------------------------------------------------------------------------------------


def test_all_zero_image_gives_an_empty_mask_and_a_warning(tmp_path, small_checkpoint):
    save(tmp_path / "scans" / "blank.nii.gz", np.zeros((30, 30, 16), np.float32), np.diag([1.5, 1.5, 3.0, 1.0]))
    row = infer(tmp_path / "scans", tmp_path / "out", small_checkpoint)["blank"]
    assert row["status"] == "ok" and row["volume_ml"] == "0.00"
    assert row["message"].startswith(
        "the image is constant (every voxel has the same value, e.g. all zero): no brain to segment, "
        "an empty mask was written (the network output is discarded)"
    )
    mask = nib.load(row["mask"])
    assert mask.shape == (30, 30, 16) and not np.asarray(mask.dataobj).any()
    np.testing.assert_allclose(mask.affine, np.diag([1.5, 1.5, 3.0, 1.0]))


# -- an empty or missing folder ----------------------------------------------------------------------------------


def test_empty_or_missing_folders(tmp_path, small_checkpoint):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no scans here")
    with pytest.raises(FileNotFoundError) as error:
        find_scans(tmp_path / "empty")
    assert str(error.value) == f"{tmp_path / 'empty'}: no NIfTI file (.nii, .nii.gz) and no DICOM series under it."
    with pytest.raises(FileNotFoundError) as error:
        find_scans(tmp_path / "missing")
    assert str(error.value) == f"input {tmp_path / 'missing'} does not exist."
    with pytest.raises(ValueError, match="no input given: pass --dataset_dir"):
        find_scans(None)
    # through the bundle, before any output is written
    with pytest.raises(InferenceExit) as error:
        run_inference(tmp_path / "missing", tmp_path / "out", small_checkpoint)
    assert error.value.code == ExitCode.SETUP_FAILED and isinstance(root_cause(error.value), FileNotFoundError)
    assert str(root_cause(error.value)) == f"input {tmp_path / 'missing'} does not exist."
    assert not (tmp_path / "out" / "summary.csv").exists()

    # training: a missing or empty dataset_dir, a target site without entries, an empty datalist
    with pytest.raises(FileNotFoundError) as error:
        resolve_datalist(tmp_path / "missing", None, tmp_path / "out")
    assert str(error.value) == f"dataset_dir {tmp_path / 'missing'} does not exist."
    with pytest.raises(
        FileNotFoundError, match=f"dataset_dir {tmp_path / 'empty'}: no CC359 files .* and no datalist.json"
    ):
        resolve_datalist(tmp_path / "empty", None, tmp_path / "out")
    entry = volume_pair(tmp_path / "pair")
    datalist = tmp_path / "datalist.json"
    datalist.write_text(f'{{"training": [{{"image": "{entry["image"]}", "label": "{entry["label"]}", "site": "a"}}]}}')
    with pytest.raises(ValueError) as error:
        load_datalist(datalist, "training", sites="target_site")
    assert (
        str(error.value)
        == f"datalist {datalist}: no 'training' entries of site(s) ['target_site']; sites present: ['a']."
    )
    with pytest.raises(ValueError, match="SliceDataset got an empty datalist: no volume to slice."):
        SliceDataset([], volume_transforms(), keys=("image",))


# -- clustering and the alignment loss ---------------------------------------------------------------------------


def test_fewer_target_slices_than_clusters():
    source = np.random.default_rng(0).normal(size=(20, 4, 2, 2)).astype(np.float32)
    with pytest.raises(ValueError) as error:
        cluster_sites(source, source[:2], n_clusters=3, tsne_method="sklearn")
    assert (
        str(error.value)
        == "the target site has 2 samples, fewer than n_clusters=3: lower n_clusters or add target data."
    )


def test_target_batch_with_no_clustered_sample_gives_a_zero_differentiable_alignment_loss():
    features = torch.randn(4, 8, 2, 2, requires_grad=True)
    unclustered = torch.full((4,), -1)
    means, match = torch.randn(3, 32), np.array([2, 0, 1])
    loss = alignment_loss(features, unclustered, means, match)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert features.grad is not None and torch.count_nonzero(features.grad) == 0

    criterion = AIVALoss(calibration_iterations=2)
    prediction = torch.randn(4, 2, 6, 6, requires_grad=True)
    label = torch.randint(0, 2, (4, 1, 6, 6))
    out = criterion(prediction, label, torch.randn(4, 8, 2, 2, requires_grad=True), unclustered, means, match)
    assert out["align_loss"].item() == 0.0 and out["lambda"] == 0.0
    assert torch.allclose(out["loss"], criterion.seg_loss(prediction, label))
    assert criterion.calibration_losses == []  # a batch without clusters does not count towards calibrating lambda
    out["loss"].backward()
    assert prediction.grad is not None


# -- an unwritable output folder ---------------------------------------------------------------------------------


def test_unwritable_output_folder_fails_before_any_work(tmp_path, small_checkpoint):
    write_oblique_nifti(tmp_path / "scans")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # works even as root: a folder below a file cannot be created
    with pytest.raises(InferenceExit) as error:
        run_inference(tmp_path / "scans", blocker / "out", small_checkpoint)
    assert isinstance(root_cause(error.value), PermissionError)
    assert str(root_cause(error.value)) == (
        f"output_dir {blocker / 'out'} is not writable (Not a directory): "
        "choose another --output_dir or fix its permissions."
    )


def test_read_only_output_folder_fails_before_any_work(tmp_path, small_checkpoint):
    write_oblique_nifti(tmp_path / "scans")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as root: chmod does not stop writing")
        with pytest.raises(InferenceExit) as error:
            run_inference(tmp_path / "scans", locked, small_checkpoint)
        assert isinstance(root_cause(error.value), PermissionError)
        assert str(root_cause(error.value)) == (
            f"output_dir {locked} is not writable (Permission denied): "
            "choose another --output_dir or fix its permissions."
        )
        assert list(locked.iterdir()) == []
        with pytest.raises(PermissionError, match=f"summary_file folder {locked} is not writable"):
            check_writable_dir(locked, "summary_file folder")
    finally:
        locked.chmod(stat.S_IRWXU)


# -- a missing checkpoint ----------------------------------------------------------------------------------------


def test_missing_or_corrupt_checkpoint(tmp_path, small_checkpoint):
    write_oblique_nifti(tmp_path / "scans")
    missing = tmp_path / "models" / "model.pt"
    with pytest.raises(InferenceExit) as error:
        run_inference(tmp_path / "scans", tmp_path / "out", missing)
    assert isinstance(root_cause(error.value), FileNotFoundError)
    assert (
        str(root_cause(error.value))
        == f"checkpoint {missing} does not exist: set --checkpoint to the model weights file (.pt)."
    )
    assert not (tmp_path / "out" / "summary.csv").exists() and not list((tmp_path / "out").glob("*.nii.gz"))

    network = PreActResUNet(channels=(8, 16, 32, 64), blocks_per_level=1)
    with pytest.raises(FileNotFoundError) as error:
        load_network_weights(network, missing)
    assert str(error.value) == f"checkpoint {missing} does not exist."
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(small_checkpoint.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"checkpoint {corrupt} cannot be read: "):
        load_network_weights(network, corrupt)
    with pytest.raises(ValueError, match=f"checkpoint {small_checkpoint} does not fit the network PreActResUNet: "):
        load_network_weights(PreActResUNet(channels=(16, 32, 64, 128)), small_checkpoint)


# -- nothing already written is lost -----------------------------------------------------------------------------


def test_a_case_that_fails_on_a_rerun_leaves_no_stale_output(tmp_path, small_checkpoint):
    """A case that worked, then fails on a later run (its file got corrupted): its row says why, and its earlier
    mask and overlay are removed (anything globbing the masks must not pick up a mask of the old scan); the
    other case's outputs stay; no temporary file is left (issue 15, defect 3)."""
    scans = tmp_path / "scans"
    case_a = save(scans / "a.nii.gz", head_like((24, 24, 12)))
    save(scans / "b.nii.gz", head_like((20, 20, 10)))
    first = infer(scans, tmp_path / "out", small_checkpoint)
    assert {r["status"] for r in first.values()} == {"ok"}
    kept = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.name != "summary.csv"}
    assert sorted(kept) == ["a_brainmask.nii.gz", "a_brainmask.png", "b_brainmask.nii.gz", "b_brainmask.png"]

    case_a.write_bytes(case_a.read_bytes()[:200])  # truncated
    second = infer(scans, tmp_path / "out", small_checkpoint, exit_code=ExitCode.SOME_FAILED)
    assert second["a"]["status"] == "failed" and second["a"]["message"].startswith(
        f"{case_a}: cannot be read as a nifti image"
    )
    assert second["a"]["mask"] == second["a"]["overlay"] == ""
    assert second["b"]["status"] == "ok"
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith("a_")]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.name.startswith("b_")} == {
        k: v for k, v in kept.items() if k.startswith("b_")
    }
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temporary file left


def test_an_unreadable_summary_is_kept_aside_not_overwritten(tmp_path, small_checkpoint, caplog):
    write_oblique_nifti(tmp_path / "scans")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.csv").write_bytes(b"\xff\xfe\x00 not a CSV")
    rows = infer(tmp_path / "scans", tmp_path / "out", small_checkpoint)
    assert list(rows) == ["oblique_case"]
    assert (tmp_path / "out" / "summary.csv.unreadable").read_bytes() == b"\xff\xfe\x00 not a CSV"
    assert any(
        "cannot be read" in r.getMessage() and "summary.csv.unreadable" in r.getMessage() for r in caplog.records
    )
