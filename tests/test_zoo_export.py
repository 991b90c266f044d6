"""Bundles that travel (issue 13): ``python -m aiva_monai.zoo_export`` writes a self-contained zoo-layout copy
of each bundle; the model zoo's checks in full mode (``tests/zoo_verify.py``) pass on the copies; the copies'
inference and the synthetic training demo run in a Python where ``aiva_monai`` cannot be imported
(``tests/without_aiva_monai.py``); inference configs initialise with no input."""

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow

from aiva_monai.inference import ExitCode, InferenceExit
from aiva_monai.networks import PreActResUNet
from aiva_monai.zoo_export import ZOO_SCHEMA_URL, export_bundle
from tests.test_bundle_brain import head_like, write_dicom_series

REPOSITORY = Path(__file__).resolve().parents[1]
BUNDLES = REPOSITORY / "bundles"
SCHEMA = BUNDLES / "schema" / "meta_schema.json"
WITHOUT = REPOSITORY / "tests" / "without_aiva_monai.py"


def without_aiva_monai(args, cwd, timeout=900):
    """``python tests/without_aiva_monai.py ARGS`` in ``cwd``: aiva_monai blocked, ``cwd`` first on the path."""
    return subprocess.run(
        [sys.executable, str(WITHOUT), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Both bundles exported; the prostate bundle ships no weights, so a seeded random network is given as
    its ``models/model.pt`` (the zoo expects one)."""
    folder = tmp_path_factory.mktemp("zoo")
    torch.manual_seed(0)
    prostate_weights = folder / "prostate_random.pt"
    torch.save(PreActResUNet(in_channels=1, channels=(16, 32, 64, 128)).state_dict(), prostate_weights)
    return {
        "aiva_brain": export_bundle(BUNDLES / "aiva_brain", folder / "aiva_brain"),
        "aiva_prostate": export_bundle(
            BUNDLES / "aiva_prostate", folder / "aiva_prostate", checkpoint=prostate_weights
        ),
    }


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_the_export_is_self_contained(bundle, exported):
    root = exported[bundle]
    for name in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "configs/logging.conf",
        "docs/README.md",
        "LICENSE",
        "models/model.pt",
        "scripts/__init__.py",
        "scripts/inference/evaluator.py",
        "scripts/engines/__init__.py",
        "scripts/engines/base.py",
        "scripts/engines/aiva.py",
        "scripts/handlers/aiva_clustering.py",
    ):
        assert (root / name).is_file(), name
    assert not (root / "scripts" / "experiments").exists()  # no config needs the experiment matrix
    for file in [*root.joinpath("configs").rglob("*.json"), *root.joinpath("scripts").rglob("*.py")]:
        assert "aiva_monai" not in file.read_text(encoding="utf-8"), file
    inference = json.loads((root / "configs" / "inference.json").read_text(encoding="utf-8"))
    assert (
        "$import scripts" in inference["imports"]
        and inference["evaluator"]["_target_"] == "scripts.inference.InferenceEvaluator"
    )
    meta = json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))
    assert meta["schema"] == ZOO_SCHEMA_URL and "aiva-monai" not in meta["required_packages_version"]
    required = {name.lower() for name in meta["required_packages_version"]}
    assert {"highdicom", "nibabel", "simpleitk", "pytorch-ignite", "scikit-learn"} <= required
    for name, version in meta["required_packages_version"].items():
        assert importlib.metadata.version(name) == version
    assert meta["pytorch_version"] == importlib.metadata.version("torch") and meta[
        "monai_version"
    ] == importlib.metadata.version("monai")


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_the_zoo_checks_pass_on_the_exported_copy(bundle, exported):
    done = without_aiva_monai(
        [REPOSITORY / "tests" / "zoo_verify.py", exported[bundle], "--schema", SCHEMA], cwd=exported[bundle]
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for check in ("directory", "version and changelog", "metadata", "properties", "data shape", "TorchScript"):
        assert f"zoo check passed: {check}" in done.stdout
    assert f"{bundle}: all zoo checks passed" in done.stdout


def test_the_repository_bundle_fails_where_aiva_monai_is_missing(tmp_path):
    """The blocked import is real: the repository's own bundle (configs importing aiva_monai, metadata requiring
    aiva-monai) fails the zoo checks and its inference there."""
    done = without_aiva_monai(
        [REPOSITORY / "tests" / "zoo_verify.py", BUNDLES / "aiva_brain", "--schema", SCHEMA], cwd=tmp_path
    )
    assert done.returncode != 0 and "metadata requires aiva-monai, which is not on the package index" in done.stderr
    done = without_aiva_monai(
        [
            "monai.bundle",
            "run",
            "--config_file",
            BUNDLES / "aiva_brain" / "configs" / "inference.json",
            "--dataset_dir",
            tmp_path,
            "--output_dir",
            tmp_path / "out",
        ],
        cwd=tmp_path,
    )
    assert (
        done.returncode != 0
        and "Cannot locate class or function path: 'aiva_monai.inference.OutputFolder'" in done.stderr
    )


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_exported_inference_runs_without_aiva_monai(bundle, exported, tmp_path):
    scans = tmp_path / "scans"
    scans.mkdir()
    nib.save(nib.Nifti1Image(head_like((40, 40, 20)), np.diag([2.0, 2.0, 2.0, 1.0])), str(scans / "volume.nii.gz"))
    write_dicom_series(scans / "series")
    done = without_aiva_monai(
        [
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--dataset_dir",
            scans,
            "--output_dir",
            tmp_path / "out",
        ],
        cwd=exported[bundle],
    )
    assert done.returncode == ExitCode.OK, done.stdout[-3000:] + done.stderr[-3000:]
    summary = (tmp_path / "out" / "summary.csv").read_text(encoding="utf-8").splitlines()
    assert len(summary) == 3 and all(",ok," in line for line in summary[1:])
    suffix = "_brainmask" if bundle == "aiva_brain" else "_prostate"
    assert (tmp_path / "out" / f"series{suffix}.seg.dcm").is_file() and (
        tmp_path / "out" / f"volume{suffix}.nii.gz"
    ).is_file()


def test_exported_synthetic_training_demo_runs_without_aiva_monai(exported, tmp_path):
    done = without_aiva_monai(
        [
            "monai.bundle",
            "run",
            "--config_file",
            "configs/train.json",
            "--output_dir",
            tmp_path,
            "--demo_pretrain_steps",
            4,
            "--max_steps",
            4,
            "--epoch_length",
            2,
            "--cluster_every",
            4,
            "--cluster_options#tsne_method",
            "sklearn",
        ],
        cwd=exported["aiva_brain"],
        timeout=1800,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "SYNTHETIC demo finished" in done.stdout
    for produced in ("demo_source/model.pt", "model.pt", "evaluation/evaluation.csv"):
        assert (tmp_path / produced).is_file(), produced


def test_large_files_are_listed_for_download(tmp_path):
    large = ["models/demo_source.pt", "models/model.pt"]  # both 4.3 MB, over the 1 MB limit of this test
    with pytest.raises(
        ValueError, match=re.escape(f"{large} exceed the model zoo's 1 MB limit: pass --large_files_url")
    ):
        export_bundle(BUNDLES / "aiva_brain", tmp_path / "refused", file_limit_mb=1)
    root = export_bundle(
        BUNDLES / "aiva_brain", tmp_path / "listed", file_limit_mb=1, large_files_url="https://example.invalid/aiva"
    )
    text = (root / "large_files.yml").read_text(encoding="utf-8")
    import hashlib

    expected = "large_files:\n"
    for path in large:
        digest = hashlib.sha256((BUNDLES / "aiva_brain" / path).read_bytes()).hexdigest()
        expected += (
            f'  - path: "{path}"\n    url: "https://example.invalid/aiva/{path}"\n'
            f'    hash_val: "{digest}"\n    hash_type: "sha256"\n'
        )
        assert not (root / path).exists()
    assert text == expected
    with pytest.raises(FileExistsError):
        export_bundle(BUNDLES / "aiva_brain", root)


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_inference_config_initialises_with_no_input_and_says_so_when_run(bundle, tmp_path):
    """MONAI Label / Deploy and the zoo instantiate an inference config before any data exists."""
    workflow = ConfigWorkflow(
        config_file=str(BUNDLES / bundle / "configs" / "inference.json"),
        workflow_type="infer",
        logging_file=False,
        output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    assert workflow.check_properties() == [] and len(workflow.parser.get_parsed_content("dataset")) == 0
    with pytest.raises(InferenceExit) as ended:
        workflow.run()
    assert ended.value.code == ExitCode.SETUP_FAILED
    assert ended.value.message == (
        "inference not started: no input given: pass --dataset_dir with a NIfTI file, a folder of NIfTI "
        "files or DICOM series."
    )
