"""The aiva_brain bundle through monai.bundle: configs, metadata, a few-iteration pretrain + adapt + evaluate
on real IXI-HH subjects, target labels never read, and inference geometry."""

import csv
import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigWorkflow, run
from scipy.spatial.transform import Rotation

from aiva_monai.bundle import verify_metadata
from aiva_monai.inference import read_scan
from aiva_monai.networks import PreActResUNet
from tests.helpers import run_tiny_adaptation

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "aiva_brain"
CONFIGS = BUNDLE / "configs"
SMALL_NETWORK = {"network_def#channels": [8, 16, 32, 64], "network_def#blocks_per_level": 1}
FEW_STEPS = {"max_steps": 4, "epoch_length": 2, "batch_size": 4, "log_every": 1}


def test_metadata_is_valid_against_the_shipped_schema():
    verify_metadata(CONFIGS / "metadata.json")
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "brain"}


@pytest.mark.parametrize(
    "config, kind", [("pretrain.json", "train"), ("train.json", "train"), ("inference.json", "infer")]
)
def test_configs_parse_and_have_the_model_zoo_properties(config, kind, tmp_path):
    overrides = {"output_dir": str(tmp_path)}
    if kind == "infer":
        overrides["dataset_dir"] = str(write_oblique_nifti(tmp_path / "in")[0])
    workflow = ConfigWorkflow(config_file=str(CONFIGS / config), workflow_type=kind, logging_file=False, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    for key in ("bundle_root", "device", "dataset_dir", "output_dir", "network_def"):
        assert key in workflow.parser
    if kind == "train":
        assert "train#trainer" in workflow.parser and "validate#evaluator" in workflow.parser


def test_shipped_source_model_loads_into_the_inference_network():
    workflow = ConfigWorkflow(config_file=str(CONFIGS / "inference.json"), workflow_type="infer", logging_file=False)
    network = workflow.parser.get_parsed_content("network_def")
    checkpoint = Path(workflow.parser.get_parsed_content("checkpoint"))
    assert checkpoint == BUNDLE / "models" / "model.pt" and checkpoint.stat().st_size < 20e6
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))


# -- a few iterations on real IXI-HH subjects -----------------------------------------------------------------


@pytest.fixture(scope="module")
def ixi_tiny(ixi_root, tmp_path_factory):
    """7 real subjects: source 2 train / 1 val / 1 test; simulated target 2 train / 1 test."""
    shipped = json.loads((CONFIGS / "datalist_ixi_hh.json").read_text())
    source = [e for e in shipped["training"] if e["site"] == "ixi_hh"][:2]
    target = [e for e in shipped["training"] if e["site"] != "ixi_hh"][:2]
    datalist = {
        "description": "test subset of datalist_ixi_hh.json",
        "default_source_site": shipped["default_source_site"],
        "default_target_site": shipped["default_target_site"],
        "training": source + target,
        # one target validation subject: its images (never its label) are the held-out slices of label-free selection
        "validation": [e for e in shipped["validation"] if e["site"] == "ixi_hh"][:1]
        + [e for e in shipped["validation"] if e["site"] != "ixi_hh"][:1],
        "test": [e for e in shipped["test"] if e["site"] == "ixi_hh"][:1]
        + [e for e in shipped["test"] if e["site"] != "ixi_hh"][:1],
    }
    folder = tmp_path_factory.mktemp("ixi_tiny")
    (folder / "datalist.json").write_text(json.dumps(datalist))
    common = {"dataset_dir": str(ixi_root), "datalist": str(folder / "datalist.json"), **SMALL_NETWORK, **FEW_STEPS}
    run(config_file=str(CONFIGS / "pretrain.json"), output_dir=str(folder / "pretrain"), **common)
    return folder, common


def adapt(folder, common, output, datalist=None):
    source_checkpoint = str(folder / "pretrain" / "model.pt")
    return run_tiny_adaptation(CONFIGS, common, output, datalist, source_checkpoint=source_checkpoint)


def test_pretrain_adapt_evaluate_through_monai_bundle(ixi_tiny):
    folder, common = ixi_tiny
    assert (folder / "pretrain" / "model.pt").is_file()
    overrides = adapt(folder, common, folder / "train")
    assert (folder / "train" / "model.pt").is_file()
    (checkpoint,) = (folder / "train" / "checkpoints").glob("checkpoint*.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    # cluster_every = epoch_length = 2 steps: a clustering round at the start of both epochs
    assert state["clustering"]["clustered_epoch"] == 2 and [h["epoch"] for h in state["clustering"]["history"]] == [
        1,
        2,
    ]
    assert state["loss"]["_extra_state"]["lambda_value"] is None  # 4 steps < 10 calibration batches
    # per-site BatchNorm: the pick is also saved with the source statistics, for the source site's scans
    adapted, for_source = (
        torch.load(folder / "train" / name, map_location="cpu", weights_only=True)
        for name in ("model.pt", "model_source_statistics.pt")
    )
    assert adapted.keys() == for_source.keys()
    statistics = [k for k in adapted if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert statistics and all(torch.equal(adapted[k], for_source[k]) for k in adapted if k not in statistics)
    assert not any(torch.equal(adapted[k], for_source[k]) for k in statistics if k.endswith("running_mean"))
    # the last epoch (the `last` rule keeps it) with the source set the trainer checkpointed at that epoch
    last = torch.load(folder / "train" / "selection" / "epoch_0002_source_statistics.pt", weights_only=True)
    source_set = state["trainer"]["batchnorm"]["source_set"]
    means = [k for k in last if k.endswith("running_mean")]
    assert len(means) == len(source_set)
    for key, saved in zip(means, source_set):
        torch.testing.assert_close(last[key], saved["running_mean"])
        torch.testing.assert_close(last[key.replace("running_mean", "running_var")], saved["running_var"])

    run(config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")], **overrides)
    evaluation = folder / "train" / "evaluation"
    rows = list(csv.DictReader(open(evaluation / "evaluation.csv")))
    models = {}
    for row in rows:
        models.setdefault(row["model"], []).append(row["set"])
    picks = json.loads((folder / "train" / "selection.json").read_text())
    # model_source_statistics.pt, last and on the source test subject only: it is a model for the source site
    with_source_statistics = f"adapted ({picks['rule']}) with source statistics"
    assert list(models)[-1] == with_source_statistics and models.pop(with_source_statistics) == ["source test"]
    # source, the AdaBN baseline and every distinct pick of the selection rules, each on both test subjects
    assert list(models)[:2] == ["source", "adabn"] and all(
        sorted(sets) == ["source test", "target test"] for sets in models.values()
    )
    adapted = [name for name in models if name.startswith("adapted (")]
    assert adapted[0].startswith(f"adapted ({picks['rule']}")  # the configured rule's pick (model.pt) first
    assert sorted(r for name in adapted for r in name[len("adapted (") : -1].split(", ")) == sorted(picks["picks"])
    summary = (evaluation / "summary.md").read_text()
    assert "model selection" in summary and "surface Dice @ 1 mm" in summary and "ixi_hh_simulated_strong" in summary
    assert f"{with_source_statistics} = `{folder / 'train' / 'model_source_statistics.pt'}`" in summary
    assert (evaluation / "clusters.png").stat().st_size > 10_000


def test_adaptation_never_reads_target_labels(ixi_tiny, tmp_path):
    """Target label files replaced by garbage: adaptation runs and ends with the same weights."""
    folder, common = ixi_tiny
    datalist = json.loads((folder / "datalist.json").read_text())
    for entry in datalist["training"] + datalist["validation"] + datalist["test"]:
        if entry["site"] != "ixi_hh":
            garbage = tmp_path / f"{entry['subject']}_garbage.nii.gz"
            garbage.write_bytes(b"not a NIfTI file")
            entry["label"] = str(garbage)
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    adapt(folder, common, tmp_path / "garbage_labels", datalist=tmp_path / "datalist.json")
    adapt(folder, common, tmp_path / "real_labels")
    weights = [
        torch.load(next((tmp_path / name / "checkpoints").glob("checkpoint*.pt")), weights_only=True)["model"]
        for name in ("garbage_labels", "real_labels")
    ]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


# -- inference geometry ----------------------------------------------------------------------------------------


def oblique_affine():
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [25, -15, 40], degrees=True).as_matrix() @ np.diag([0.9, 1.4, 3.0])
    affine[:3, 3] = [12.0, -30.0, 7.5]
    return affine


def head_like(shape):
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    return (np.sqrt((grid**2).sum(0)) < 0.7).astype(np.float32) * 100 + np.random.default_rng(0).random(shape).astype(
        np.float32
    )


def write_oblique_nifti(folder):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "oblique_case.nii.gz"
    nib.save(nib.Nifti1Image(head_like((70, 60, 30)), oblique_affine()), str(path))
    return path, oblique_affine()


def write_dicom_series(folder, shape=(40, 50, 24)):
    """An oblique, anisotropic DICOM series written with SimpleITK."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = sitk.GetImageFromArray(head_like(shape).transpose(2, 1, 0).astype(np.int16))
    volume.SetSpacing((0.8, 1.1, 2.5))
    direction = Rotation.from_euler("xyz", [10, 5, -20], degrees=True).as_matrix()
    volume.SetDirection(direction.flatten().tolist())
    volume.SetOrigin((-20.0, 15.0, 3.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = "1.2.826.0.1.3680043.2.1125.1.42"
    for z in range(volume.GetDepth()):
        image = volume[:, :, z]
        tags = {
            "0008|0060": "MR",
            "0020|000e": series,
            "0020|000d": series + ".1",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.4",
            "0008|0018": f"{series}.{z + 1}",
            "0020|0013": str(z + 1),
            "0020|0032": "\\".join(map(str, volume.TransformIndexToPhysicalPoint((0, 0, z)))),
            "0020|0037": "\\".join(map(str, list(direction[:, 0]) + list(direction[:, 1]))),
            "0018|0050": "2.5",
            "0028|0030": "1.1\\0.8",
            "0020|0052": series + ".2",  # frame of reference (a DICOM SEG needs it)
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(image)
    return folder


def test_inference_writes_masks_in_the_input_geometry(tmp_path):
    nifti, affine = write_oblique_nifti(tmp_path / "scans")
    write_dicom_series(tmp_path / "scans" / "dicom_case")
    before = hashlib.sha256(nifti.read_bytes()).hexdigest()
    checkpoint = tmp_path / "random.pt"
    torch.manual_seed(0)
    torch.save(PreActResUNet(channels=(16, 32, 64, 128)).state_dict(), checkpoint)
    run(
        config_file=str(CONFIGS / "inference.json"),
        dataset_dir=str(tmp_path / "scans"),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(checkpoint),
        logging_file=False,
    )
    mask = nib.load(str(tmp_path / "out" / "oblique_case_brainmask.nii.gz"))
    assert mask.shape == (70, 60, 30) and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, affine, atol=1e-4)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}
    assert hashlib.sha256(nifti.read_bytes()).hexdigest() == before  # the input is untouched

    dicom_mask = nib.load(str(tmp_path / "out" / "dicom_case_brainmask.nii.gz"))
    reference = read_scan({"image": str(tmp_path / "scans" / "dicom_case"), "format": "dicom"})
    assert dicom_mask.shape == tuple(reference.shape[1:]) == (40, 50, 24)
    np.testing.assert_allclose(dicom_mask.affine, reference.affine.numpy(), atol=1e-4)
    # the DICOM geometry in RAS: LPS origin (-20, 15, 3) becomes (20, -15, 3)
    np.testing.assert_allclose(dicom_mask.affine[:3, 3], [20.0, -15.0, 3.0], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(dicom_mask.affine[:3, :3], axis=0), [0.8, 1.1, 2.5], atol=1e-4)


def test_main_command_runs_the_synthetic_demo_end_to_end(tmp_path, capsys):
    """`monai.bundle run --config_file train.json` with no data: demo pretraining, adaptation, evaluation
    (fewer steps than the real demo)."""
    run(
        config_file=str(CONFIGS / "train.json"),
        output_dir=str(tmp_path),
        demo_pretrain_steps=4,
        max_steps=4,
        epoch_length=2,
        cluster_every=4,
        logging_file=False,
        **{"cluster_options#tsne_method": "sklearn"},
    )
    printed = capsys.readouterr().out
    # source, AdaBN and the configured rule's pick side by side on the 6 synthetic target test volumes,
    # then the headline
    assert "| source | target test | 6 |" in printed and "| adabn | target test | 6 |" in printed
    assert "| adapted (target_agreement" in printed and re.search(
        r"target test dice: source [\d.]+, AdaBN [\d.]+, adapted \(target_agreement", printed
    )
    assert "SYNTHETIC" in printed
    assert json.loads((tmp_path / "demo_data" / "datalist.json").read_text())["synthetic"] is True
    for produced in ("demo_source/model.pt", "model.pt", "evaluation/evaluation.csv", "evaluation/clusters.png"):
        assert (tmp_path / produced).is_file(), produced
