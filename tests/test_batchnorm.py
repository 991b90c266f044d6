"""BatchNorm modes of adaptation: each pass changes exactly the running statistics it should."""

import copy

import pytest
import torch

from aiva_monai.batchnorm import AdaptationBatchNorm, adapt_batchnorm, batchnorm_layers
from aiva_monai.networks import PreActResUNet


def _network(seed=0):
    torch.manual_seed(seed)
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    network.train()
    return network


def _stats(network):
    return [(m.running_mean.clone(), m.running_var.clone()) for _, m in batchnorm_layers(network)]


def _same(a, b):
    return all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


def _differ_everywhere(a, b):
    return all(not torch.equal(x[0], y[0]) for x, y in zip(a, b))


def _step(network, bn, source, target):
    """One adaptation step's two passes and a backward through both."""
    with bn.source_pass():
        out = network(source)
    with bn.target_pass():
        out_t = network(target)
    (out.square().mean() + out_t.square().mean()).backward()


SOURCE = torch.rand(4, 1, 16, 16)
TARGET = torch.rand(4, 1, 16, 16) ** 2 * 3 + 1  # other statistics


def test_shared_mode_updates_with_both_passes_like_plain_training():
    network, reference = _network(), _network()
    bn = AdaptationBatchNorm(network, "shared")
    bn.start()
    _step(network, bn, SOURCE, TARGET)
    reference(SOURCE)
    reference(TARGET)
    assert _same(_stats(network), _stats(reference))
    assert bn.state_dict()["source_set"] is None


def test_target_mode_source_pass_leaves_running_statistics_alone():
    network = _network()
    bn = AdaptationBatchNorm(network, "target")
    bn.start()
    before = _stats(network)
    with bn.source_pass():
        out = network(SOURCE)
    assert _same(_stats(network), before)
    # ... while it still normalises with the source batch's statistics (train mode)
    plain = copy.deepcopy(network)
    for _, m in batchnorm_layers(plain):
        m.track_running_stats = False
    torch.testing.assert_close(out, plain(SOURCE))
    target_only = _network()
    target_only(TARGET)
    with bn.target_pass():
        network(TARGET)
    assert _same(_stats(network), _stats(target_only))  # one target update from the same start
    # the starting (source) statistics are kept for the source embedding pass
    assert _same([(s["running_mean"], s["running_var"]) for s in bn.source_set], before)
    assert all(m.track_running_stats for _, m in batchnorm_layers(network))


def test_per_site_mode_keeps_two_sets_and_backpropagates():
    network = _network()
    source_reference, target_reference = _network(), _network()
    bn = AdaptationBatchNorm(network, "per_site")
    bn.start()
    for _ in range(2):
        _step(network, bn, SOURCE, TARGET)
        source_reference(SOURCE)
        target_reference(TARGET)
    assert _same(_stats(network), _stats(target_reference))  # the network holds the target set
    assert _same([(s["running_mean"], s["running_var"]) for s in bn.source_set], _stats(source_reference))
    assert all(p.grad is not None for p in network.parameters())


@pytest.mark.parametrize("mode", ["target", "per_site"])
def test_site_statistics_normalise_source_slices_with_the_source_set(mode):
    network = _network()
    bn = AdaptationBatchNorm(network, mode)
    bn.start()
    source_copy = copy.deepcopy(network).eval()
    for _ in range(3):
        _step(network, bn, SOURCE, TARGET)
    network.eval()
    if mode == "per_site":  # the source set moved with the source passes: rebuild it by hand
        for (_, m), saved in zip(batchnorm_layers(source_copy), bn.source_set):
            m.running_mean.copy_(saved["running_mean"])
            m.running_var.copy_(saved["running_var"])
    source_copy.load_state_dict(
        {k: v for k, v in network.state_dict().items() if "running" not in k and "num_batches" not in k}, strict=False
    )
    target_before = _stats(network)
    with torch.no_grad(), bn.site_statistics("source"):
        source_out = network(SOURCE)
    with torch.no_grad():
        torch.testing.assert_close(source_out, source_copy(SOURCE))
    assert _same(_stats(network), target_before)  # restored afterwards


def test_start_with_a_loader_is_adabn_and_keeps_the_source_statistics():
    network, reference = _network(), _network()
    loader = [{"image": TARGET[:2]}, {"image": TARGET[2:]}]
    before = _stats(network)
    bn = AdaptationBatchNorm(network, "target", start_loader=loader)
    bn.start()
    adapt_batchnorm(reference, loader)
    assert _same(_stats(network), _stats(reference)) and _differ_everywhere(_stats(network), before)
    assert _same([(s["running_mean"], s["running_var"]) for s in bn.source_set], before)


def test_state_dict_round_trip_and_mode_check():
    network = _network()
    bn = AdaptationBatchNorm(network, "per_site")
    bn.start()
    _step(network, bn, SOURCE, TARGET)
    state = bn.state_dict()
    restored = AdaptationBatchNorm(_network(), "per_site")
    restored.load_state_dict(state)
    assert _same(
        [(s["running_mean"], s["running_var"]) for s in restored.source_set],
        [(s["running_mean"], s["running_var"]) for s in bn.source_set],
    )
    with pytest.raises(ValueError, match="batchnorm mode"):
        AdaptationBatchNorm(_network(), "target").load_state_dict(state)
    with pytest.raises(ValueError, match="batchnorm mode must be"):
        AdaptationBatchNorm(network, "mixed")


@pytest.mark.parametrize("mode", ["shared", "target", "per_site"])
def test_a_network_without_batchnorm_passes_through_every_context(mode):
    """Instance norm (the multi-process test's network): no running statistics, so start, the source pass and
    the per-site embedding passes change nothing and never ask for a source set."""
    torch.manual_seed(0)
    network = PreActResUNet(channels=(4, 8), blocks_per_level=1, norm="instance")
    before = copy.deepcopy(network.state_dict())
    adaptation = AdaptationBatchNorm(network, mode)
    adaptation.start()
    images = torch.rand(2, 1, 16, 16)
    with adaptation.source_pass():
        network(images)
    with adaptation.site_statistics("source"):
        network.eval()(images)
    with adaptation.site_statistics("target"):
        network(images)
    after = network.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
