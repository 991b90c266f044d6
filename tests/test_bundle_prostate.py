"""The aiva_prostate bundle through monai.bundle: metadata, model-zoo properties, and a few-iteration
leave-one-site-out pretrain + adapt + evaluate on tiny files in the multi-site release layout (with
2.5D neighbouring-slice input), target labels never read, inference geometry."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, run

from aiva_monai.bundle import verify_metadata
from aiva_monai.data.prostate import make_prostate_demo
from aiva_monai.networks import PreActResUNet
from tests.helpers import run_tiny_adaptation

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "aiva_prostate"
CONFIGS = BUNDLE / "configs"
SMALL = {
    "network_def#channels": [8, 16, 32, 64],
    "network_def#blocks_per_level": 1,
    "pixdim": [2.0, 2.0, 0.0],
    "in_plane_size": [48, 48],
}
FEW_STEPS = {"max_steps": 4, "epoch_length": 2, "batch_size": 4, "log_every": 1}


def test_metadata_is_valid_and_no_weights_are_shipped():
    verify_metadata(CONFIGS / "metadata.json")
    meta = json.loads((CONFIGS / "metadata.json").read_text())
    assert meta["name"] == "aiva_prostate"
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "prostate"}
    assert not list((BUNDLE / "models").glob("*.pt"))  # no real prostate data here: no trained weights
    for name in ("LICENSE", "docs/README.md", "configs/logging.conf", "configs/evaluate.json"):
        assert (BUNDLE / name).is_file(), name
    assert "no real prostate data" in (BUNDLE / "docs" / "README.md").read_text().lower()


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """Tiny SYNTHETIC cases in the release layout:
    <root>/{ISBI,ISBI_1.5,I2CVB,UCL,BIDMC,HK}/CaseNN(.._segmentation).nii.gz.
    """
    folder = tmp_path_factory.mktemp("prostate")
    make_prostate_demo(folder / "demo", cases_per_site=4, shape=(48, 48, 10))
    return folder / "demo" / "SYNTHETIC_prostate"


@pytest.mark.parametrize(
    "config, kind", [("pretrain.json", "train"), ("train.json", "train"), ("inference.json", "infer")]
)
def test_configs_parse_and_have_the_model_zoo_properties(config, kind, tmp_path, release):
    overrides = {"output_dir": str(tmp_path / "out")}
    if kind == "infer":
        overrides["dataset_dir"] = str(release / "HK" / "Case00.nii.gz")
    else:
        overrides.update(dataset_dir=str(release), work_dir=str(tmp_path), target_site="F")
    if config == "train.json":
        overrides["source_checkpoint"] = str(tmp_path / "source.pt")
        torch.save({}, tmp_path / "source.pt")
    workflow = ConfigWorkflow(config_file=str(CONFIGS / config), workflow_type=kind, logging_file=False, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    for key in ("bundle_root", "device", "dataset_dir", "output_dir", "network_def"):
        assert key in workflow.parser
    if kind == "train":
        assert "train#trainer" in workflow.parser and "validate#evaluator" in workflow.parser
        assert workflow.parser.get_parsed_content("source") == list("ABCDE")
        assert workflow.parser.get_parsed_content("target") == "F"


def test_train_without_a_pretrained_source_model_says_what_to_do(tmp_path, release):
    with pytest.raises(Exception) as raised:
        ConfigWorkflow(
            config_file=str(CONFIGS / "train.json"),
            workflow_type="train",
            logging_file=False,
            dataset_dir=str(release),
            work_dir=str(tmp_path),
            target_site="C",
        ).initialize()
    message = "".join(str(e) for e in _chain(raised.value))
    assert "pretrain_target_C/model.pt does not exist" in message and "run configs/pretrain.json" in message


def _chain(error):
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


@pytest.fixture(scope="module")
def pretrained(release, tmp_path_factory):
    work = tmp_path_factory.mktemp("prostate_work")
    common = {
        "dataset_dir": str(release),
        "work_dir": str(work),
        "target_site": "F",
        "context_slices": 1,
        **SMALL,
        **FEW_STEPS,
    }
    run(config_file=str(CONFIGS / "pretrain.json"), **common)
    return work, common


def adapt(work, common, output, datalist=None):
    return run_tiny_adaptation(CONFIGS, common, output, datalist)


def test_leave_one_site_out_pretrain_adapt_evaluate(pretrained):
    work, common = pretrained
    assert (work / "pretrain_target_F" / "model.pt").is_file()
    datalist = json.loads((work / "datalist_prostate.json").read_text())
    assert {e["site"] for e in datalist["training"]} == set("ABCDEF")
    overrides = adapt(work, common, work / "adapt")
    (checkpoint,) = (work / "adapt" / "checkpoints").glob("checkpoint*.pt")
    history = torch.load(checkpoint, map_location="cpu", weights_only=True)["clustering"]["history"]
    # the union of A-E is one source; each site's share of the source clusters is recorded
    assert sorted(history[0]["source_sites"]) == list("ABCDE")
    assert all(sum(s["cluster_counts"]) == s["slices"] > 0 for s in history[0]["source_sites"].values())

    run(
        config_file=[str(CONFIGS / "train.json"), str(CONFIGS / "evaluate.json")],
        cluster_figure=False,
        largest_component=True,
        **overrides,
    )
    evaluation = work / "adapt" / "evaluation"
    rows = list(csv.reader((evaluation / "evaluation.csv").read_text().splitlines()))
    header = rows[0]
    assert header[:4] == ["model", "set", "subject", "site"] and "dice" in header and "surface_dice_1mm" not in header
    models = list(dict.fromkeys(r[0] for r in rows[1:]))
    # source, AdaBN, each distinct pick of the label-free selection rules, then the configured rule's pick with the
    # source BatchNorm statistics (model_source_statistics.pt), scored on the source test cases only
    rule = json.loads((work / "adapt" / "selection.json").read_text())["rule"]
    assert models[-1] == f"adapted ({rule}) with source statistics"
    models = models[:-1]
    assert models[:2] == ["source", "adabn"] and len(models) > 2 and all(m.startswith("adapted (") for m in models[2:])
    target_rows = [r for r in rows[1:] if r[1] == "target test"]
    assert (
        len(target_rows) == len(models)
        and {r[3] for r in target_rows} == {"F"}
        and all(r[2].startswith("F_Case") for r in target_rows)
    )
    # every model x (1 target test case + 5 source test cases), the source-statistics model x 5 source test cases
    assert len(rows) == 1 + len(models) * 6 + 5
    summary = (evaluation / "summary.md").read_text()
    assert "source test: site A" in summary and "source test: site E" in summary
    assert (
        "largest connected component kept" in summary
        and "source sites: A, B, C, D, E (one source); target site: F" in summary
    )


def test_adaptation_never_reads_target_labels(pretrained, tmp_path):
    """The target site's label files replaced by garbage: adaptation runs and ends with the same weights."""
    work, common = pretrained
    datalist = json.loads((work / "datalist_prostate.json").read_text())
    for entry in datalist["training"] + datalist["validation"] + datalist["test"]:
        if entry["site"] == "F":
            garbage = tmp_path / f"{entry['subject']}_garbage.nii.gz"
            garbage.write_bytes(b"not a NIfTI file")
            entry["label"] = str(garbage)
    (tmp_path / "garbage.json").write_text(json.dumps(datalist))
    adapt(work, common, tmp_path / "garbage_labels", datalist=tmp_path / "garbage.json")
    adapt(work, common, tmp_path / "real_labels", datalist=work / "datalist_prostate.json")
    weights = [
        torch.load(next((tmp_path / name / "checkpoints").glob("checkpoint*.pt")), weights_only=True)["model"]
        for name in ("garbage_labels", "real_labels")
    ]
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_inference_writes_prostate_masks_in_the_input_geometry(tmp_path, release):
    checkpoint = tmp_path / "random.pt"
    torch.manual_seed(0)
    torch.save(PreActResUNet(in_channels=3, channels=(8, 16, 32, 64), blocks_per_level=1).state_dict(), checkpoint)
    scan = release / "UCL" / "Case01.nii.gz"
    run(
        config_file=str(CONFIGS / "inference.json"),
        dataset_dir=str(scan),
        output_dir=str(tmp_path / "out"),
        checkpoint=str(checkpoint),
        context_slices=1,
        logging_file=False,
        **{k: v for k, v in SMALL.items()},
    )
    mask = nib.load(str(tmp_path / "out" / "Case01_prostate.nii.gz"))
    image = nib.load(str(scan))
    assert mask.shape == image.shape and mask.get_data_dtype() == np.uint8
    np.testing.assert_allclose(mask.affine, image.affine, atol=1e-5)
    assert (tmp_path / "out" / "Case01_prostate.png").stat().st_size > 1000  # overlay for visual QA
    summary = (tmp_path / "out" / "summary.csv").read_text().splitlines()
    assert (
        summary[0].startswith("case,input,mask,overlay,dicom_seg,volume_ml")
        and summary[1].startswith("Case01,")
        and ",ok," in summary[1]
    )
