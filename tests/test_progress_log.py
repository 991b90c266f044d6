"""Long work logs its progress by time, not by count: engines (ProgressLogHandler), the AdaBN pass, the
selection scores and the volume cache. A fake clock makes the tests exact (no timing)."""

import logging

import pytest
import torch
from ignite.engine import Engine

import aiva_monai.progress as progress_module
from aiva_monai.batchnorm import adapt_batchnorm
from aiva_monai.checkpoint_selection import target_scores
from aiva_monai.handlers import ProgressLogHandler
from aiva_monai.networks import PreActResUNet


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    return fake


def lines(caplog, name):
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_engine_progress_is_logged_by_time_with_the_epoch_and_the_estimate(clock, caplog):
    def step(engine, batch):
        clock.now += 7.0  # 7 s per iteration: a line every third iteration at every_s = 20

    engine = Engine(step)
    ProgressLogHandler("training", every_s=20.0).attach(engine)
    with caplog.at_level(logging.INFO, logger="aiva_monai.progress"):
        engine.run(range(10), max_epochs=2)
    got = lines(caplog, "aiva_monai.progress")
    assert got[0] == "training epoch 1/2 started: 10 iterations"
    assert got[1] == "training epoch 1/2: 3/10 iterations, 21 s elapsed, about 49 s left"
    assert got[2] == "training epoch 1/2: 6/10 iterations, 42 s elapsed, about 28 s left"
    assert got[3] == "training epoch 1/2: 9/10 iterations, 63 s elapsed, about 7 s left"
    assert got[4] == "training epoch 1/2: 10/10 iterations, 70 s elapsed, done"
    assert got[5] == "training epoch 2/2 started: 10 iterations" and got[-1].startswith("training epoch 2/2: 10/10")
    assert len(got) == 10  # the same four lines in epoch 2: never more than every_s apart, never silent longer


def test_a_single_epoch_engine_is_named_without_epochs_and_units_are_its_own(clock, caplog):
    engine = Engine(lambda e, b: None)
    ProgressLogHandler("evaluating adapted on target test", unit="volumes").attach(engine)
    with caplog.at_level(logging.INFO, logger="aiva_monai.progress"):
        engine.run(range(3))
    assert lines(caplog, "aiva_monai.progress") == [
        "evaluating adapted on target test started: 3 volumes",
        "evaluating adapted on target test: 3/3 volumes, 0 s elapsed, done",
    ]
    with pytest.raises(ValueError, match="every_s"):
        ProgressLogHandler(every_s=0)


def test_the_adabn_pass_logs_its_progress(clock, caplog):
    network = PreActResUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8, 8))
    real_forward = network.forward

    def slow_forward(x):
        clock.now += 6.0
        return real_forward(x)

    network.forward = slow_forward
    batches = [torch.rand(2, 1, 32, 32) for _ in range(5)]
    with caplog.at_level(logging.INFO, logger="aiva_monai.batchnorm"):
        adapt_batchnorm(network, batches)
    assert lines(caplog, "aiva_monai.batchnorm") == [
        "AdaBN pass started: 5 batches",
        "AdaBN pass: 2/5 batches, 12 s elapsed, about 18 s left",
        "AdaBN pass: 4/5 batches, 24 s elapsed, about 6 s left",
        "AdaBN pass: 5/5 batches, 30 s elapsed, done",
    ]


def test_the_selection_scores_report_every_forward_pass():
    network = PreActResUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8, 8))
    calls = []
    perturbations = [lambda x: x * 1.1, lambda x: x + 0.1]
    scores = target_scores(
        network,
        torch.rand(10, 1, 32, 32),
        batch_size=4,
        perturbations=perturbations,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    assert set(scores) == {"target_entropy", "target_im", "target_agreement"}
    assert {c[0] for c in calls} == {"scores"} and {c[2] for c in calls} == {30}
    assert [c[1] for c in calls] == [0, 4, 8, 10, 14, 18, 20, 24, 28, 30]  # 10 slices, then 10 per perturbation


def test_filling_the_volume_cache_logs_its_progress(tmp_path, caplog):
    from aiva_monai.bundle import entries
    from aiva_monai.data import SliceDataset, volume_transforms
    from aiva_monai.data.demo import make_demo_dataset

    datalist = make_demo_dataset(tmp_path, n_subjects=(2, 1, 1))
    data = entries(datalist, "training", "synthetic_a", str(tmp_path))
    with caplog.at_level(logging.INFO, logger="aiva_monai.data.slices"):
        SliceDataset(data, volume_transforms(pixdim=(4.0, 4.0, 4.0), in_plane_size=(32, 32)), progress=False)
    got = lines(caplog, "aiva_monai.data.slices")
    assert got[0] == f"caching started: {len(data)} volumes"
    assert got[-1].startswith(f"caching: {len(data)}/{len(data)} volumes") and got[-1].endswith("done")


def test_a_validator_is_named_without_the_trainers_epoch(clock, caplog):
    """MONAI's Evaluator.run(global_epoch) sets epoch = max_epochs = the trainer's epoch: not 'epoch 3/3'."""
    from monai.engines import SupervisedEvaluator

    network = PreActResUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8, 8))
    data = [{"image": torch.rand(1, 1, 32, 32), "label": torch.zeros(1, 1, 32, 32)} for _ in range(2)]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=network)
    ProgressLogHandler("source validation").attach(evaluator)
    with caplog.at_level(logging.INFO, logger="aiva_monai.progress"):
        evaluator.run(3)
    assert lines(caplog, "aiva_monai.progress")[0] == "source validation started: 2 iterations"


def test_loaders_without_a_length_run_without_a_total(clock, caplog):
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(torch.rand(3, 2, 1, 32, 32))

    loader = torch.utils.data.DataLoader(Stream(), batch_size=None)
    network = PreActResUNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(4, 8, 8, 8))
    adapt_batchnorm(network, loader)  # len(loader) raises TypeError: the pass runs, without progress lines
    engine = Engine(lambda e, b: None)
    ProgressLogHandler("training").attach(engine)
    engine.run(loader)
    assert engine.state.iteration == 3


def test_a_filled_slice_dataset_pickles_for_spawned_workers(tmp_path):
    import pickle

    from aiva_monai.bundle import entries
    from aiva_monai.data import SliceDataset, volume_transforms
    from aiva_monai.data.demo import make_demo_dataset

    datalist = make_demo_dataset(tmp_path, n_subjects=(2, 1, 1))
    data = entries(datalist, "training", "synthetic_a", str(tmp_path))
    dataset = SliceDataset(data, volume_transforms(pixdim=(4.0, 4.0, 4.0), in_plane_size=(32, 32)), progress=False)
    copy = pickle.loads(pickle.dumps(dataset))
    assert len(copy) == len(dataset) and torch.equal(copy[3]["image"], dataset[3]["image"])
