"""The adapted model with its *source* BatchNorm set, on both test sets (2026-12-03, this machine's /work paths).

With ``batchnorm: per_site`` the adapted network carries the target statistics; the trainer keeps a source set,
updated by the source passes of training, in its checkpoint (``trainer.batchnorm.source_set``). The write-up's
source-site cost (51-61 surface Dice on the source test volumes against AdaBN's 81) was measured with the target
statistics. This script writes, for each seed, the target_agreement pick (step 400 on every seed, the same
weights as checkpoint_epoch=2.pt) with the source set installed, and evaluates it through the bundle's
evaluate.json (the runner's evaluation command, reduced to that checkpoint, no cluster figure). Kept as the record
of how the numbers were made; not part of the package.
"""

import glob
import json
import os
import subprocess
import sys

import torch

CLONE = "/work/exp_bright"  # the clean clone of 19c9fe0 that made the AIVA runs
OUT = "/work/results/ixb_sourcebn"


def with_source_statistics(checkpoint_file: str, pick_file: str, output_file: str) -> None:
    checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=False)
    weights = torch.load(pick_file, map_location="cpu", weights_only=False)
    for name, tensor in checkpoint["model"].items():  # the pick is the last checkpoint: same weights
        assert torch.equal(tensor, weights[name]), f"{pick_file} is not the weights of {checkpoint_file}: {name}"
    source_set = checkpoint["trainer"]["batchnorm"]["source_set"]
    # the trainer's layer order is named_modules() order, which is the state dict's order of first appearance
    layers = [key.rsplit(".", 1)[0] for key in weights if key.endswith(".running_mean")]
    assert len(layers) == len(source_set), (len(layers), len(source_set))
    for layer, buffers in zip(layers, source_set):
        for buffer, tensor in buffers.items():
            assert weights[f"{layer}.{buffer}"].shape == tensor.shape
            weights[f"{layer}.{buffer}"] = tensor
    torch.save(weights, output_file)


def main() -> int:
    codes = []
    for seed in (0, 1, 2):
        run = glob.glob(f"/work/results/ixb_aiva_seed{seed}/runs/*/")[0]
        picks = json.load(open(run + "selection.json"))["picks"]
        assert picks["target_agreement"]["file"].endswith("epoch_0002.pt"), picks["target_agreement"]
        out = f"{OUT}/seed{seed}"
        os.makedirs(out, exist_ok=True)
        weights = f"{out}/target_agreement_source_bn.pt"
        with_source_statistics(
            run + "checkpoints/checkpoint_epoch=2.pt", run + picks["target_agreement"]["file"], weights
        )
        checkpoints = {"aiva [target_agreement], source BatchNorm set": weights}
        configs = [f"{CLONE}/bundles/aiva_brain/configs/{name}" for name in ("train.json", "evaluate.json")]
        cmd = [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps(configs),
            "--dataset_dir", "/work/shared/data/ixi_hh",
            "--datalist", f"/work/results/ixb_aiva_seed{seed}/datalist_subset.json",
            "--target_site", "ixi_hh_simulated_bright", "--source_site", "ixi_hh",
            "--source_checkpoint", f"{CLONE}/bundles/aiva_brain/models/model.pt",
            "--output_dir", out, "--seed", str(seed),
            "--eval_checkpoints", json.dumps(checkpoints),
            "--cluster_figure", "False", "--tolerances_mm", "[1.0, 2.0]",
        ]  # fmt: skip
        env = dict(os.environ, PYTHONPATH=CLONE, OMP_NUM_THREADS="1")
        with open(f"{out}/eval.log", "w") as log:  # one at a time: the no-alignment control ran beside it
            codes.append(subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=CLONE).returncode)
    print(codes)
    return 1 if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
