"""CheckpointSelectionHandler on a planted run: every candidate scored, each rule's pick kept, model.pt = the
configured rule's pick, candidates no rule picks deleted, resumable, target labels never read."""

import csv
import json

import pytest
import torch
from ignite.engine import Engine

from aiva_monai.batchnorm import AdaptationBatchNorm, batchnorm_layers
from aiva_monai.checkpoint_selection import CheckpointSelectionHandler, TargetScoring, target_scores
from aiva_monai.networks import PreActResUNet
from tests.helpers import RefusesLabels

# the source validation Dice the fake validator reports at epochs 1..4
SOURCE_DICE = {1: 0.95, 2: 0.97, 3: 0.90, 4: 0.93}


class TargetSlices(torch.utils.data.Dataset):
    def __init__(self, n=6):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, 16, 16, generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return RefusesLabels(image=self.images[index], label=torch.zeros(1, 16, 16))


def make_validator():
    validator = Engine(lambda engine, batch: None)

    def run(epoch):
        validator.state.epoch = epoch
        validator.state.metrics = {"val_source_dice": SOURCE_DICE[epoch]}

    validator.run = run
    return validator


def make_run(tmp_path, rule, prepare=None, epochs=4, network=None, site_context=None):
    torch.manual_seed(0)
    network = network or PreActResUNet(channels=(4, 8), blocks_per_level=1)

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
        site_context=site_context,
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


@pytest.mark.parametrize("final_adabn", [False, True])
def test_with_a_site_context_each_candidate_is_also_saved_with_the_source_statistics(tmp_path, final_adabn):
    """Per-site BatchNorm: the candidates carry the target statistics; their companions the same weights with
    the source set, and the configured rule's pick with it becomes model_source_statistics.pt. With a
    ``prepare`` that rewrites the statistics (final AdaBN), the source set and the target set survive."""
    network = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    layers = [m for _, m in batchnorm_layers(network)]
    for m in layers:  # the source statistics
        m.running_mean.fill_(2.0)
        m.running_var.fill_(3.0)
    bn = AdaptationBatchNorm(network, "per_site")
    bn.start()
    for m in layers:  # the target statistics, which the network carries
        m.running_mean.fill_(0.5)
        m.running_var.fill_(0.25)
    candidate_mean = 0.5

    def rewrite(net):
        for _, m in batchnorm_layers(net):
            m.running_mean.fill_(7.0)

    if final_adabn:
        candidate_mean = 7.0
    trainer, handler, _ = make_run(
        tmp_path,
        "source_lowest",
        network=network,
        site_context=bn.site_statistics,
        prepare=rewrite if final_adabn else None,
    )
    trainer.run([0], max_epochs=4, epoch_length=1)

    def statistics(state, name):
        return [value for key, value in state.items() if key.endswith(name)]

    picks = json.loads((tmp_path / "selection.json").read_text())["picks"]
    kept = {p["file"] for p in picks.values()}
    for record in handler.records:
        companion = tmp_path / record["source_statistics_file"]
        assert companion.exists() == (record["file"] in kept)
        if record["file"] in kept:
            candidate, source = (torch.load(f, weights_only=True) for f in (tmp_path / record["file"], companion))
            assert all(torch.all(v == candidate_mean) for v in statistics(candidate, "running_mean"))
            assert len(statistics(source, "running_mean")) == len(layers)
            assert all(torch.all(v == 2.0) for v in statistics(source, "running_mean"))
            assert all(torch.all(v == 3.0) for v in statistics(source, "running_var"))
            for key, value in candidate.items():  # everything else is the candidate's
                if not key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                    torch.testing.assert_close(source[key], value)
    pick = next(r for r in handler.records if r["epoch"] == 3)  # source_lowest
    expected = torch.load(tmp_path / pick["source_statistics_file"], weights_only=True)
    shipped = torch.load(tmp_path / "model_source_statistics.pt", weights_only=True)
    assert shipped.keys() == expected.keys() and all(torch.equal(shipped[k], expected[k]) for k in expected)
    # training goes on with the target set, and the source set is intact
    assert all(torch.all(m.running_mean == 0.5) and torch.all(m.running_var == 0.25) for m in layers)
    assert all(torch.all(s["running_mean"] == 2.0) and torch.all(s["running_var"] == 3.0) for s in bn.source_set)
    assert "source_statistics_file" in next(csv.DictReader(open(tmp_path / "selection.csv")))


def test_a_pick_without_a_source_statistics_copy_leaves_no_stale_one(tmp_path):
    (tmp_path / "model_source_statistics.pt").write_bytes(b"from an earlier run")
    trainer, handler, network = make_run(tmp_path, "last")
    trainer.run([0], max_epochs=1, epoch_length=1)
    assert (tmp_path / "model.pt").exists() and not (tmp_path / "model_source_statistics.pt").exists()


def test_without_a_site_context_no_source_statistics_file(tmp_path):
    trainer, handler, network = make_run(tmp_path, "last")
    trainer.run([0], max_epochs=2, epoch_length=1)
    assert not list(tmp_path.rglob("*source_statistics*"))


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


def test_source_statistics_model_names_the_configured_rules_pick_and_unknown_set_names_are_refused(tmp_path):
    """Which sets such a checkpoint is scored on is checked end to end by the bundle evaluation tests
    (tests/test_bundle_brain.py, tests/test_bundle_prostate.py); here: its name, its file and the refusal of a typo."""
    from aiva_monai.bundle import source_statistics_model
    from aiva_monai.evaluation import run_evaluation

    assert source_statistics_model(tmp_path) == {}  # no model_source_statistics.pt (shared BatchNorm): no entry
    (tmp_path / "model_source_statistics.pt").write_bytes(b"weights")
    file = str(tmp_path / "model_source_statistics.pt")
    assert source_statistics_model(tmp_path) == {
        "adapted with source statistics": {"file": file, "sets": ["source test"]}
    }
    (tmp_path / "selection.json").write_text(json.dumps({"rule": "target_im", "picks": {}}))
    assert list(source_statistics_model(tmp_path, "aiva")) == ["aiva (target_im) with source statistics"]
    # a handler configured with another model_filename: its selection.json names it
    (tmp_path / "selection.json").write_text(json.dumps({"rule": "last", "model": "best.pt", "picks": {}}))
    assert source_statistics_model(tmp_path) == {}
    (tmp_path / "best_source_statistics.pt").write_bytes(b"weights")
    assert source_statistics_model(tmp_path)["adapted (last) with source statistics"]["file"] == str(
        tmp_path / "best_source_statistics.pt"
    )

    checkpoints = {"source": "src.pt", "with source statistics": {"file": file, "sets": ["source tset"]}}
    with pytest.raises(ValueError, match=r"'with source statistics': unknown test sets \['source tset'\]"):
        run_evaluation(torch.nn.Identity(), checkpoints, {"target test": [], "source test": []}, None, tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before any work
