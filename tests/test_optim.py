"""Frozen modules: exactly their parameters stop training; gradients still flow through them."""

import pytest
import torch

from aiva_monai.networks import PreActResUNet
from aiva_monai.optim import trainable_parameters


def test_frozen_decoder_keeps_its_weights_and_passes_gradients_through():
    torch.manual_seed(0)
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    trainable = trainable_parameters(network, ["decoder"])
    decoder = {id(p) for p in network.decoder.parameters()}
    assert {id(p) for p in trainable} == {id(p) for p in network.parameters()} - decoder
    before = {
        k: v.clone() for k, v in network.decoder.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    network(torch.rand(2, 1, 16, 16)).square().mean().backward()
    assert all(p.grad is None for p in network.decoder.parameters())
    assert all(
        p.grad is not None and p.grad.abs().sum() > 0 for p in network.encoder.parameters()
    )  # through the decoder
    optimizer.step()
    after = network.decoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nothing_frozen_returns_every_parameter_and_bad_names_fail():
    network = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    assert len(trainable_parameters(network, [])) == len(list(network.parameters()))
    with pytest.raises(ValueError, match="not modules"):
        trainable_parameters(network, ["decodr"])
    with pytest.raises(ValueError, match="leave no parameter"):
        trainable_parameters(network, [""])


def test_freeze_modules_returns_the_network_with_the_named_modules_frozen():
    from aiva_monai.optim import freeze_modules

    network = PreActResUNet(channels=(4, 8), blocks_per_level=1)
    assert freeze_modules(network, ["decoder"]) is network
    frozen = {name for name, p in network.named_parameters() if not p.requires_grad}
    assert frozen and all(name.startswith("decoder.") for name in frozen)
    assert frozen == {f"decoder.{name}" for name, _ in network.decoder.named_parameters()}
    assert freeze_modules(PreActResUNet(channels=(4, 8), blocks_per_level=1), []).decoder is not None
