"""Faults: an adaptation killed with SIGKILL (between clustering epochs, and mid-epoch) and restarted with
the same command resumes from its last checkpoint (clustering state, calibrated lambda, data order,
best-model tracking) and ends exactly where an uninterrupted run with the same seed ends."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.bundle import run

from aiva_monai.data import SeededEndlessSampler
from aiva_monai.data.prostate import make_prostate_demo

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "aiva_prostate" / "configs"
TRAIN = json.loads((CONFIGS / "train.json").read_text())
SETTINGS = {
    "network_def#channels": [8, 16, 32, 64],
    "network_def#blocks_per_level": 1,
    "pixdim": [2.0, 2.0, 0.0],
    "in_plane_size": [48, 48],
    "batch_size": 4,
    "log_every": 1,
    "target_site": "F",
}
# 4 epochs of 2 steps; clustering at the start of epochs 1 and 3; lambda calibrated over the first 3 steps
ADAPT = {
    "max_steps": 8,
    "epoch_length": 2,
    "cluster_every": 4,
    "n_clusters": 3,
    "calibration_iterations": 3,
    "cluster_options#tsne_method": "sklearn",
}


def test_seeded_endless_sampler_resumes_at_any_position():
    sampler = SeededEndlessSampler(range(5), seed=3)
    stream = iter(sampler)
    first = [next(stream) for _ in range(17)]
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5)) and first[:5] != first[5:10]
    for position in (0, 4, 5, 12):
        sampler.position = position
        resumed = iter(sampler)
        assert [next(resumed) for _ in range(17 - position)] == first[position:]


@pytest.fixture(scope="module")
def source_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    make_prostate_demo(folder / "demo", cases_per_site=4, shape=(48, 48, 10))
    release = folder / "demo" / "SYNTHETIC_prostate"
    common = {"dataset_dir": str(release), "work_dir": str(folder), **SETTINGS}
    run(config_file=str(CONFIGS / "pretrain.json"), max_steps=4, epoch_length=2, **common)
    return folder, common


def bundle_command(config_files, overrides):
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", json.dumps([str(c) for c in config_files])]
    for key, value in overrides.items():
        command += [f"--{key}", json.dumps(value) if not isinstance(value, str) else value]
    return command


def adapt(folder, common, output, kill_at=None, extra=None):
    """The adaptation command in a fresh process; ``kill_at`` = an ignite event filter expression after
    which the process SIGKILLs itself (no clean-up, like a lost node)."""
    configs = [CONFIGS / "train.json"]
    if kill_at:
        overlay = {
            "imports": TRAIN["imports"] + ["$import os", "$import signal", "$import ignite"],
            "initialize": TRAIN["initialize"]
            + [f"$@train#trainer.add_event_handler({kill_at}, lambda engine: os.kill(os.getpid(), signal.SIGKILL))"],
        }
        (output.parent / "kill.json").write_text(json.dumps(overlay))
        configs.append(output.parent / "kill.json")
    overrides = {**common, **ADAPT, **(extra or {}), "output_dir": str(output)}
    # a timeout: a process left behind holding the output pipes (an orphaned worker) fails instead of hanging
    done = subprocess.run(
        bundle_command(configs, overrides), capture_output=True, encoding="utf-8", errors="replace", timeout=1200
    )
    return done


def final_state(output):
    (checkpoint,) = (output / "checkpoints").glob("checkpoint*.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    best = torch.load(output / "model.pt", map_location="cpu", weights_only=True)
    return checkpoint.name, state, best


@pytest.fixture(scope="module")
def uninterrupted(source_model):
    folder, common = source_model
    output = folder / "uninterrupted"
    done = adapt(folder, common, output)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_state(output)


@pytest.mark.parametrize(
    "kill_at, resumed_from",
    [
        ("ignite.engine.Events.EPOCH_COMPLETED(once=2)", "checkpoint_epoch=2.pt"),  # between clustering epochs
        (
            "ignite.engine.Events.ITERATION_COMPLETED(once=7)",
            "checkpoint_epoch=3.pt",
        ),  # mid-epoch, after a re-clustering
    ],
)
def test_killed_adaptation_resumes_and_ends_like_an_uninterrupted_run(
    source_model, uninterrupted, tmp_path, kill_at, resumed_from
):
    folder, common = source_model
    (tmp_path / "run").mkdir()
    output = tmp_path / "run" / "adapt"
    killed = adapt(folder, common, output, kill_at=kill_at)
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL: no handler ran after the kill
    assert [p.name for p in (output / "checkpoints").glob("checkpoint*.pt")] == [resumed_from]

    restarted = adapt(folder, common, output)  # the same command again
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert f"Restored all variables from {output / 'checkpoints' / resumed_from}" in restarted.stderr + restarted.stdout

    name, state, best = final_state(output)
    reference_name, reference, reference_best = uninterrupted
    assert name == reference_name == "checkpoint_epoch=4.pt"  # the earlier checkpoint was replaced, not kept
    for key, value in reference["model"].items():
        assert torch.equal(state["model"][key], value), key
    for key, value in reference_best.items():
        assert torch.equal(best[key], value), f"best model.pt differs at {key}"
    assert (
        state["loss"]["_extra_state"]["lambda_value"] == reference["loss"]["_extra_state"]["lambda_value"] is not None
    )
    assert state["trainer"]["target_samples"] == reference["trainer"]["target_samples"] == 8 * 4
    assert state["savers"] == reference["savers"]
    # the label-free selection's table of candidates travels with the checkpoint and resumes identically
    assert [r["epoch"] for r in reference["selection"]["records"]] == [1, 2, 3, 4]
    assert state["selection"]["records"] == reference["selection"]["records"]
    for key in ("source_labels", "target_labels", "match", "source_means"):
        np.testing.assert_array_equal(np.asarray(state["clustering"][key]), np.asarray(reference["clustering"][key]))
    strip = lambda history: [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]  # noqa: E731
    assert strip(state["clustering"]["history"]) == strip(reference["clustering"]["history"])


# overlap: re-clustering every epoch; the round embedded at the start of epoch e is computed in a background
# process and used from epoch e + 1, so a checkpoint must carry the round in flight
OVERLAP = {"cluster_every": 2, "cluster_options#overlap": True}


def run_to_the_end(source_model, name, extra, log_line):
    """An uninterrupted run with ``extra`` whose log shows ``log_line``; its final state."""
    folder, common = source_model
    output = folder / name
    done = adapt(folder, common, output, extra=extra)
    assert done.returncode == 0, done.stderr[-3000:]
    assert log_line in done.stderr + done.stdout
    return final_state(output)


@pytest.fixture(scope="module")
def uninterrupted_overlap(source_model):
    return run_to_the_end(source_model, "uninterrupted_overlap", OVERLAP, "background process, used from epoch 3")


@pytest.mark.parametrize(
    "kill_at, resumed_from",
    [
        (
            "ignite.engine.Events.EPOCH_COMPLETED(once=2)",
            "checkpoint_epoch=2.pt",
        ),  # a round in flight at the checkpoint
        (
            "ignite.engine.Events.ITERATION_COMPLETED(once=5)",
            "checkpoint_epoch=2.pt",
        ),  # killed after launching epoch 3's round
    ],
)
def test_killed_overlapping_adaptation_resumes_exactly(
    source_model, uninterrupted_overlap, tmp_path, kill_at, resumed_from
):
    state, reference = kill_and_resume(source_model, tmp_path, kill_at, resumed_from, OVERLAP, uninterrupted_overlap)
    assert [h["epoch"] for h in reference["clustering"]["history"]] == [1, 2, 3]


def kill_and_resume(source_model, tmp_path, kill_at, resumed_from, extra, uninterrupted_run):
    """Kill a run at ``kill_at``, restart it with the same command, check it ends as ``uninterrupted_run`` (weights,
    clustering, round history); returns (its final state, the reference's)."""
    folder, common = source_model
    (tmp_path / "run").mkdir()
    output = tmp_path / "run" / "adapt"
    killed = adapt(folder, common, output, kill_at=kill_at, extra=extra)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert [p.name for p in (output / "checkpoints").glob("checkpoint*.pt")] == [resumed_from]
    restarted = adapt(folder, common, output, extra=extra)
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    name, state, _ = final_state(output)
    reference_name, reference, _ = uninterrupted_run
    assert name == reference_name == "checkpoint_epoch=4.pt"
    for key, value in reference["model"].items():
        assert torch.equal(state["model"][key], value), key
    for key in ("source_labels", "target_labels", "match", "source_means"):
        np.testing.assert_array_equal(np.asarray(state["clustering"][key]), np.asarray(reference["clustering"][key]))
    strip = lambda history: [{k: v for k, v in h.items() if not k.startswith("time_")} for h in history]  # noqa: E731
    assert strip(state["clustering"]["history"]) == strip(reference["clustering"]["history"])
    return state, reference


# overlap launched ahead, embedding in the background: each round starts one step before its epoch (after steps
# 1, 3 and 5) and is used from that epoch, so a checkpoint at an epoch's end carries the next epoch's round
OVERLAP_AHEAD = {
    **OVERLAP,
    "cluster_options#overlap_embedding": True,
    "cluster_options#overlap_lead_steps": 1,
}


@pytest.fixture(scope="module")
def uninterrupted_overlap_ahead(source_model):
    line = "step 3, the embedding pass (a background thread)"
    return run_to_the_end(source_model, "uninterrupted_overlap_ahead", OVERLAP_AHEAD, line)


def test_killed_adaptation_with_rounds_launched_ahead_resumes_exactly(
    source_model, uninterrupted_overlap_ahead, tmp_path
):
    kill = "ignite.engine.Events.ITERATION_COMPLETED(once=4)"  # a round for epoch 3 in flight since step 3
    _, reference = kill_and_resume(
        source_model, tmp_path, kill, "checkpoint_epoch=1.pt", OVERLAP_AHEAD, uninterrupted_overlap_ahead
    )
    assert [h["epoch"] for h in reference["clustering"]["history"]] == [1, 2, 3, 4]
