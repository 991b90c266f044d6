"""AIVATrainer options of issue 11: encoder-only target pass, BatchNorm modes inside a real training run."""

import copy

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader

from aiva_monai.batchnorm import AdaptationBatchNorm, batchnorm_layers
from aiva_monai.engines import AIVATrainer
from aiva_monai.handlers import AIVAClusteringHandler
from aiva_monai.losses import AIVALoss
from aiva_monai.networks import PreActResUNet
from tests.helpers import synthetic_site


@pytest.fixture(scope="module")
def sites():
    return synthetic_site(24, seed=0), synthetic_site(24, contrast=1.7, seed=1)


def run(sites, *, target_pass="full", mode="shared", steps=3):
    source, target = sites
    torch.manual_seed(0)
    network = PreActResUNet(channels=(4, 8, 16), blocks_per_level=1)
    batchnorm = AdaptationBatchNorm(network, mode)
    trainer = AIVATrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=steps,
        train_data_loader=DataLoader(source, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0)),
        target_data_loader=DataLoader(target, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)),
        network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.05),
        loss_function=AIVALoss(fixed_lambda=1e-3),
        decollate=False,
        batchnorm=batchnorm,
        target_pass=target_pass,
    )
    AIVAClusteringHandler(
        source,
        target,
        n_clusters=3,
        settings={"tsne_method": "sklearn", "seed": 0},
        progress=False,
        network_pass={"site_context": batchnorm.site_statistics},
    ).attach(trainer)
    losses = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(float(e.state.output["align_loss"])))
    start = copy.deepcopy(network.state_dict())
    trainer.run()
    return network, start, losses


def _stats(network, prefix):
    return {n: m.running_mean.clone() for n, m in batchnorm_layers(network) if n.startswith(prefix)}


def test_encoder_only_target_pass_trains_exactly_like_the_full_pass(sites):
    full, start, full_losses = run(sites, target_pass="full")
    encoder, _, encoder_losses = run(sites, target_pass="encoder")
    assert full_losses == pytest.approx(encoder_losses, rel=1e-6) and max(full_losses) > 0
    parameters = dict(encoder.named_parameters())
    for name, value in full.named_parameters():
        torch.testing.assert_close(parameters[name], value, msg=name)
    # the decoder's BatchNorm statistics saw only the source passes in encoder mode
    assert any(
        not torch.equal(a, b) for a, b in zip(_stats(full, "decoder").values(), _stats(encoder, "decoder").values())
    )
    torch.testing.assert_close(_stats(full, "encoder"), _stats(encoder, "encoder"))


@pytest.mark.parametrize("mode", ["target", "per_site"])
def test_site_modes_train_through_the_trainer(sites, mode):
    """A run in each mode completes (per_site swaps buffers between the passes and the backward), and the running
    statistics it ends with are not the shared mode's (the source passes did not move them)."""
    network, _, losses = run(sites, mode=mode, steps=2)
    shared, _, _ = run(sites, mode="shared", steps=2)
    assert len(losses) == 2
    assert any(not torch.equal(a, b) for a, b in zip(_stats(network, "").values(), _stats(shared, "").values()))


def test_rejects_unknown_target_pass(sites):
    with pytest.raises(ValueError, match="target_pass"):
        run(sites, target_pass="decoder")
