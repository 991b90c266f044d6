"""train.json's adaptation options (issue 11), each a config key: parsed through MONAI's ConfigParser on a tiny
SYNTHETIC datalist and checked on the objects it builds."""

import pytest
import torch
from monai.bundle import ConfigParser

from aiva_monai.bundle import handler_of
from aiva_monai.data.demo import make_demo_dataset
from tests.test_bundle_brain import CONFIGS

KEYS = (
    "selection",
    "batchnorm",
    "adabn_start",
    "final_adabn",
    "target_pass",
    "lambda_reference",
    "target_means",
    "cluster_weighting",
    "frozen_modules",
    "bottleneck",
    "poly_schedule",
    "save_source_statistics",
)


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo"), n_subjects=(2, 1, 1))


def parse(datalist, tmp_path, **overrides):
    parser = ConfigParser()
    parser.read_config(str(CONFIGS / "train.json"))
    parser.update(
        {"datalist": str(datalist), "output_dir": str(tmp_path), "device": "$torch.device('cpu')", **overrides}
    )
    return parser


def test_every_option_is_a_key_with_a_default(datalist, tmp_path):
    parser = parse(datalist, tmp_path)
    for key in KEYS:
        assert key in parser, key
    assert parser.get_parsed_content("target_pass") == (
        "encoder" if parser.get_parsed_content("final_adabn") else "full"
    )


def test_poly_schedule_switches_the_scheduler_handler_and_checkpoints_it(datalist, tmp_path):
    for on in (False, True):
        parser = parse(datalist, tmp_path / str(on), poly_schedule=on, max_steps=40)
        handlers = parser.get_parsed_content("train#handlers")
        scheduler = handler_of(handlers, "LrScheduleHandler")
        saved = parser.get_parsed_content("checkpointing#saver#save_dict")
        if not on:
            assert scheduler is None and "lr_scheduler" not in saved
            continue
        assert isinstance(scheduler.lr_scheduler, torch.optim.lr_scheduler.PolynomialLR)
        assert scheduler.lr_scheduler.total_iters == 40 and not scheduler.epoch_level
        assert saved["lr_scheduler"] is scheduler.lr_scheduler


def test_frozen_modules_leave_the_decoder_out_of_the_optimiser(datalist, tmp_path):
    parser = parse(datalist, tmp_path, frozen_modules=["decoder"])
    network = parser.get_parsed_content("network")
    optimised = {id(p) for group in parser.get_parsed_content("optimizer").param_groups for p in group["params"]}
    decoder = {id(p) for p in network.decoder.parameters()}
    assert optimised and not optimised & decoder and optimised | decoder == {id(p) for p in network.parameters()}
    everything = parse(datalist, tmp_path / "all", frozen_modules=[])
    assert sum(len(g["params"]) for g in everything.get_parsed_content("optimizer").param_groups) == len(
        list(network.parameters())
    )


def test_bottleneck_key_taps_a_normalised_layer(datalist, tmp_path):
    """The authors cluster a BatchNorm output inside the last bottleneck block: `bottleneck` names that module."""
    name = "bottleneck.1.1.body.0.N"
    parser = parse(datalist, tmp_path, bottleneck=name)
    trainer = parser.get_parsed_content("train#trainer")
    assert trainer.bottleneck_tap.module_name == name
    network = parser.get_parsed_content("network").train()
    network(torch.rand(4, 1, 64, 64))
    features = trainer.bottleneck_tap.features  # a train-mode BatchNorm output: per channel mean 0, variance 1
    torch.testing.assert_close(features.mean(dim=(0, 2, 3)), torch.zeros(features.shape[1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(
        features.var(dim=(0, 2, 3), unbiased=False), torch.ones(features.shape[1]), atol=1e-2, rtol=0
    )


def test_switches_remove_handlers_and_their_checkpoint_entries(datalist, tmp_path):
    parser = parse(datalist, tmp_path, use_clustering=False, use_selection=False)
    handlers = parser.get_parsed_content("train#handlers")
    names = [type(h).__name__ for h in handlers]
    assert (
        "AIVAClusteringHandler" not in names
        and "CheckpointSelectionHandler" not in names
        and "ValidationHandler" in names
    )
    saved = parser.get_parsed_content("checkpointing#saver#save_dict")
    assert "clustering" not in saved and "selection" not in saved
    assert "best_model" in saved["savers"].savers  # without selection: the key-metric saver writes model.pt
    default = parse(datalist, tmp_path / "default")
    assert {"clustering", "selection"} <= set(default.get_parsed_content("checkpointing#saver#save_dict"))


def test_the_bundles_match_clusters_in_the_pca_space_and_the_library_keeps_the_papers_map(datalist, tmp_path):
    """0.2.5: the bundles pair clusters by their member means in the PCA space (3-seed ixi-sim evidence,
    docs/experiments.md); the library default stays the paper's 2D-map matching. The prostate bundle shares the
    key (tests/test_bundle_configs_shared.py)."""
    from aiva_monai.clustering import ClusteringSettings

    handlers = parse(datalist, tmp_path).get_parsed_content("train#handlers")
    assert handler_of(handlers, "AIVAClusteringHandler").settings.match_space == "pca"
    overridden = parse(datalist, tmp_path / "tsne", **{"cluster_options#match_space": "tsne"})
    handler = handler_of(overridden.get_parsed_content("train#handlers"), "AIVAClusteringHandler")
    assert handler.settings.match_space == "tsne"
    assert ClusteringSettings().match_space == "tsne"


TRAINER_NAMES = {"train.json": "training", "pretrain.json": "pretraining"}


@pytest.mark.parametrize("config", sorted(TRAINER_NAMES))
def test_trainer_and_source_validator_log_progress_at_the_configured_interval(datalist, tmp_path, config):
    """Issue 14's "no silent stretch over 30 s": both engines of the training configs carry a ProgressLogHandler
    at ``progress_every_s``, an override of that key moves both. The prostate bundle's configs equal these outside
    the listed bundle-specific keys (tests/test_bundle_configs_shared.py)."""
    for every_s in (7.5, 42):  # neither is the default (20)
        parser = ConfigParser()
        parser.read_config(str(CONFIGS / config))
        parser.update(
            {
                "datalist": str(datalist),
                "output_dir": str(tmp_path / str(every_s)),
                "device": "$torch.device('cpu')",
                "progress_every_s": every_s,
            }
        )
        for engine, name in (("train", TRAINER_NAMES[config]), ("validate", "source validation")):
            handler = handler_of(parser.get_parsed_content(f"{engine}#handlers"), "ProgressLogHandler")
            assert handler is not None, f"{config}: {engine} has no ProgressLogHandler"
            assert (handler.name, handler.every_s) == (name, every_s)


def test_a_resumed_run_skips_the_starting_adabn_pass(datalist, tmp_path):
    """The AdaBN pass at the start (``adabn_start``) runs only on a fresh run: a resumed run's checkpoint restores
    the statistics it would compute (and the source set), so on resume it would be minutes of discarded work at
    the bundle's geometry."""
    fresh = parse(datalist, tmp_path / "fresh").get_parsed_content("train#batchnorm")
    assert fresh.start_loader is not None
    resumed = parse(datalist, tmp_path / "resumed", resume_from=str(tmp_path / "checkpoint_epoch=2.pt"))
    assert resumed.get_parsed_content("train#batchnorm").start_loader is None
    off = parse(datalist, tmp_path / "off", adabn_start=False).get_parsed_content("train#batchnorm")
    assert off.start_loader is None
