import pytest
import torch
from monai.networks.nets import BasicUNet, DynUNet, UNet
from torch import nn

from aiva_monai.networks import BottleneckTap, PreActResUNet, find_bottleneck


def small_networks():
    return {
        "BasicUNet": (BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4)), (16, 4, 4)),
        "UNet": (UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)), (32, 8, 8)),
        "DynUNet": (
            DynUNet(2, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2], upsample_kernel_size=[2, 2, 2], filters=[4, 8, 16, 32]),
            (32, 8, 8),
        ),
        "PreActResUNet": (PreActResUNet(channels=(4, 8, 16, 32), blocks_per_level=1), (32, 8, 8)),
    }


@pytest.mark.parametrize("name", list(small_networks()))
def test_tap_records_bottleneck_and_keeps_network_scriptable(name):
    network, bottleneck_shape = small_networks()[name]
    network.eval()
    x = torch.randn(2, 1, 64, 64)
    plain_output = network(x)
    with BottleneckTap(network) as tap:
        output = network(x)
        assert tap.features.shape == (2, *bottleneck_shape)
        torch.testing.assert_close(output, plain_output)  # tapping changes nothing
    assert tap.features is None
    scripted = torch.jit.script(network)  # the hook is gone: the plain network scripts
    torch.testing.assert_close(scripted(x), plain_output)


def test_tap_features_carry_gradients():
    network = PreActResUNet(channels=(4, 8, 16, 32), blocks_per_level=1)
    tap = BottleneckTap(network)
    network(torch.randn(2, 1, 32, 32))
    tap.features.pow(2).sum().backward()
    encoder_grad = network.encoder[0][0].conv.weight.grad
    assert encoder_grad is not None and torch.count_nonzero(encoder_grad) > 0
    assert network.head[1].conv.weight.grad is None  # the decoder is not on the bottleneck's path


def test_preact_resunet_reference_bottleneck_size():
    network = PreActResUNet()  # 16/32/64/128 channels, 3 down-samplings
    tap = BottleneckTap(network)
    output = network(torch.randn(1, 1, 256, 256))
    assert output.shape == (1, 2, 256, 256)
    assert tap.features.shape == (1, 128, 32, 32)
    assert find_bottleneck(network) == "bottleneck"


def test_unet_bottleneck_is_the_innermost_layer():
    network = UNet(2, 1, 2, channels=(4, 8, 16, 32, 64), strides=(2, 2, 2, 2))
    name = find_bottleneck(network)
    assert name == "model" + ".1.submodule" * 4
    tap = BottleneckTap(network)
    network(torch.randn(1, 1, 64, 64))
    assert tap.features.shape == (1, 64, 4, 4)


def test_tap_looks_through_data_parallel_and_accepts_explicit_names():
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    wrapped = nn.DataParallel(network)
    tap = BottleneckTap(wrapped)
    wrapped(torch.randn(1, 1, 16, 16))
    assert tap.features.shape == (1, 16, 4, 4)
    explicit = BottleneckTap(network, "encoder.1")
    network(torch.randn(1, 1, 16, 16))
    assert explicit.features.shape == (1, 8, 8, 8)


def test_unknown_network_needs_an_explicit_module():
    network = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
    with pytest.raises(ValueError, match="cannot locate the bottleneck of a Sequential"):
        BottleneckTap(network)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        BottleneckTap(network, "nope")
