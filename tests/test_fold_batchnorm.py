"""``folding.fold_batchnorm``: an eval-mode copy with BatchNorms folded into the convolutions before them, the
same function to float rounding; and the embedding pass that uses it inside each site's context."""

import contextlib

import numpy as np
import pytest
import torch
from torch import nn

from aiva_monai import network_pass as network_pass_module
from aiva_monai.clustering import ClusteringSettings
from aiva_monai.folding import fold_batchnorm
from aiva_monai.network_pass import NetworkPass, iterate_features
from aiva_monai.networks import PreActResUNet, encode
from tests.test_networks import batch_norm_networks


def with_statistics(network: nn.Module, seed: int = 0) -> nn.Module:
    """``network`` with BatchNorm running statistics and affine parameters far from the defaults."""
    generator = torch.Generator().manual_seed(seed)
    for module in network.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = module.running_mean.shape
            module.running_mean.copy_(torch.randn(shape, generator=generator))
            module.running_var.copy_(torch.rand(shape, generator=generator) * 3 + 0.2)
            module.weight.data.copy_(torch.randn(shape, generator=generator))
            module.bias.data.copy_(torch.randn(shape, generator=generator))
    return network.eval()


def count(network: nn.Module, kind) -> int:
    return sum(isinstance(module, kind) for module in network.modules())


@pytest.mark.parametrize("name", list(batch_norm_networks()))
def test_folded_copy_computes_the_same_bottleneck_and_output(name):
    torch.manual_seed(0)
    network = with_statistics(batch_norm_networks()[name])
    original = {key: value.clone() for key, value in network.state_dict().items()}
    folded = fold_batchnorm(network)
    images = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        for run in (lambda n: encode(n, images), lambda n: n(images)):
            expected, got = run(network), run(folded)
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    state = network.state_dict()
    assert all(torch.equal(state[key], value) for key, value in original.items())  # the original is untouched
    if name != "DynUNet":  # DynUNet's blocks are not nn.Sequential chains: nothing to fold, still correct
        assert count(folded, nn.modules.batchnorm._BatchNorm) < count(network, nn.modules.batchnorm._BatchNorm)


def test_preact_resunet_folds_the_second_norm_of_every_block():
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=2)
    norms = count(network, nn.BatchNorm2d)
    blocks = 3 * 2 + 2 * 2  # encoder + bottleneck, decoder: the norm after each block's first convolution
    assert count(fold_batchnorm(network), nn.BatchNorm2d) == norms - blocks


def test_a_relu_that_could_overwrite_a_shared_input_stays_out_of_place():
    class Residual(nn.Module):  # x + body(x): a ReLU first in body must not change x
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU())

        def forward(self, x):
            return x + self.body(x)

    network = with_statistics(nn.Sequential(Residual(), Residual()))
    folded = fold_batchnorm(network)
    assert [m.inplace for m in folded.modules() if isinstance(m, nn.ReLU)] == [False, True, False, True]
    images = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(images), network(images), atol=1e-5)


def test_containers_that_are_not_plain_chains_are_left_as_they_are():
    from monai.networks.blocks import DenseBlock

    class Gate(nn.Sequential):  # a Sequential subclass whose forward reuses an intermediate tensor
        def forward(self, x):
            y = self[0](x)
            return self[1](y) + y

    dense = DenseBlock([nn.Conv2d(4, 4, 3, padding=1), nn.Sequential(nn.BatchNorm2d(8), nn.ReLU())])
    gated = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), Gate(nn.BatchNorm2d(4), nn.ReLU()))
    for network in (with_statistics(dense), with_statistics(gated)):
        images = torch.randn(2, 4, 8, 8)
        with torch.no_grad():
            torch.testing.assert_close(fold_batchnorm(network)(images), network(images))


def test_no_fold_crosses_the_tapped_modules_boundary():
    network = with_statistics(
        nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1)), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3))
    )
    images = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        expected = encode(network, images, "0")
        torch.testing.assert_close(encode(fold_batchnorm(network, "0"), images, "0"), expected)
        assert not torch.allclose(encode(fold_batchnorm(network), images, "0"), expected)  # it would have


def test_the_pass_folds_inside_the_site_context(monkeypatch):
    torch.manual_seed(0)
    network = with_statistics(PreActResUNet(channels=(4, 8, 16), blocks_per_level=1))
    folded_norm = network.encoder[0][1][0].body[2][0]  # a norm that fold_batchnorm folds
    images = [{"image": torch.randn(1, 16, 16)} for _ in range(6)]

    @contextlib.contextmanager
    def shifted_statistics():  # e.g. the target's own BatchNorm statistics (batchnorm mode "target")
        saved = folded_norm.running_mean.clone()
        folded_norm.running_mean.add_(5.0)
        try:
            yield
        finally:
            folded_norm.running_mean.copy_(saved)

    def features(fold: bool) -> np.ndarray:
        settings = ClusteringSettings(fold_batchnorm=fold, batch_size=4)
        with torch.no_grad(), shifted_statistics():
            return torch.cat([f for f, _ in iterate_features(network, None, images, NetworkPass(), settings)]).numpy()

    seen = []

    def spy(network, module_name=None):
        seen.append(float(folded_norm.running_mean[0]))  # the statistics in force when the copy is made
        return fold_batchnorm(network, module_name)

    monkeypatch.setattr(network_pass_module, "fold_batchnorm", spy)
    plain, folded = features(False), features(True)
    assert seen == pytest.approx([float(folded_norm.running_mean[0]) + 5.0])  # once, inside the shifted context
    np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-4 * np.abs(plain).max())
    with torch.no_grad():
        outside = encode(network, torch.stack([s["image"] for s in images])).numpy()
    assert not np.allclose(outside, plain, atol=1e-3)  # the shifted statistics matter
