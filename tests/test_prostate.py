"""Multi-site prostate: the reader on tiny files in the release layout, preprocessing (label merging,
z-score, neighbouring slices), leave-one-site-out sources, Dice with an empty prediction and the
largest connected component, per-source-site cluster statistics."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset
from monai.inferers import SliceInferer

from aiva_monai.bundle import other_sites, resolve_datalist
from aiva_monai.data import NeighbourSlicesd, find_prostate, prostate_datalist, volume_transforms
from aiva_monai.evaluation import evaluate_volumes
from aiva_monai.handlers import per_group_cluster_counts, source_slice_groups

RELEASE_FOLDERS = {"A": "ISBI", "B": "ISBI_1.5", "C": "I2CVB", "D": "UCL", "E": "BIDMC", "F": "HK"}


def write_case(folder, name, shape=(12, 10, 4), label_values=(1,), mask_word="segmentation", mask=True):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash((str(folder), name))) % 2**32)
    affine = np.diag([0.6, 0.6, 3.0, 1.0])
    nib.save(nib.Nifti1Image(rng.normal(100, 20, shape).astype(np.float32), affine), str(folder / f"{name}.nii.gz"))
    if mask:
        labels = np.zeros(shape, np.uint8)
        for number, value in enumerate(label_values):
            labels[3 + number * 3 : 5 + number * 3, 3:7, 1:3] = value
        nib.save(nib.Nifti1Image(labels, affine), str(folder / f"{name}_{mask_word}.nii.gz"))


@pytest.fixture
def release(tmp_path):
    """The six site folders under a nested folder, as the public multi-site prostate release ships them."""
    root = tmp_path / "Processed_data_nii"
    for letter, folder in RELEASE_FOLDERS.items():
        for case in range(4 if letter != "F" else 3):
            word = "Segmentation" if letter == "C" and case % 2 else "segmentation"
            write_case(root / folder, f"Case{case:02d}", mask_word=word, label_values=(1, 2) if letter == "E" else (1,))
    (root / "HK" / "notes.txt").write_text("not a case")
    return root


def test_reader_finds_every_site_case_and_mask_spelling(release):
    entries = find_prostate(release.parent)
    assert len(entries) == 5 * 4 + 3
    assert sorted({e["site"] for e in entries}) == list("ABCDEF")
    by_subject = {e["subject"]: e for e in entries}
    assert by_subject["A_Case00"]["site_folder"] == "ISBI" and by_subject["A_Case00"]["institution"] == "RUNMC"
    assert by_subject["B_Case03"]["site_folder"] == "ISBI_1.5" and by_subject["B_Case03"]["institution"] == "BMC"
    assert by_subject["C_Case01"]["label"].endswith("Case01_Segmentation.nii.gz")  # capitalised spelling
    assert by_subject["C_Case02"]["label"].endswith("Case02_segmentation.nii.gz")
    assert by_subject["F_Case02"]["image"].endswith("HK/Case02.nii.gz")
    assert all("label" in e for e in entries)


def test_reader_errors_name_the_problem(tmp_path, release):
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="elsewhere: no prostate site folder .*ISBI.*HK"):
        find_prostate(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="prostate folder .*missing does not exist"):
        find_prostate(tmp_path / "missing")
    write_case(release / "HK", "Case07", mask=False)
    (release / "HK" / "Case09_segmentation.nii.gz").write_bytes(
        (release / "HK" / "Case00_segmentation.nii.gz").read_bytes()
    )
    with pytest.raises(ValueError, match=r"site F: masks without an image .*Case09"):
        find_prostate(release)
    (release / "HK" / "Case09_segmentation.nii.gz").unlink()
    no_mask = {e["subject"]: e for e in find_prostate(release)}["F_Case07"]
    assert "label" not in no_mask  # an unlabelled case is kept (usable as unlabelled target data)
    (release / "HK" / "Case00_Segmentation.nii.gz").write_bytes(
        (release / "HK" / "Case00_segmentation.nii.gz").read_bytes()
    )
    with pytest.raises(ValueError, match="site F: two masks for Case00"):
        find_prostate(release)
    (release / "HK" / "Case00_Segmentation.nii.gz").unlink()
    (release / "copy" / "UCL").mkdir(parents=True)
    with pytest.raises(ValueError, match="two folders for site D"):
        find_prostate(release)


def test_split_is_deterministic_disjoint_and_per_site(release):
    first, second = prostate_datalist(release, seed=3), prostate_datalist(release, seed=3)
    assert first == second
    subjects = {split: [e["subject"] for e in first[split]] for split in ("training", "validation", "test")}
    everything = sum(subjects.values(), [])
    assert len(everything) == len(set(everything)) == 23
    for letter in "ABCDEF":
        counts = [sum(s.startswith(letter) for s in subjects[split]) for split in ("training", "validation", "test")]
        assert counts == ([2, 1, 1] if letter != "F" else [1, 1, 1])
    assert prostate_datalist(release, seed=4) != first


def test_resolve_datalist_reads_the_prostate_layout(release, tmp_path):
    path = resolve_datalist(str(release), None, str(tmp_path / "out"), layout="prostate")
    content = json.loads(open(path).read())
    assert path.endswith("datalist_prostate.json") and len(content["test"]) == 6
    with pytest.raises(FileNotFoundError, match="no prostate site folders"):
        resolve_datalist(str(tmp_path / "out"), None, str(tmp_path / "out2"), layout="prostate")


def test_leave_one_site_out_sources(release, tmp_path):
    path = resolve_datalist(str(release), None, str(tmp_path), layout="prostate")
    assert other_sites(path, "F") == list("ABCDE")
    assert other_sites(path, "C") == list("ABDEF")
    assert other_sites(path, "F", "A, B") == ["A", "B"]
    with pytest.raises(ValueError, match="target site F is also listed"):
        other_sites(path, "F", ["A", "F"])


def test_preprocessing_merges_zonal_labels_and_normalises_each_volume(release):
    entry = {e["subject"]: e for e in find_prostate(release)}["E_Case01"]
    assert set(np.unique(nib.load(entry["label"]).get_fdata())) == {0, 1, 2}
    transform = volume_transforms(
        pixdim=None, in_plane_size=(12, 10), slice_axis=2, intensity="zscore", merge_labels=True, compact=False
    )
    out = transform(dict(entry))
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
    assert int(out["label"].sum()) == 2 * 2 * 4 * 2  # both zones kept as foreground
    assert abs(float(out["image"].mean())) < 1e-5 and abs(float(out["image"].std(unbiased=False)) - 1) < 1e-4


def test_neighbour_slices_as_channels():
    volume = torch.arange(4.0).reshape(1, 1, 1, 4).repeat(1, 2, 3, 1)
    stacked = NeighbourSlicesd("image", slice_axis=2, context=1)({"image": volume})["image"]
    assert stacked.shape == (3, 2, 3, 4)
    assert stacked[:, 0, 0, :].tolist() == [[0, 0, 1, 2], [0, 1, 2, 3], [1, 2, 3, 3]]
    wide = NeighbourSlicesd("image", slice_axis=0, context=2)({"image": torch.arange(3.0).reshape(1, 3, 1, 1)})["image"]
    assert wide[:, :, 0, 0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 2], [1, 2, 2], [2, 2, 2]]


class ImageIsThePrediction(torch.nn.Module):
    """Logits (-x, x): the predicted mask is wherever the input is positive."""

    def forward(self, x):
        return torch.cat([-x, x], dim=1)


def _volume_pair(prediction, reference):
    from monai.data import MetaTensor

    affine = torch.diag(torch.tensor([1.0, 1.0, 2.0, 1.0]))
    image = MetaTensor(torch.as_tensor(prediction, dtype=torch.float32)[None] * 2 - 1, affine=affine)
    label = MetaTensor(torch.as_tensor(reference, dtype=torch.float32)[None], affine=affine)
    return {"image": image, "label": label, "subject": "case", "site": "F"}


def test_dice_empty_prediction_scores_zero_and_largest_component():
    reference = np.zeros((16, 16, 6))
    reference[4:10, 4:10, 1:5] = 1
    empty = np.zeros_like(reference)
    with_blob = reference.copy()
    with_blob[13:15, 13:15, 2:4] = 1  # a spurious component away from the gland
    inferer = SliceInferer(roi_size=(16, 16), spatial_dim=2, sw_batch_size=8)
    network = ImageIsThePrediction()
    rows = evaluate_volumes(network, Dataset([_volume_pair(empty, reference)]), inferer, tolerances_mm=())
    assert rows[0]["dice"] == 0.0 and rows[0]["predicted_ml"] == 0.0  # not an all-ones mask
    rows = evaluate_volumes(network, Dataset([_volume_pair(with_blob, reference)]), inferer, tolerances_mm=())
    expected = 2 * reference.sum() / (with_blob.sum() + reference.sum())
    assert (
        rows[0]["dice"] == pytest.approx(expected, abs=1e-4) and rows[0]["subject"] == "case" and rows[0]["site"] == "F"
    )
    rows = evaluate_volumes(
        network, Dataset([_volume_pair(with_blob, reference)]), inferer, tolerances_mm=(), largest_component=True
    )
    assert rows[0]["dice"] == pytest.approx(1.0)


def test_per_source_site_cluster_counts():
    groups = np.array(["A", "A", "B", "B", "B", "C"], dtype=object)
    labels = np.array([0, 0, 1, 2, 2, 0])
    stats = per_group_cluster_counts(groups, labels, n_clusters=3)
    assert stats["A"] == {"slices": 2, "cluster_counts": [2, 0, 0], "clusters_used": 1, "largest_share": 1.0}
    assert stats["B"]["cluster_counts"] == [0, 1, 2] and stats["B"]["largest_share"] == pytest.approx(2 / 3)
    assert stats["C"]["clusters_used"] == 1

    class Slices:  # what SliceDataset exposes: its volume entries and their slice counts
        data = [{"site": "A"}, {"site": "B"}]
        slice_counts = np.array([2, 3])

    assert source_slice_groups(Slices()).tolist() == ["A", "A", "B", "B", "B"]
    assert source_slice_groups([1, 2, 3]) is None
