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
    assert set(handler.history[0]) >= {"time_embed", "time_pca", "time_tsne", "time_kmeans", "time_match", "matched_cost"}


def test_handler_interval(sites):
    trainer, handler = make_trainer(*sites, max_epochs=3, epoch_length=1, interval=2)
    trainer.run()
    assert [h["epoch"] for h in handler.history] == [1, 3]


def test_handler_embedding_pass_is_eval_mode_and_restores_training(sites):
    trainer, handler = make_trainer(*sites, max_epochs=1, epoch_length=1)
    modes = []
    trainer.network.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    trainer.network.train()
    handler.run_clustering(trainer)
    assert modes and not any(modes)  # 30 + 30 + 30 slices embedded, all in eval mode
    assert trainer.network.training


def test_state_dict_round_trip_is_weights_only_loadable(sites, tmp_path):
    trainer, handler = make_trainer(*sites, max_epochs=1, epoch_length=1)
    trainer.run()
    torch.save(handler.state_dict(), tmp_path / "handler.pt")
    _, fresh = make_trainer(*sites)
    fresh.load_state_dict(torch.load(tmp_path / "handler.pt", weights_only=True))
    for name in ("source_labels", "target_labels", "embedding", "match"):
        np.testing.assert_array_equal(getattr(fresh.clustering, name), getattr(handler.clustering, name))
    torch.testing.assert_close(fresh.clustering.source_means, handler.clustering.source_means)
    assert fresh.clustered_epoch == 1 and fresh.history == handler.history


def test_resume_mid_epoch_keeps_the_clustering(sites, tmp_path):
    def save_dict(trainer, handler):
        return {"trainer": trainer, "network": trainer.network, "optimizer": trainer.optimizer,
                "loss": trainer.loss_function, "clustering": handler}

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
        Events.ITERATION_COMPLETED, lambda e: seen.setdefault(e.state.iteration, e.state.aiva_assignment.source_means.clone())
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
