import json

import nibabel as nib
import numpy as np
import pytest
import torch

from aiva_monai.data import (
    CC359_SITES,
    PRESETS,
    ScannerChange,
    SimulateScannerd,
    SliceDataset,
    cc359_datalist,
    find_cc359,
    load_datalist,
    make_demo_dataset,
    simulate_scanner,
    volume_transforms,
)
from aiva_monai.data.simulate import main as simulate_main

VENDORS = {
    "philips_15": ("philips", "15"),
    "philips_3": ("philips", "3"),
    "siemens_15": ("siemens", "15"),
    "siemens_3": ("siemens", "3"),
    "ge_15": ("ge", "15"),
    "ge_3": ("ge", "3"),
}


def write_nifti(path, array, affine=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.eye(4) if affine is None else affine), str(path))


@pytest.fixture
def cc359_tree(tmp_path):
    """Tiny files in the CC359 release layout: Original/ images, Silver-standard/ masks, 4 subjects per site."""
    number = 1
    for site, (vendor, field) in VENDORS.items():
        for _ in range(4):
            stem = f"CC{number:04d}_{vendor}_{field}_{40 + number}_{'M' if number % 2 else 'F'}"
            write_nifti(tmp_path / "Original" / f"{stem}.nii.gz", np.full((4, 4, 4), number, np.float32))
            write_nifti(tmp_path / "Silver-standard" / f"{stem}_ss.nii.gz", np.ones((4, 4, 4), np.uint8))
            number += 1
    (tmp_path / "Original" / "README.txt").write_text("not an image")
    write_nifti(tmp_path / "Original" / "other_scan.nii.gz", np.zeros((2, 2, 2)))
    return tmp_path


def test_cc359_reader_finds_pairs_and_sites(cc359_tree):
    entries = find_cc359(cc359_tree)
    assert len(entries) == 24 and [e["subject"] for e in entries] == [f"CC{n:04d}" for n in range(1, 25)]
    assert {e["site"] for e in entries} == set(CC359_SITES)
    first = entries[0]
    assert first["site"] == "philips_15" and first["field"] == 1.5 and first["age"] == 41 and first["sex"] == "M"
    assert first["image"].endswith("Original/CC0001_philips_15_41_M.nii.gz")
    assert first["label"].endswith("Silver-standard/CC0001_philips_15_41_M_ss.nii.gz")
    assert entries[5]["site"] == "philips_3"


def test_cc359_split_is_per_site_deterministic_and_disjoint(cc359_tree):
    datalist = cc359_datalist(cc359_tree, split=(2, 1, 1), seed=0)
    assert datalist == cc359_datalist(cc359_tree, split=(2, 1, 1), seed=0)
    for site in CC359_SITES:
        groups = [{e["subject"] for e in datalist[s] if e["site"] == site} for s in ("training", "validation", "test")]
        assert [len(g) for g in groups] == [2, 1, 1]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    other = cc359_datalist(cc359_tree, split=(2, 1, 1), seed=5)
    assert [e["subject"] for e in other["training"]] != [e["subject"] for e in datalist["training"]]
    with pytest.raises(ValueError, match="site siemens_15 has 4 subjects .* fewer than the split"):
        cc359_datalist(cc359_tree)  # 45/5/10 needs 60


def test_cc359_reader_errors(cc359_tree, tmp_path):
    (cc359_tree / "Silver-standard" / "CC0002_philips_15_42_F_ss.nii.gz").unlink()
    entries = {e["subject"]: e for e in find_cc359(cc359_tree)}
    assert "label" not in entries["CC0002"]
    write_nifti(cc359_tree / "copy" / "CC0003_philips_15_43_M.nii.gz", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="two files for subject CC0003"):
        find_cc359(cc359_tree)
    with pytest.raises(FileNotFoundError, match="no CC359 image"):
        find_cc359(_empty(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_cc359(tmp_path / "missing")


def _empty(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def test_load_datalist_errors(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", np.zeros((2, 2, 2)))
    datalist = {
        "training": [{"image": "a.nii.gz", "label": "a.nii.gz", "site": "s1"}, {"image": "gone.nii.gz", "site": "s2"}]
    }
    (tmp_path / "d.json").write_text(json.dumps(datalist))
    assert load_datalist(tmp_path / "d.json", "training", "s1")[0]["image"] == str(tmp_path / "a.nii.gz")
    with pytest.raises(ValueError, match=r"no 'training' entries of site\(s\) \['s9'\]; sites present: \['s1', 's2'\]"):
        load_datalist(tmp_path / "d.json", "training", "s9")
    with pytest.raises(FileNotFoundError, match="gone.nii.gz does not exist"):
        load_datalist(tmp_path / "d.json", "training")
    with pytest.raises(ValueError, match="has no label"):
        load_datalist(tmp_path / "d.json", "training", "s2", require_labels=True, check_files=False)
    with pytest.raises(ValueError, match="has no 'test' list"):
        load_datalist(tmp_path / "d.json", "test")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        load_datalist(tmp_path / "bad.json", "training")


def smooth_volume(seed=0, shape=(24, 24, 24)):
    rng = np.random.default_rng(seed)
    grid = np.indices(shape).astype(float)
    return (np.sin(grid[0] / 3) + np.cos(grid[1] / 4) + 2 + 0.1 * rng.random(shape)) * 100


def test_neutral_scanner_change_is_identity_and_effects_are_seeded():
    volume = smooth_volume()
    np.testing.assert_allclose(simulate_scanner(volume, ScannerChange(), seed=0), volume, rtol=1e-5)
    strong = PRESETS["strong"]
    np.testing.assert_array_equal(simulate_scanner(volume, strong, 3), simulate_scanner(volume, strong, 3))
    assert not np.array_equal(simulate_scanner(volume, strong, 3), simulate_scanner(volume, strong, 4))


def test_individual_scanner_effects():
    volume = smooth_volume()
    scale = np.percentile(volume, 99.5)
    darker = simulate_scanner(volume, ScannerChange(gamma=2.0), 0)
    np.testing.assert_allclose(darker, (np.clip(volume / scale, 0, None) ** 2) * scale, rtol=1e-5)
    edge = np.zeros((20, 20, 20))
    edge[:, :, 10:] = 1.0
    thick = simulate_scanner(edge, ScannerChange(slice_thickness=3, thickness_axis=2), 0)
    np.testing.assert_allclose(thick[:, :, 0], 0, atol=1e-6)  # far from the edge: unchanged
    assert 0.05 < thick[5, 5, 9] < 0.95  # the edge is blurred along the thickness axis only
    np.testing.assert_allclose(thick[:, 3, :], thick[:, 7, :])
    noisy = simulate_scanner(volume, ScannerChange(noise=0.05), 0)
    assert 0.02 * scale < np.std(noisy - volume) < 0.08 * scale
    biased = simulate_scanner(volume, ScannerChange(bias_field=0.5), 0)
    ratio = biased / volume
    assert ratio.std() > 0.01 and ratio.min() > 0  # a smooth, positive multiplicative field
    with pytest.raises(ValueError, match="invalid scanner change"):
        ScannerChange(gamma=0)


def test_simulate_transform_uses_a_per_subject_seed():
    image = torch.as_tensor(smooth_volume())[None]
    transform = SimulateScannerd()
    a = transform({"image": image, "subject": "A", "simulate": {"preset": "strong", "seed": 0}})["image"]
    b = transform({"image": image, "subject": "B", "simulate": {"preset": "strong", "seed": 0}})["image"]
    again = transform({"image": image, "subject": "A", "simulate": {"preset": "strong", "seed": 0}})["image"]
    assert torch.equal(a, again) and not torch.equal(a, b)
    unchanged = transform({"image": image, "subject": "A"})["image"]
    assert unchanged is image
    with pytest.raises(ValueError, match="unknown scanner preset"):
        transform({"image": image, "simulate": {"preset": "nope"}})


def test_simulate_command_writes_a_labelled_simulated_site(tmp_path):
    images = tmp_path / "data"
    for subject in ("s1", "s2"):
        write_nifti(images / f"{subject}.nii.gz", smooth_volume().astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
        write_nifti(images / f"{subject}_mask.nii.gz", np.ones((24, 24, 24), np.uint8))
    datalist = {
        "test": [
            {"image": f"data/{s}.nii.gz", "label": f"data/{s}_mask.nii.gz", "subject": s, "site": "real"}
            for s in ("s1", "s2")
        ]
    }
    (tmp_path / "d.json").write_text(json.dumps(datalist))
    before = (images / "s1.nii.gz").read_bytes()
    with pytest.raises(ValueError, match="refusing to overwrite an input image"):
        simulate_main(["--datalist", str(tmp_path / "d.json"), "--output-dir", str(images), "--site-name", "x"])
    assert (images / "s1.nii.gz").read_bytes() == before
    simulate_main(
        ["--datalist", str(tmp_path / "d.json"), "--output-dir", str(tmp_path / "sim"), "--site-name", "scanner_b"]
    )
    written = json.loads((tmp_path / "sim" / "datalist.json").read_text())
    assert written["simulated"] and "SIMULATED" in written["description"]
    assert {e["site"] for e in written["test"]} == {"scanner_b_simulated"}
    output = nib.load(written["test"][0]["image"])
    assert "SIMULATED" in output.header["descrip"].tobytes().decode()
    np.testing.assert_array_equal(output.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    assert written["test"][0]["label"] == str(images / "s1_mask.nii.gz")
    assert (images / "s1.nii.gz").read_bytes() == before


def test_demo_dataset_is_synthetic_and_reusable(tmp_path):
    path = make_demo_dataset(tmp_path, n_subjects=(2, 1, 1))
    content = json.loads(path.read_text())
    assert content["synthetic"] and "SYNTHETIC" in content["description"]
    assert {e["site"] for e in content["training"]} == {"synthetic_a", "synthetic_b"}
    assert all("simulate" in e for e in content["training"] if e["site"] == "synthetic_b")
    mask = nib.load(str(tmp_path / content["training"][0]["label"])).get_fdata()
    assert 0.05 < mask.mean() < 0.6
    stamp = path.stat().st_mtime_ns
    assert make_demo_dataset(tmp_path, n_subjects=(2, 1, 1)) == path and path.stat().st_mtime_ns == stamp


def test_slice_dataset_indexing_and_errors(tmp_path):
    for n, depth in ((0, 5), (1, 7)):
        write_nifti(tmp_path / f"v{n}.nii.gz", np.random.rand(depth, 10, 12).astype(np.float32))
        write_nifti(tmp_path / f"m{n}.nii.gz", np.ones((depth, 10, 12), np.uint8))
    data = [
        {"image": str(tmp_path / f"v{n}.nii.gz"), "label": str(tmp_path / f"m{n}.nii.gz"), "subject": f"s{n}"}
        for n in (0, 1)
    ]
    dataset = SliceDataset(data, volume_transforms(pixdim=None, in_plane_size=(16, 16)), progress=False)
    assert len(dataset) == 12 and dataset.locate(6) == (1, 1)
    sample = dataset[6]
    assert sample["image"].shape == (1, 16, 16) and sample["image"].dtype == torch.float32
    assert sample["index"] == 6 and sample["subject"] == "s1" and sample["slice"] == 1
    unlabelled = SliceDataset(
        [{"image": d["image"]} for d in data], volume_transforms(pixdim=None, in_plane_size=(16, 16)), progress=False
    )
    assert "label" not in unlabelled[0]
    with pytest.raises(IndexError):
        dataset.locate(12)
    with pytest.raises(ValueError, match="empty datalist"):
        SliceDataset([], volume_transforms())
