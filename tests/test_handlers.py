import copy
import glob

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.handlers import CheckpointLoader, CheckpointSaver

from tests.helpers import make_trainer, synthetic_site


@pytest.fixture(scope="module")
def sites():
    return synthetic_site(30, seed=0), synthetic_site(30, contrast=1.7, seed=1)


def test_handler_reclusters_every_epoch_and_hands_over(sites):
    trainer, handler = make_trainer(*sites, max_epochs=3, epoch_length=2)
    epochs_seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: epochs_seen.append(e.state.aiva_assignment.epoch))
    trainer.run()
    assert [h["epoch"] for h in handler.history] == [1, 2, 3]
    assert epochs_seen == [1, 1, 2, 2, 3, 3]
    assignment = trainer.state.aiva_assignment
    assert assignment.target_labels.shape == (30,) and assignment.source_means.shape == (3, 16 * 4 * 4)
    np.testing.assert_array_equal(assignment.target_labels.numpy(), handler.clustering.target_labels)
    assert set(handler.history[0]) >= {
        "time_embed",
        "time_pca",
        "time_tsne",
        "time_kmeans",
        "time_match",
        "matched_cost",
        "match_space",
        "pairs_unlike_other_space",
    }
    assert handler.history[0]["match_space"] == "tsne"


def test_handler_interval(sites):
    trainer, handler = make_trainer(*sites, max_epochs=3, epoch_length=1, interval=2)
    trainer.run()
    assert [h["epoch"] for h in handler.history] == [1, 3]


def test_handler_embedding_pass_is_eval_mode_and_restores_training(sites):
    trainer, handler = make_trainer(*sites, max_epochs=1, epoch_length=1)
    modes, decoder_calls = [], []
    trainer.network.bottleneck.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer.network.head.register_forward_pre_hook(lambda module, args: decoder_calls.append(1))
    trainer.network.train()
    handler.run_clustering(trainer)
    # one pass (30 source + 30 target slices in batches of 8: 4 + 4 batches), encoder only, all in eval mode
    assert len(modes) == 8 and not any(modes) and not decoder_calls
    assert trainer.network.training


@pytest.mark.parametrize("match_space", ["tsne", "pca"])
def test_state_dict_round_trip_is_weights_only_loadable(sites, tmp_path, match_space):
    options = {"settings": {"match_space": match_space}}
    trainer, handler = make_trainer(*sites, max_epochs=1, epoch_length=1, handler_options=options)
    trainer.run()
    assert handler.clustering.match_space == match_space
    torch.save(handler.state_dict(), tmp_path / "handler.pt")
    _, fresh = make_trainer(*sites)
    fresh.load_state_dict(torch.load(tmp_path / "handler.pt", weights_only=True))
    for name in ("source_labels", "target_labels", "embedding", "match"):
        np.testing.assert_array_equal(getattr(fresh.clustering, name), getattr(handler.clustering, name))
    torch.testing.assert_close(fresh.clustering.source_means, handler.clustering.source_means)
    assert fresh.clustered_epoch == 1 and fresh.history == handler.history
    assert fresh.clustering.match_space == match_space


def test_resume_mid_epoch_keeps_the_clustering(sites, tmp_path):
    def save_dict(trainer, handler):
        return {
            "trainer": trainer,
            "network": trainer.network,
            "optimizer": trainer.optimizer,
            "loss": trainer.loss_function,
            "clustering": handler,
        }

    # first run: killed in the middle of epoch 2 (iteration 4 of 3 per epoch), after a checkpoint
    trainer, handler = make_trainer(*sites, max_epochs=3, epoch_length=3)
    CheckpointSaver(str(tmp_path), save_dict(trainer, handler), save_interval=4, epoch_level=False).attach(trainer)
    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=4), lambda e: e.terminate())
    trainer.run()
    (checkpoint,) = glob.glob(str(tmp_path / "*.pt"))
    means_epoch_2 = handler.clustering.source_means.clone()
    assert [h["epoch"] for h in handler.history] == [1, 2]

    # restart with the same command: same clusters for the rest of epoch 2, a new clustering at epoch 3
    resumed, resumed_handler = make_trainer(*sites, max_epochs=3, epoch_length=3)
    CheckpointLoader(checkpoint, save_dict(resumed, resumed_handler)).attach(resumed)
    calls = []
    original = resumed_handler.run_clustering
    resumed_handler.run_clustering = lambda engine: calls.append(engine.state.epoch) or original(engine)
    seen = {}
    resumed.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: seen.setdefault(e.state.iteration, e.state.aiva_assignment.source_means.clone()),
    )
    resumed.run()
    assert min(seen) == 5 and calls == [3]
    torch.testing.assert_close(seen[5], means_epoch_2)
    assert resumed.loss_function.lambda_value == trainer.loss_function.lambda_value
    assert [h["epoch"] for h in resumed_handler.history] == [1, 2, 3]


def test_attach_rejects_too_few_slices(sites):
    source, target = sites
    with pytest.raises(ValueError, match="the target dataset has 2 slices, fewer than n_clusters=3"):
        make_trainer(source, target[:2])


def test_handler_takes_one_settings_object(sites):
    from aiva_monai.clustering import ClusteringSettings
    from aiva_monai.handlers import AIVAClusteringHandler

    handler = AIVAClusteringHandler(
        *sites, n_clusters=3, settings={"perplexity": 5.0, "tsne_method": "sklearn", "batch_size": 4, "seed": 9}
    )
    assert isinstance(handler.settings, ClusteringSettings)
    assert (
        handler.settings.perplexity,
        handler.settings.tsne_method,
        handler.settings.seed,
        handler.settings.batch_size,
    ) == (5.0, "sklearn", 9, 4)
    settings = ClusteringSettings(seed=3)
    assert AIVAClusteringHandler(*sites, n_clusters=3, settings=settings).settings is settings
    with pytest.raises(TypeError):  # the former per-setting keywords are gone: one settings object
        AIVAClusteringHandler(*sites, n_clusters=3, tsne_method="sklearn")
    with pytest.raises(ValueError, match="unknown clustering setting"):
        AIVAClusteringHandler(*sites, settings={"tsne": "x"})
    with pytest.raises(ValueError, match="slice_counts"):  # fails at construction, not at the first round
        AIVAClusteringHandler(*sites, settings={"slice_position": 1.0})


def test_round_times_go_to_the_metrics_and_the_stats_file(sites, tmp_path):
    import csv

    stats = tmp_path / "clustering_stats.csv"
    trainer, handler = make_trainer(
        *sites, max_epochs=3, epoch_length=1, interval=2, handler_options={"stats_file": str(stats)}
    )
    seen = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: seen.setdefault(e.state.epoch, dict(e.state.metrics)))
    trainer.run()
    assert set(seen[1]) >= {"aiva_time_embed", "aiva_time_tsne", "aiva_time_means", "aiva_round_seconds"}
    assert not any(key.startswith("aiva_") for key in seen[2])  # no round in epoch 2
    assert seen[3]["aiva_time_embed"] == handler.history[1]["time_embed"]
    rows = list(csv.DictReader(stats.open()))
    assert [int(r["epoch"]) for r in rows] == [1, 3] and float(rows[1]["time_tsne"]) == handler.history[1]["time_tsne"]
    assert [r["embed_dtype"] for r in rows] == ["float32", "float32"]  # the pass's dtype: no AMP, "auto"


def overlap_run(sites, epochs=4, embedding=False):
    settings = {"overlap": True, "overlap_embedding": embedding}
    trainer, handler = make_trainer(*sites, max_epochs=epochs, epoch_length=2, handler_options={"settings": settings})
    used, weights = [], {}
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append(e.state.aiva_assignment.epoch))
    trainer.add_event_handler(
        Events.EPOCH_STARTED, lambda e: weights.setdefault(e.state.epoch, copy.deepcopy(e.network.state_dict()))
    )
    clusterings = {}
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: clusterings.setdefault(e.state.epoch, handler.clustering))
    trainer.run()
    return trainer, handler, used, weights, clusterings


@pytest.mark.parametrize("embedding", [False, True], ids=["embedding_pass_blocks", "embedding_pass_in_background"])
def test_overlap_trains_one_round_behind_and_is_deterministic(sites, embedding):
    from aiva_monai.embedding import embed_and_cluster
    from aiva_monai.networks import BottleneckTap, PreActResUNet

    trainer, handler, used, weights, clusterings = overlap_run(sites, embedding=embedding)
    # epoch 1 clusters synchronously; the round embedded at the start of epoch e is used from epoch e + 1;
    # nothing is launched at the last epoch (no epoch would use it)
    assert used == [1, 1, 1, 1, 2, 2, 3, 3]
    assert [h["epoch"] for h in handler.history] == [1, 2, 3]
    assert not handler.background.running  # shut down at the end of the run
    # the background round equals the synchronous round on the same weights
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    network.load_state_dict(weights[2])
    with BottleneckTap(network) as tap:
        synchronous = embed_and_cluster(
            network, tap, *sites, 3, handler.settings.replace(overlap=False, overlap_embedding=False)
        )
    background = clusterings[3]
    for name in ("source_labels", "target_labels", "embedding", "match"):
        np.testing.assert_array_equal(getattr(background, name), getattr(synchronous, name))
    assert torch.equal(background.source_means, synchronous.source_means)
    # and the whole run is reproducible
    again = overlap_run(sites, embedding=embedding)
    assert again[2] == used
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(again[0].network.state_dict()[key], value), key


def test_overlap_state_dict_waits_for_the_round_in_flight(sites):
    from aiva_monai.handlers import AIVAClusteringHandler

    trainer, handler = make_trainer(
        *sites, max_epochs=3, epoch_length=1, handler_options={"settings": {"overlap": True}}
    )
    states = {}
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: states.setdefault(e.state.epoch, handler.state_dict()))
    trainer.run()
    assert (
        "pending" not in states[1]
        and states[2]["pending"]["clustered_epoch"] == 2
        and states[2]["clustered_epoch"] == 1
    )
    fresh = AIVAClusteringHandler(
        *sites, n_clusters=3, settings={"overlap": True, "tsne_method": "sklearn", "batch_size": 8}
    )
    fresh.load_state_dict(states[2])
    assert fresh.pending_epoch == 2 and fresh.clustered_epoch == 1
    assert handler.clustered_epoch == 2  # promoted at epoch 3, the last (nothing launched there)
    np.testing.assert_array_equal(fresh.pending.target_labels, handler.clustering.target_labels)
    assert torch.equal(fresh.pending.source_means, handler.clustering.source_means)


def test_source_stride_round_survives_the_state_dict(sites, tmp_path):
    class TwoSites(list):  # a SliceDataset-like source of two sites, 15 slices each
        data = [{"site": "A"}, {"site": "B"}]
        slice_counts = np.asarray([15, 15])

    source, target = TwoSites(sites[0]), sites[1]
    trainer, handler = make_trainer(
        source, target, max_epochs=1, epoch_length=1, handler_options={"settings": {"source_stride": 4}}
    )
    trainer.run()
    np.testing.assert_array_equal(handler.clustering.source_rows, np.arange(0, 30, 4))
    assert handler.history[0]["n_source"] == 8 and handler.history[0]["n_target"] == 30
    # each site's share counts the thinned slices: rows 0, 4, 8, 12 are site A, 16, 20, 24, 28 site B
    assert {site: stats["slices"] for site, stats in handler.history[0]["source_sites"].items()} == {"A": 4, "B": 4}
    torch.save(handler.state_dict(), tmp_path / "handler.pt")
    _, fresh = make_trainer(*sites)
    fresh.load_state_dict(torch.load(tmp_path / "handler.pt", weights_only=True))
    np.testing.assert_array_equal(fresh.clustering.source_rows, handler.clustering.source_rows)
    assert trainer.state.aiva_assignment.target_labels.shape == (30,)


def test_attach_counts_the_thinned_source(sites):
    with pytest.raises(ValueError, match=r"8 \(1 in 4\) slices, fewer than n_clusters=9"):
        make_trainer(*sites, n_clusters=9, handler_options={"settings": {"source_stride": 4}})


def test_shutdown_stops_a_background_embedding_pass_within_a_batch(sites, caplog):
    import logging
    import time

    from aiva_monai.clustering import ClusteringSettings
    from aiva_monai.handlers.background_round import BackgroundRound
    from aiva_monai.network_pass import NetworkPass
    from aiva_monai.networks import BottleneckTap, PreActResUNet
    from aiva_monai.progress import RoundProgress

    class Slow(list):  # 0.05 s a slice: 600 slices would take 30 s
        def __getitem__(self, i):
            time.sleep(0.05)
            return list.__getitem__(self, i)

    source, target = sites
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    settings = ClusteringSettings(overlap=True, overlap_embedding=True, batch_size=4, log_every_s=0.0)
    background = BackgroundRound()
    with BottleneckTap(network) as tap, caplog.at_level(logging.INFO, logger="background-test"):
        background.launch(
            2,
            network,
            tap,
            Slow(source * 20),
            target,
            3,
            settings,
            NetworkPass(),
            RoundProgress(logging.getLogger("background-test"), "AIVA epoch 2 (background): ", 0.0),
        )
        assert background.epoch == 2 and background.running
        time.sleep(1.0)  # the pass is under way in its thread
        start = time.perf_counter()
        background.shutdown()
        assert time.perf_counter() - start < 3.0 and not background.running and background.epoch is None
    lines = [r.getMessage() for r in caplog.records]
    assert any(line.startswith("AIVA epoch 2 (background): embedding pass: ") for line in lines)
    assert not any("630/630" in line for line in lines)  # stopped, not finished


def test_overlap_lead_steps_launches_ahead_and_uses_the_round_at_its_due_epoch(sites):
    from aiva_monai.embedding import embed_and_cluster
    from aiva_monai.networks import BottleneckTap, PreActResUNet

    def run():
        settings = {"overlap": True, "overlap_embedding": True, "overlap_lead_steps": 2}
        trainer, handler = make_trainer(*sites, max_epochs=3, epoch_length=4, handler_options={"settings": settings})
        used, weights = [], {}
        trainer.add_event_handler(
            Events.ITERATION_COMPLETED,
            lambda e: weights.setdefault(e.state.iteration, copy.deepcopy(e.network.state_dict())),
        )
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: used.append(e.state.aiva_assignment.epoch))
        trainer.run()
        return trainer, handler, used, weights

    trainer, handler, used, weights = run()
    # round 1 synchronously; the rounds of epochs 2 and 3 launched after steps 2 and 6 and used from their epochs
    assert used == [1] * 4 + [2] * 4 + [3] * 4
    assert [h["epoch"] for h in handler.history] == [1, 2, 3] and not handler.background.running
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    network.load_state_dict(weights[6])  # the weights after step 6: two steps before epoch 3
    with BottleneckTap(network) as tap:
        settings = handler.settings.replace(overlap=False, overlap_embedding=False, overlap_lead_steps=0)
        synchronous = embed_and_cluster(network, tap, *sites, 3, settings)
    for name in ("source_labels", "target_labels", "embedding", "match"):
        np.testing.assert_array_equal(getattr(handler.clustering, name), getattr(synchronous, name))
    assert torch.equal(handler.clustering.source_means, synchronous.source_means)
    again = run()
    assert again[2] == used
    for key, value in trainer.network.state_dict().items():
        assert torch.equal(again[0].network.state_dict()[key], value), key
    # a lead of a whole interval cannot be honoured: refused when the run starts
    bad = {"overlap": True, "overlap_lead_steps": 4}
    trainer, _ = make_trainer(*sites, max_epochs=2, epoch_length=4, handler_options={"settings": bad})
    with pytest.raises(ValueError, match="overlap_lead_steps \\(4\\) must be less than the steps between two rounds"):
        trainer.run()
    assert trainer.state.iteration == 0  # refused before the first step


def test_an_error_during_adaptation_is_raised_not_swallowed(sites):
    # ignite re-raises only when no EXCEPTION_RAISED handler exists; the clustering handler registers one
    trainer, handler = make_trainer(*sites, max_epochs=2, epoch_length=2)

    def fail(engine):
        raise RuntimeError("planted failure at step 3")

    trainer.add_event_handler(Events.ITERATION_COMPLETED(once=3), fail)
    with pytest.raises(RuntimeError, match="planted failure at step 3"):
        trainer.run()
    assert trainer.state.iteration == 3 and not handler.background.running
