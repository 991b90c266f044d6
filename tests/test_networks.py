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
            DynUNet(
                2,
                1,
                2,
                kernel_size=[3, 3, 3, 3],
                strides=[1, 2, 2, 2],
                upsample_kernel_size=[2, 2, 2],
                filters=[4, 8, 16, 32],
            ),
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


def batch_norm_networks():
    return {
        "BasicUNet": BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4), norm="batch"),
        "UNet": UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2), norm="batch"),
        "DynUNet": DynUNet(
            2,
            1,
            2,
            kernel_size=[3, 3, 3, 3],
            strides=[1, 2, 2, 2],
            upsample_kernel_size=[2, 2, 2],
            filters=[4, 8, 16, 32],
            norm_name="batch",
        ),
        "PreActResUNet": PreActResUNet(channels=(4, 8, 16, 32), blocks_per_level=1),
    }


@pytest.mark.parametrize("name", list(small_networks()))
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_encode_equals_the_full_forward_bottleneck(name, mode):
    import copy

    from aiva_monai.networks import encode

    torch.manual_seed(0)
    network, bottleneck_shape = batch_norm_networks()[name], small_networks()[name][1]
    network.train(mode == "train")
    twin = copy.deepcopy(network)
    before = {n: b.clone() for n, b in twin.named_buffers()}
    x = torch.randn(3, 1, 64, 64)
    with BottleneckTap(network) as tap:
        network(x)
        full = tap.features
    output_calls = []
    output_conv = [m for m in twin.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))][-1]
    output_conv.register_forward_hook(lambda *args: output_calls.append(1))
    encoded = encode(twin, x)
    assert encoded.shape == (3, *bottleneck_shape)
    assert torch.equal(encoded, full)  # bit-identical: the same operations on the same input
    assert not output_calls  # nothing after the bottleneck ran
    # gradients reach the encoder exactly as through the full forward's tapped features
    full.square().sum().backward()
    encoded.square().sum().backward()
    for (n1, p1), (_, p2) in zip(network.named_parameters(), twin.named_parameters()):
        assert (p1.grad is None) == (p2.grad is None), n1
        if p1.grad is not None:
            assert torch.equal(p1.grad, p2.grad), n1
    # BatchNorm statistics: the encoder's updated exactly as by the full forward (train mode), the
    # decoder's untouched; in eval mode nothing changes
    batch_norms = [(n, m) for n, m in twin.named_modules() if isinstance(m, nn.BatchNorm2d)]
    on_path = [n for n, m in batch_norms if m.weight.grad is not None]
    assert on_path and len(on_path) < len(batch_norms)
    full_buffers = dict(network.named_buffers())
    for module_name, module in batch_norms:
        for buffer_name, buffer in module.named_buffers():
            key = f"{module_name}.{buffer_name}"
            if mode == "train" and module_name in on_path:
                assert torch.equal(buffer, full_buffers[key]), key
            else:
                assert torch.equal(buffer, before[key]), key


@pytest.mark.parametrize("name", list(small_networks()))
def test_encode_channels_last_agrees_to_float_rounding(name):
    from aiva_monai.networks import encode

    network, _ = small_networks()[name]
    network.eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        plain = encode(network, x)
        fast = encode(network, x, channels_last=True)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-5)
    assert network.encoder[0][0].conv.weight.is_contiguous() if name == "PreActResUNet" else True  # weights untouched


def test_encode_other_modules_and_networks_stop_the_forward_there():
    from aiva_monai.networks import encode, encoder_stages

    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1).eval()
    x = torch.randn(2, 1, 16, 16)
    assert encoder_stages(network, "encoder.1") is None  # not a known chain: the forward is stopped instead
    with BottleneckTap(network, "encoder.1") as tap:
        network(x)
        expected = tap.features
    head_calls = []
    network.head.register_forward_hook(lambda *args: head_calls.append(1))
    torch.testing.assert_close(encode(network, x, "encoder.1"), expected, rtol=0, atol=0)
    assert not head_calls

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Conv2d(1, 4, 3, stride=2, padding=1)
            self.bottleneck = nn.Conv2d(4, 8, 3, padding=1)
            self.up = nn.ConvTranspose2d(8, 2, 2, stride=2)

        def forward(self, x):
            return self.up(torch.relu(self.bottleneck(torch.relu(self.down(x)))))

    custom = Custom()
    with BottleneckTap(custom) as tap:
        custom(x)
        expected = tap.features
    torch.testing.assert_close(encode(nn.DataParallel(custom), x), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no module named 'nope'"):
        encode(custom, x, "nope")
