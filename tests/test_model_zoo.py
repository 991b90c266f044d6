"""Model-zoo conformance of both bundles, offline: required files, metadata against the shipped schema with
its version in the changelog, `verify_net_in_out`, model cards in the model-zoo layout, and TorchScript
(`ckpt_export`) and ONNX (`onnx_export`) copies whose outputs agree with the eager network on a slice."""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from monai.bundle import ConfigParser, ckpt_export, onnx_export, verify_net_in_out

from aiva_monai.bundle import verify_metadata
from aiva_monai.data.demo import phantom_head
from aiva_monai.data.prostate import phantom_pelvis

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"
REQUIRED = [
    "configs/metadata.json",
    "configs/pretrain.json",
    "configs/train.json",
    "configs/evaluate.json",
    "configs/inference.json",
    "configs/logging.conf",
    "docs/README.md",
    "LICENSE",
]
# the model-zoo README layout, in this order
CARD_HEADINGS = [
    "# Model Overview",
    "## Data",
    "## Training configuration",
    "## Input and output formats",
    "## Performance",
    "## MONAI Bundle Commands",
    "# Disclaimer",
    "# References",
    "# License",
]


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_required_files_metadata_and_model_card(bundle):
    root = BUNDLES / bundle
    for name in REQUIRED:
        assert (root / name).is_file(), f"{bundle}: {name} missing"
    assert (root / "models").is_dir()
    verify_metadata(root / "configs" / "metadata.json")  # schema + version listed in the changelog
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert meta["name"] == bundle and meta["version"] in meta["changelog"]
    card = (root / "docs" / "README.md").read_text().splitlines()
    positions = [card.index(heading) for heading in CARD_HEADINGS]
    assert positions == sorted(positions), f"{bundle}: model card sections out of order"


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_verify_net_in_out(bundle):
    configs = BUNDLES / bundle / "configs"
    # builds network_def from the inference config and runs it on the metadata's input shape
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
        device="cpu",
        n=1,
    )


def preprocessed_slice(image: np.ndarray, affine: np.ndarray, parser: ConfigParser) -> torch.Tensor:
    """One (1, C, H, W) slice through the middle of a volume, preprocessed by inference.json's own chain."""
    from monai.data import MetaTensor

    volume_chain = parser.get_parsed_content("preprocessing#transforms#1")  # what follows reading the scan
    volume = MetaTensor(torch.as_tensor(image, dtype=torch.float32)[None], affine=torch.as_tensor(affine))
    prepared = volume_chain({"image": volume})["image"]
    axis = parser["slice_axis"]
    middle = prepared.shape[axis + 1] // 2
    return prepared.select(axis + 1, middle)[None].as_tensor()


def exported_outputs_agree(bundle, checkpoint, slice_, tmp_path):
    configs = BUNDLES / bundle / "configs"
    common = dict(
        net_id="network_def",
        ckpt_file=str(checkpoint),
        meta_file=str(configs / "metadata.json"),
        config_file=str(configs / "inference.json"),
    )
    ckpt_export(filepath=str(tmp_path / "model.ts"), **common)
    onnx_export(filepath=str(tmp_path / "model.onnx"), input_shape=list(slice_.shape), **common)

    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    network = parser.get_parsed_content("network_def").eval()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    network.load_state_dict(state.get("model", state))
    with torch.no_grad():
        eager = network(slice_)
        scripted = torch.jit.load(str(tmp_path / "model.ts"))(slice_)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = session.run(None, {session.get_inputs()[0].name: slice_.numpy()})[0]
    assert eager.shape == scripted.shape == onnx_out.shape == (1, 2, *slice_.shape[2:])
    assert torch.allclose(scripted, eager, atol=1e-5), float((scripted - eager).abs().max())
    assert np.allclose(onnx_out, eager.numpy(), atol=1e-4), float(np.abs(onnx_out - eager.numpy()).max())
    assert torch.equal(scripted.argmax(1), eager.argmax(1))
    return eager


def test_brain_export_agrees_on_a_real_ixi_slice(ixi_root, tmp_path):
    import nibabel as nib

    configs = BUNDLES / "aiva_brain" / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    scan = sorted((ixi_root / "images").glob("*.nii*"))[0]
    loaded = nib.load(str(scan))
    slice_ = preprocessed_slice(loaded.get_fdata(), loaded.affine, parser)
    eager = exported_outputs_agree("aiva_brain", BUNDLES / "aiva_brain" / "models" / "model.pt", slice_, tmp_path)
    assert eager.argmax(1).float().mean() > 0.05  # the shipped model finds brain on a real mid-sagittal slice


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_export_agrees_on_a_synthetic_slice(bundle, tmp_path):
    configs = BUNDLES / bundle / "configs"
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.json"))
    if bundle == "aiva_brain":
        checkpoint = BUNDLES / bundle / "models" / "model.pt"
        image, _ = phantom_head(shape=(60, 80, 80), spacing=3.0, seed=1)
        affine = np.diag([3.0, 3.0, 3.0, 1.0])
    else:  # no trained prostate weights ship: export a seeded, randomly initialised network
        torch.manual_seed(0)
        checkpoint = tmp_path / "random.pt"
        torch.save(parser.get_parsed_content("network_def").state_dict(), checkpoint)
        image, _ = phantom_pelvis(shape=(100, 80, 14), spacing=(2.0, 2.0, 4.0), seed=1)
        affine = np.diag([2.0, 2.0, 4.0, 1.0])
    exported_outputs_agree(bundle, checkpoint, preprocessed_slice(image, affine, parser), tmp_path)
