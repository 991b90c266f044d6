"""configs/multi_gpu_train.json on CPU: torchrun with 2 processes and the gloo backend against one process
on the same data (aiva_prostate bundle, tiny synthetic six-site set).

The comparison is exact by construction, up to float summation order:
- data: rank r takes every 2nd sample of the one seeded stream, so the ranks' batches of 4 are, together,
  the single process's batch of 8 (SeededEndlessSampler rank / world_size);
- normalisation: instance norm in both runs (per-sample, so per-rank forward passes compute what the
  single process computes; BatchNorm statistics would differ per rank, and SyncBatchNorm has no CPU/gloo
  implementation);
- loss: the ranks' cross-entropy means average to the single-process mean, and the alignment loss is
  computed on the union of the ranks' target batches (all-reduced per-cluster sums), so lambda, the
  loss and the DDP-averaged gradients equal the single process's;
- clustering: the ranks embed alternate batches of the single-process batching, the sketches are
  gathered, rank 0 clusters and broadcasts: labels and match are identical, source means all-reduced.

What is compared: the first clustering round (from the same source model: identical labels and match,
source means to float rounding), the loss parts of the 4 steps of that round (2 calibrating lambda, 2 with
the calibrated lambda) and the weights after them. The second round (epoch 3) runs on weights that agree
with the single process's only to float rounding (~1e-7); t-SNE can turn that into another partition (as
it would between two single-process runs with different thread counts), so for that round the test checks
that both ranks hold the identical clustering, not that it equals the single process's.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aiva_monai.data.prostate import make_prostate_demo
from aiva_monai.networks import PreActResUNet

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "bundles" / "aiva_prostate" / "configs"
SETTINGS = {
    "network_def#channels": [8, 16, 32, 64],
    "network_def#blocks_per_level": 1,
    "network_def#norm": "instance",
    "pixdim": [2.0, 2.0, 0.0],
    "in_plane_size": [48, 48],
    "target_site": "F",
    "log_every": 1,
    # 3 epochs of 2 steps, clustering at the start of epochs 1 and 3, lambda calibrated over the first 2 steps
    "max_steps": 6,
    "epoch_length": 2,
    "cluster_every": 4,
    "n_clusters": 3,
    "calibration_iterations": 2,
    "cluster_options#tsne_method": "sklearn",
    "cluster_options#batch_size": 8,
    "val_interval": 100,
    # SGD: the update is linear in the gradient, so float-rounding differences of the all-reduced gradients stay
    # at rounding level (Adam's first steps, ~lr * sign(g), would amplify them on near-zero gradients)
    "optimizer#_target_": "torch.optim.SGD",
    "learning_rate": 0.01,
}
BATCH = 4  # per rank; the single process uses 2 * BATCH


def command(launcher, configs, overrides):
    line = launcher + ["-m", "monai.bundle", "run", "--config_file", json.dumps([str(c) for c in configs])]
    for key, value in overrides.items():
        line += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return line


def probe_overlay(path, base_configs, output):
    imports = []
    for config in base_configs:
        imports += json.loads(Path(config).read_text()).get("imports", [])
    initialize = json.loads(Path(base_configs[-1]).read_text())["initialize"]
    overlay = {
        "imports": list(dict.fromkeys(imports + ["$import tests.distributed_probe as distributed_probe"])),
        "initialize": initialize
        + [
            "$distributed_probe.attach(@train#trainer, "
            "aiva_monai.bundle.handler_of(@train#handlers, 'AIVAClusteringHandler'), "
            f"{str(output)!r})"
        ],
    }
    path.write_text(json.dumps(overlay))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed")
    make_prostate_demo(folder / "demo", cases_per_site=3, shape=(48, 48, 10))
    torch.manual_seed(0)
    network = PreActResUNet(channels=(8, 16, 32, 64), blocks_per_level=1, norm="instance")
    torch.save(network.state_dict(), folder / "source.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    common = {
        "dataset_dir": str(folder / "demo" / "SYNTHETIC_prostate"),
        "source_checkpoint": str(folder / "source.pt"),
        **SETTINGS,
    }

    single_out = folder / "single"
    single_out.mkdir()
    single_configs = [CONFIGS / "train.json"]
    single_configs.append(probe_overlay(folder / "probe_single.json", single_configs, single_out))
    single = subprocess.Popen(
        command(
            [sys.executable],
            single_configs,
            {**common, "work_dir": str(folder / "work_single"), "output_dir": str(single_out), "batch_size": 2 * BATCH},
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )

    ddp_out = folder / "ddp"
    ddp_out.mkdir()
    ddp_configs = [CONFIGS / "train.json", CONFIGS / "multi_gpu_train.json"]
    ddp_configs.append(probe_overlay(folder / "probe_ddp.json", ddp_configs, ddp_out))
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=0",
        "--rdzv_backend=c10d",
        "--rdzv_endpoint=localhost:0",
    ]
    ddp = subprocess.Popen(
        command(
            launcher,
            ddp_configs,
            {**common, "work_dir": str(folder / "work_ddp"), "output_dir": str(ddp_out), "batch_size": BATCH},
        ),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        encoding="utf-8",
        errors="replace",
    )
    single_log, _ = single.communicate(timeout=1200)  # generous: a loaded 2-core CI machine
    ddp_log, _ = ddp.communicate(timeout=1200)
    assert single.returncode == 0, single_log[-4000:]
    assert ddp.returncode == 0, ddp_log[-12000:]
    load = lambda path: torch.load(path, map_location="cpu", weights_only=False)  # noqa: E731
    return load(single_out / "probe_rank0.pt"), [load(ddp_out / f"probe_rank{r}.pt") for r in (0, 1)], ddp_out, ddp_log


def test_every_rank_uses_the_single_process_clustering(runs):
    single, ranks, _, _ = runs
    assert [c["epoch"] for c in single["clusterings"]] == [1, 2, 3]
    for record in ranks:
        assert len(record["clusterings"]) == len(single["clusterings"])
        for mine, reference in zip(record["clusterings"][:2], single["clusterings"][:2]):  # round 1 (epochs 1-2)
            for key in ("source_labels", "target_labels", "match"):
                np.testing.assert_array_equal(mine[key], reference[key], err_msg=key)
            torch.testing.assert_close(mine["source_means"], reference["source_means"], rtol=1e-5, atol=1e-6)
    # identical on the two ranks, bit for bit (broadcast from rank 0, all-reduced means), every round
    for a, b in zip(*(r["clusterings"] for r in ranks)):
        for key in ("source_labels", "target_labels", "match"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert torch.equal(a["source_means"], b["source_means"])


def test_loss_and_weights_match_the_single_process_run(runs):
    single, ranks, _, _ = runs
    assert (
        len(single["iterations"]) == SETTINGS["max_steps"] == len(ranks[0]["iterations"]) == len(ranks[1]["iterations"])
    )
    lambdas = [it["lambda"] for it in single["iterations"]]
    assert lambdas[:2] == [0.0, 0.0] and all(value > 0 for value in lambdas[2:])  # calibrated, then applied
    for step, reference in enumerate(single["iterations"][:4]):  # the steps of the first clustering round
        parts = [record["iterations"][step] for record in ranks]
        # one lambda and one (global) alignment loss on every rank, equal to the single process's
        for key in ("lambda", "align_loss"):
            assert parts[0][key] == parts[1][key], (step, key)
            assert parts[0][key] == pytest.approx(reference[key], rel=1e-5), (step, key)
        # the rank losses average to the single-process loss (equal per-rank batches)
        for key in ("loss", "seg_loss"):
            assert np.mean([p[key] for p in parts]) == pytest.approx(reference[key], rel=1e-5, abs=1e-6), (step, key)
    # after the 4 steps: DDP moved every weight tensor as the single process did, to within 1 % of how far those steps
    # moved it (a fixed tolerance would depend on the CPU's convolution kernels: float-rounding differences between a
    # batch of 8 and two of 4 reached 1.4e-5 relative on an AVX512 CPU; a wrong gradient scale differs by ~100 %)
    torch.manual_seed(0)
    start = PreActResUNet(channels=(8, 16, 32, 64), blocks_per_level=1, norm="instance").state_dict()
    moved = 0
    for key, value in single["weights_by_epoch"][2].items():
        movement = float((value.float() - start[key].float()).abs().max())
        difference = float((ranks[0]["weights_by_epoch"][2][key].float() - value.float()).abs().max())
        assert difference <= 0.01 * movement + 1e-7, (key, difference, movement)
        moved += movement > 1e-4
    assert moved > 0  # the steps did move weights: the comparison above has something to measure
    for key, value in ranks[0]["weights"].items():  # DDP keeps the ranks' replicas identical
        assert torch.equal(ranks[1]["weights"][key], value), key


def test_only_rank_0_writes_files(runs):
    _, _, output, log = runs
    checkpoints = [p.name for p in (output / "checkpoints").glob("*.pt")]
    assert checkpoints == ["checkpoint_epoch=3.pt"], checkpoints
    writers = {p.name.split(".")[-2] for p in output.glob("events.out.tfevents*")}  # ...<host>.<pid>.<n>
    assert len(writers) == 1, writers  # TensorBoard files of one process: rank 0's


def test_sampler_ranks_split_the_single_process_stream():
    from itertools import islice

    from aiva_monai.data import SeededEndlessSampler

    for size in (1, 5, 7):
        stream = list(islice(iter(SeededEndlessSampler(range(size), seed=3)), 200))
        for world_size in (2, 3, 8):
            for rank in range(world_size):
                for position in (0, 1, 6):
                    sampler = SeededEndlessSampler(range(size), seed=3, rank=rank, world_size=world_size)
                    sampler.position = position  # samples this rank has drawn
                    expected = [stream[(position + i) * world_size + rank] for i in range(10)]
                    assert list(islice(iter(sampler), 10)) == expected
    with pytest.raises(ValueError, match="rank"):
        SeededEndlessSampler(range(3), rank=2, world_size=2)


@pytest.mark.parametrize("bundle", ["aiva_brain", "aiva_prostate"])
def test_overlays_follow_their_train_json(bundle):
    """The overlay replaces train.json's imports / initialize / run lists and indexes its handlers: it must
    keep every train.json item (drift check when train.json changes)."""
    configs = ROOT / "bundles" / bundle / "configs"
    train = json.loads((configs / "train.json").read_text())
    overlay = json.loads((configs / "multi_gpu_train.json").read_text())
    assert set(train["imports"]) <= set(overlay["imports"])
    saver = "$@checkpointing#saver.attach(@train#trainer)"
    expected = [item + " if dist.get_rank() == 0 else None" if item == saver else item for item in train["initialize"]]
    assert overlay["initialize"][2:] == expected and "init_process_group(backend=@backend)" in overlay["initialize"][0]
    assert "$@train#trainer.run()" in overlay["run"] and overlay["finalize"] == [
        "$dist.is_initialized() and dist.destroy_process_group()"
    ]
    # every rank keeps the source weights' loader, the clustering and the learning-rate schedule (picked by type,
    # not position); the other handlers (selection with validation, logs) run on rank 0 only, and every handler
    # that writes logs is switched by write_logs, which the overlay sets for rank 0
    kept = ("CheckpointLoader", "AIVAClusteringHandler", "LrScheduleHandler")
    assert str(kept) in overlay["train#trainer#train_handlers"] and overlay["write_logs"] == "$dist.get_rank() == 0"
    targets = [h["_target_"].rsplit(".", 1)[-1] for h in train["train"]["handlers"]]
    assert set(kept) <= set(targets)
    for handlers in (train["train"]["handlers"], train["validate"]["handlers"]):
        for handler in handlers:
            if handler["_target_"] in ("StatsHandler", "TensorBoardStatsHandler"):
                assert handler["_disabled_"] == "$not @write_logs"
