"""CheckpointSelectionHandler on a planted run: every candidate scored, each rule's pick kept, model.pt = the
configured rule's pick, candidates no rule picks deleted, resumable, target labels never read."""

import csv
import json

import pytest
import torch
from ignite.engine import Engine

from aiva_monai.checkpoint_selection import CheckpointSelectionHandler, TargetScoring, target_scores
from aiva_monai.networks import PreActResUNet

# the source validation Dice the fake validator reports at epochs 1..4
SOURCE_DICE = {1: 0.95, 2: 0.97, 3: 0.90, 4: 0.93}


class NoLabels(dict):
    def __getitem__(self, key):
        if key == "label":
            raise AssertionError("a target label was read")
        return super().__getitem__(key)


class TargetSlices(torch.utils.data.Dataset):
    def __init__(self, n=6):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, 16, 16, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return NoLabels(image=self.images[index], label=torch.zeros(1, 16, 16))


def make_validator():
    validator = Engine(lambda engine, batch: None)

    def run(epoch):
        validator.state.epoch = epoch
        validator.state.metrics = {"val_source_dice": SOURCE_DICE[epoch]}

    validator.run = run
    return validator


def make_run(tmp_path, rule, prepare=None, epochs=4):
    torch.manual_seed(0)
    network = PreActResUNet(channels=(4, 8), blocks_per_level=1)

    def step(engine, batch):  # each epoch moves the weights: the candidates differ
        with torch.no_grad():
            network.head[1].conv.weight.add_(1.0)

    trainer = Engine(step)
    handler = CheckpointSelectionHandler(
        network,
        tmp_path,
        rule=rule,
        validator=make_validator(),
        target=TargetScoring(TargetSlices(), max_slices=4),
        prepare=prepare,
    )
    handler.attach(trainer)
    return trainer, handler, network


def weights_of(path):
    return torch.load(path, weights_only=True)["head.1.conv.weight"]


def test_every_candidate_scored_and_each_rule_keeps_its_pick(tmp_path):
    trainer, handler, network = make_run(tmp_path, "source_lowest")
    trainer.run([0], max_epochs=4, epoch_length=1)
    rows = list(csv.DictReader(open(tmp_path / "selection.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["source_dice"]) for r in rows] == [SOURCE_DICE[e] for e in (1, 2, 3, 4)]
    assert all(r["target_entropy"] and r["target_im"] and r["target_agreement"] for r in rows)
    picks = json.loads((tmp_path / "selection.json").read_text())["picks"]
    assert picks["source_best"]["epoch"] == 2 and picks["source_lowest"]["epoch"] == 3 and picks["last"]["epoch"] == 4
    assert "source_best" in rows[1]["picked_by"].split() and "last" in rows[3]["picked_by"].split()
    # model.pt = the configured rule's pick (epoch 3: the head weight was incremented three times)
    start = weights_of(tmp_path / picks["last"]["file"]) - 4
    torch.testing.assert_close(weights_of(tmp_path / "model.pt"), start + 3)
    kept = {p["file"] for p in picks.values()}
    for epoch in (1, 2, 3, 4):
        assert (tmp_path / f"selection/epoch_{epoch:04d}.pt").exists() == (f"selection/epoch_{epoch:04d}.pt" in kept)


def test_target_scores_match_a_direct_computation(tmp_path):
    trainer, handler, network = make_run(tmp_path, "target_entropy")
    trainer.run([0], max_epochs=1, epoch_length=1)
    images = torch.stack([TargetSlices()[i]["image"] for i in torch.linspace(0, 5, 4).round().long().tolist()])
    expected = target_scores(network, images, perturbations=handler.target.perturbations)
    record = handler.records[0]
    for key, value in expected.items():
        assert record[key] == pytest.approx(value)


def test_prepare_applies_to_the_candidate_only(tmp_path):
    def prepare(network):
        with torch.no_grad():
            network.head[1].conv.weight.mul_(0.0)

    trainer, handler, network = make_run(tmp_path, "last", prepare=prepare)
    trainer.run([0], max_epochs=2, epoch_length=1)
    assert torch.count_nonzero(weights_of(tmp_path / "model.pt")) == 0  # saved as prepared
    assert torch.count_nonzero(network.head[1].conv.weight) > 0  # training continues unprepared


def test_resume_continues_the_same_table(tmp_path):
    trainer, handler, network = make_run(tmp_path, "source_best")
    trainer.run([0], max_epochs=2, epoch_length=1)
    state = handler.state_dict()
    resumed_trainer, resumed, _ = make_run(tmp_path, "source_best")
    resumed.load_state_dict(state)
    resumed_trainer.load_state_dict({"epoch": 2, "max_epochs": 4, "epoch_length": 1})
    resumed_trainer.run([0], max_epochs=4, epoch_length=1)
    assert [r["epoch"] for r in resumed.records] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "selection.json").read_text())["picks"]["source_best"]["epoch"] == 2


def test_rules_need_their_inputs(tmp_path):
    network = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    with pytest.raises(ValueError, match="needs a source validator"):
        CheckpointSelectionHandler(network, tmp_path, rule="source_best")
    with pytest.raises(ValueError, match="held-out unlabelled target"):
        CheckpointSelectionHandler(network, tmp_path, rule="target_im", validator=make_validator())
    with pytest.raises(ValueError, match="unknown selection rule"):
        CheckpointSelectionHandler(network, tmp_path, rule="target_dice", validator=make_validator())


def test_evaluation_checkpoints_name_each_distinct_pick_by_its_rules_configured_rule_first(tmp_path):
    import json

    from aiva_monai.bundle import evaluation_checkpoints

    picks = {
        "source_best": "selection/epoch_0004.pt",
        "last": "selection/epoch_0004.pt",
        "target_agreement": "selection/epoch_0004.pt",
        "target_im": "selection/epoch_0001.pt",
    }
    (tmp_path / "selection.json").write_text(
        json.dumps({"rule": "target_agreement", "picks": {r: {"file": f} for r, f in picks.items()}})
    )
    found = evaluation_checkpoints(tmp_path, "src.pt", adabn="adabn.pt")
    assert list(found) == ["source", "adabn", "adapted (target_agreement, source_best, last)", "adapted (target_im)"]
    assert found["adapted (target_im)"] == str(tmp_path / "selection" / "epoch_0001.pt")
    assert evaluation_checkpoints(tmp_path / "none", "src.pt") == {
        "source": "src.pt",
        "adapted": str(tmp_path / "none" / "model.pt"),
    }
