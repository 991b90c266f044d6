"""The embedding pass and one clustering round: one network pass, encoder only, per-site context, progress."""

import contextlib
import logging

import numpy as np
import pytest
import torch

from aiva_monai.clustering import ClusteringSettings
from aiva_monai.embedding import embed_and_cluster
from aiva_monai.network_pass import NetworkPass
from aiva_monai.networks import BottleneckTap, PreActResUNet
from aiva_monai.progress import RoundProgress
from tests.helpers import synthetic_site

TODAY = dict(encoder_only=False, channels_last=False, source_means="second_pass")  # the round before issue 14


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    network.train()
    with torch.no_grad():  # a few train-mode passes: BatchNorm running statistics that are not the defaults
        for _ in range(3):
            network(torch.randn(8, 1, 16, 16))
    return network, synthetic_site(40, seed=0), synthetic_site(30, contrast=1.7, seed=1)


class Slices(list):
    """Samples with the ``slice_counts`` of a ``SliceDataset`` (what ``slice_position`` reads)."""

    def __init__(self, samples, counts):
        super().__init__(samples)
        self.slice_counts = np.asarray(counts)


def run(setup, settings, site_context=None, **kwargs):
    network, source, target = setup
    with BottleneckTap(network) as tap:
        return embed_and_cluster(
            network,
            tap,
            source,
            target,
            3,
            ClusteringSettings(**{"tsne_method": "sklearn", "batch_size": 8, **settings}),
            NetworkPass(site_context=site_context),
            **kwargs,
        )


def test_one_encoder_pass_gives_todays_round_exactly(setup):
    network, _, _ = setup
    calls = {"head": 0, "bottleneck": 0}
    handles = [
        network.head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1)),
        network.bottleneck.register_forward_hook(lambda *a: calls.__setitem__("bottleneck", calls["bottleneck"] + 1)),
    ]
    try:
        today = run(setup, TODAY)
        assert calls == {"head": 5 + 4 + 5, "bottleneck": 5 + 4 + 5}  # full network; source twice (second pass)
        calls.update(head=0, bottleneck=0)
        new = run(setup, dict(channels_last=False, store_dtype="float32", fold_batchnorm=False))
        assert calls == {"head": 0, "bottleneck": 5 + 4}  # encoder only, each slice once
    finally:
        for handle in handles:
            handle.remove()
    for name in ("source_labels", "target_labels", "embedding", "match"):
        np.testing.assert_array_equal(getattr(new, name), getattr(today, name))
    assert torch.equal(new.source_means, today.source_means)  # float32 store: bit-identical means
    assert set(new.timings) == {"embed", "pca", "tsne", "kmeans", "match", "means"}
    assert network.training  # mode restored

    half = run(setup, dict(channels_last=False, fold_batchnorm=False))  # float16 store (default)
    np.testing.assert_array_equal(half.target_labels, today.target_labels)
    torch.testing.assert_close(half.source_means, today.source_means, rtol=2e-3, atol=1e-4)
    on_disk = run(setup, dict(channels_last=False, fold_batchnorm=False, store_memory_mb=0))
    assert torch.equal(on_disk.source_means, half.source_means)  # where the rows live changes nothing
    fast = run(setup, dict(fold_batchnorm=False))  # channels-last too
    np.testing.assert_array_equal(fast.target_labels, today.target_labels)
    # the defaults also fold BatchNorm (tests/test_fold_batchnorm.py): features equal to ~1e-7 relative, which t-SNE on
    # these 70 toy slices amplifies into other clusters (ARI 0.16 here), so no label comparison for them


def test_site_context_wraps_each_sites_pass_in_eval_mode(setup):
    network, _, _ = setup
    entered = []
    conv = network.encoder[0][0].conv

    @contextlib.contextmanager
    def site_context(site):
        entered.append((site, network.training, torch.is_grad_enabled()))
        if site == "target":  # e.g. target BatchNorm statistics: here, a visibly different first layer
            original = conv.weight.detach().clone()
            conv.weight.data.mul_(3.0)
        try:
            yield
        finally:
            if site == "target":
                conv.weight.data.copy_(original)

    before = conv.weight.detach().clone()
    plain = run(setup, dict(store_dtype="float32"))
    swapped = run(setup, dict(store_dtype="float32"), site_context=site_context)
    assert entered == [("source", False, False), ("target", False, False)]
    assert torch.equal(conv.weight, before)
    # the source pass and its means are untouched; the target's features (hence the embedding) changed
    assert not np.array_equal(swapped.embedding[40:], plain.embedding[40:])
    entered.clear()
    run(setup, dict(TODAY), site_context=site_context)  # the second pass over the source is a source pass too
    assert [site for site, _, _ in entered] == ["source", "target", "source"]


def test_progress_lines_name_the_stage_the_counts_and_the_time(setup, caplog):
    with caplog.at_level(logging.INFO, logger="aiva_monai.embedding"):
        report = RoundProgress(logging.getLogger("aiva_monai.embedding"), "AIVA epoch 7: ", every_s=0.0)
        run(setup, dict(tsne_method="opentsne"), report=report)
    lines = [r.getMessage() for r in caplog.records]
    assert all(line.startswith("AIVA epoch 7: ") for line in lines)
    started = "embedding pass started: 70 slices (40 source + 30 target, encoder only, float32)"
    assert any(started in line for line in lines)
    embedded = [line for line in lines if line.startswith("AIVA epoch 7: embedding pass: ")]
    assert "40/70 slices (source)" in embedded[4] and "about" in embedded[0] and "elapsed" in embedded[0]
    assert any("t-SNE: 500/500 iterations" in line for line in lines)
    assert any("source means: 40/40 slices" in line and "done" in line for line in lines)
    for stage in ("PCA started", "t-SNE started", "k-means started", "source means started"):
        assert any(stage in line for line in lines), stage


def test_slice_position_reaches_the_clustering(setup):
    network, source, target = setup

    with_counts = (Slices(source, [10, 10, 20]), Slices(target, [15, 15]))
    with BottleneckTap(network) as tap:
        settings = ClusteringSettings(tsne_method="sklearn", batch_size=8, slice_position=50.0)
        result = embed_and_cluster(network, tap, *with_counts, 2, settings)
        with pytest.raises(ValueError, match="slice_counts"):
            embed_and_cluster(network, tap, source, target, 2, settings)
    # a dominant position column: the two clusters of each site are the two halves of the volumes
    positions = np.r_[np.arange(10) / 9, np.arange(10) / 9, np.arange(20) / 19]
    halves = [set(result.source_labels[positions < 0.4]), set(result.source_labels[positions > 0.6])]
    assert len(halves[0]) == len(halves[1]) == 1 and halves[0] != halves[1]


def test_source_stride_clusters_every_nth_source_slice_exactly(setup):
    network, source, target = setup
    calls = []
    handle = network.bottleneck.register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    try:
        thinned = run(setup, dict(source_stride=3, store_dtype="float32"))
    finally:
        handle.remove()
    rows = np.arange(0, 40, 3)
    np.testing.assert_array_equal(thinned.source_rows, rows)
    assert len(thinned.source_labels) == 14 and len(thinned.target_labels) == 30
    assert sum(calls) == 14 + 30  # one pass over the thinned source and the whole target
    # the same round as on a source that only holds those slices (indices renumbered by position)
    picked = [{**source[row], "index": position} for position, row in enumerate(rows)]
    explicit = run((network, picked, target), dict(store_dtype="float32"))
    assert explicit.source_rows is None
    for name in ("source_labels", "target_labels", "embedding", "match"):
        np.testing.assert_array_equal(getattr(thinned, name), getattr(explicit, name))
    assert torch.equal(thinned.source_means, explicit.source_means)
    # the means by a second pass visit the same slices
    second = run(setup, dict(source_stride=3, channels_last=False, store_dtype="float32", source_means="second_pass"))
    np.testing.assert_array_equal(second.source_labels, thinned.source_labels)
    torch.testing.assert_close(second.source_means, thinned.source_means, rtol=1e-5, atol=1e-6)
    for wrong in (0, 1.5, True):
        with pytest.raises(ValueError, match="source_stride"):
            ClusteringSettings(source_stride=wrong)


def test_source_stride_keeps_each_thinned_slices_position(setup):
    network, source, target = setup

    with BottleneckTap(network) as tap:
        settings = ClusteringSettings(tsne_method="sklearn", batch_size=8, slice_position=50.0, source_stride=3)
        result = embed_and_cluster(network, tap, Slices(source, [10, 10, 20]), Slices(target, [15, 15]), 2, settings)
    positions = np.r_[np.arange(10) / 9, np.arange(10) / 9, np.arange(20) / 19][result.source_rows]
    halves = [set(result.source_labels[positions < 0.4]), set(result.source_labels[positions > 0.6])]
    assert len(halves[0]) == len(halves[1]) == 1 and halves[0] != halves[1]


@pytest.mark.parametrize("encoder_only", [True, False], ids=["encoder_only", "full_network"])
def test_a_pass_over_site_snapshots_equals_the_live_pass_while_the_network_changes(setup, encoder_only):
    """What ``overlap_embedding`` runs in a thread: per-site copies taken now give the live pass's sketches and
    stored features, even after the live network has moved on; neither the network nor its tap is touched."""
    from aiva_monai.embedding import embed_sites
    from aiva_monai.network_pass import site_snapshots

    network, source, target = setup
    conv = network.encoder[0][0].conv

    @contextlib.contextmanager
    def site_context(site):
        if site != "target":
            yield
            return
        original = conv.weight.detach().clone()
        conv.weight.data.mul_(3.0)  # a visibly different target pass
        try:
            yield
        finally:
            conv.weight.data.copy_(original)

    settings = ClusteringSettings(encoder_only=encoder_only, store_dtype="float32", batch_size=8)
    network_pass = NetworkPass(site_context=site_context)
    with BottleneckTap(network) as tap:
        live = embed_sites(network, tap, source, target, settings, network_pass)
        snapshots = site_snapshots(network, network_pass)
        assert snapshots["source"] is not snapshots["target"] and not snapshots["source"].training
        before = {k: v.clone() for k, v in network.state_dict().items()}
        with torch.no_grad():
            conv.weight.add_(1.0)  # training goes on after the snapshot
        network.train()
        tap.features = marker = torch.zeros(1)
        copied = embed_sites(None, tap, source, target, settings, NetworkPass(), site_networks=snapshots)
        assert tap.features is marker and network.training  # the live tap and mode are untouched
        network.load_state_dict(before)  # the module-scoped network as it was
        np.testing.assert_array_equal(copied.source_sketch, live.source_sketch)
        np.testing.assert_array_equal(copied.target_sketch, live.target_sketch)
        np.testing.assert_array_equal(copied.store.read(0, len(source)), live.store.read(0, len(source)))
    live.close(), copied.close()
    # without a site context one copy serves both sites
    shared = site_snapshots(network, NetworkPass())
    assert shared["source"] is shared["target"]
