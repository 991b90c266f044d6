"""AdaptSegNet (Tsai et al. 2018): output-space adversarial adaptation, the discriminator and its trainer."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from monai.utils import CommonKeys as Keys
from torch import nn

from aiva_monai.engines.base import AdaptationTrainer, full_precision

__all__ = ["OutputDiscriminator", "AdaptSegNetTrainer"]


class OutputDiscriminator(nn.Module):
    """Fully convolutional discriminator of AdaptSegNet (Tsai et al. 2018, Sec. 4.1).

    Paper: 5 convolutions with 4 x 4 kernels and stride 2, channels {64, 128, 256, 512, 1}, each but the
    last followed by a leaky ReLU of slope 0.2 (padding 1, as in the authors' code). The paper's final
    up-sampling to the input size is left out: with constant domain labels, BCE on the coarse map is the
    same objective up to the interpolation (the authors' code leaves it out too).

    Args:
        in_channels: number of classes (the discriminator sees the (B, classes, *spatial) softmax).
        channels: widths of the hidden convolutions (the last, 1-channel, layer is added); fewer or
            narrower layers for tiny tests. The input's spatial size must be at least
            ``2 ** (len(channels) + 1)``.
        spatial_dims: 2 for slices, 3 for volumes.
        kernel_size, stride, padding: of every convolution.
        negative_slope: of the leaky ReLUs.

    ``forward``: (B, in_channels, *spatial) probabilities -> (B, 1, *spatial / 2 ** (len(channels) + 1))
    logits (source vs target; the trainer's domain labels say which is which).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        spatial_dims: int = 2,
        kernel_size: int = 4,
        stride: int = 2,
        padding: int = 1,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [conv(c_in, c_out, kernel_size, stride, padding), nn.LeakyReLU(negative_slope, inplace=True)]
            c_in = c_out
        layers.append(conv(c_in, 1, kernel_size, stride, padding))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AdaptSegNetTrainer(AdaptationTrainer):
    """AdaptSegNet (Tsai et al. 2018), single-level output-space adversarial adaptation, as a MONAI trainer.

    Per iteration: one labelled source batch (the usual ``train_data_loader``) and one unlabelled target
    batch (``target_data_loader``, cycled; only ``target_image_key`` is read, target labels never).

    1. Segmenter update (``optimizer``), with the discriminator frozen (its parameters do not require
       grad, so the segmenter's loss leaves no gradient on it):
       ``loss = seg_loss(pred_s, y_s) + lambda_adv * BCE(D(softmax(pred_t)), source_domain_label)``,
       i.e. the target prediction is pushed to look like a source one to D.
    2. Discriminator update (``discriminator_optimizer``, then ``discriminator_lr_scheduler`` if given,
       once per iteration) on the detached softmaxes of the same forward passes:
       ``disc_loss = (BCE(D(softmax(pred_s)), source_domain_label) + BCE(D(softmax(pred_t)), target_domain_label)) / 2``
       (the authors' code halves each term). No gradient reaches the segmenter.

    The two updates are equivalent to the authors' code, which accumulates both gradients and steps
    both optimisers at the end of the iteration. Source and target go through the network in separate
    forward passes, so BatchNorm batch statistics are per site (as for AIVA).

    ``engine.state.output``: ``image``, ``label``, ``pred`` (source), ``loss`` (segmenter total),
    ``seg_loss``, ``adv_loss``, ``disc_loss`` (detached). The standard iteration events fire in order:
    FORWARD_COMPLETED, LOSS_COMPLETED, BACKWARD_COMPLETED (segmenter), then the discriminator update, then
    MODEL_COMPLETED. Under AMP the segmenter's forward passes are autocast and the discriminator runs in
    float32 (no second grad scaler needed).

    Checkpointing: put ``trainer.checkpoint_dict()`` (discriminator, its optimiser, its scheduler) next to
    the network and its optimiser in a ``CheckpointSaver`` / ``CheckpointLoader`` ``save_dict``.

    Args:
        target_data_loader: iterable of dicts with the target images.
        network, optimizer: the segmenter and its optimiser (its parameters only).
        discriminator: e.g. ``OutputDiscriminator(out_channels)``; moved to ``device``.
        loss_function: source segmentation loss (pred logits, (B, 1, ...) label) -> scalar; default
            cross-entropy (as ``AIVALoss``).
        discriminator_optimizer: default Adam, lr 1e-4, betas (0.9, 0.99) (the paper's Sec. 4.1).
        discriminator_lr_scheduler: stepped after every discriminator step (the paper decays both
            learning rates polynomially with power 0.9: ``torch.optim.lr_scheduler.PolynomialLR``).
        lambda_adv: weight of the adversarial term; 0.001 is the paper's single-level value.
        source_domain_label, target_domain_label: the discriminator's targets (authors' code: 0 and 1).
        target_image_key: key of the target image in a target batch.
        other args: as ``AdaptationTrainer`` (device, loaders, network, optimizer, loss_function, ...).
    """

    def __init__(
        self,
        *args,
        discriminator: nn.Module,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        discriminator_lr_scheduler=None,
        lambda_adv: float = 0.001,
        source_domain_label: float = 0.0,
        target_domain_label: float = 1.0,
        **kwargs,
    ) -> None:
        if not (math.isfinite(lambda_adv) and lambda_adv >= 0):
            raise ValueError(f"lambda_adv must be a finite value >= 0, got {lambda_adv}.")
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.discriminator_lr_scheduler = discriminator_lr_scheduler
        self.lambda_adv = float(lambda_adv)
        self.source_domain_label = float(source_domain_label)
        self.target_domain_label = float(target_domain_label)
        super().__init__(*args, **kwargs)

    def setup(self, device, network, optimizer) -> None:
        self.discriminator = self.discriminator.to(device)  # keeps the Parameter objects an optimiser may hold
        if self.discriminator_optimizer is None:
            self.discriminator_optimizer = torch.optim.Adam(self.discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))
        _check_disjoint_optimisers(network, optimizer, self.discriminator, self.discriminator_optimizer)

    def checkpoint_dict(self) -> dict:
        """The discriminator's state objects, for a ``CheckpointSaver`` / ``CheckpointLoader`` ``save_dict``."""
        objects = {"discriminator": self.discriminator, "discriminator_optimizer": self.discriminator_optimizer}
        if self.discriminator_lr_scheduler is not None:
            objects["discriminator_lr_scheduler"] = self.discriminator_lr_scheduler
        return objects

    def _domain_bce(self, logits: torch.Tensor, label: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    def discriminator_step(self, source_pred: torch.Tensor, target_pred: torch.Tensor) -> torch.Tensor:
        """One discriminator update on (B, classes, *spatial) source / target logits (detached here);
        returns the detached discriminator loss."""
        self.discriminator.train()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        with full_precision(self):
            source_prob = torch.softmax(source_pred.detach().float(), dim=1)
            target_prob = torch.softmax(target_pred.detach().float(), dim=1)
            loss = 0.5 * (
                self._domain_bce(self.discriminator(source_prob), self.source_domain_label)
                + self._domain_bce(self.discriminator(target_prob), self.target_domain_label)
            )
        loss.backward()
        self.discriminator_optimizer.step()
        if self.discriminator_lr_scheduler is not None:
            self.discriminator_lr_scheduler.step()
        return loss.detach()

    @contextlib.contextmanager
    def update_context(self, passes: dict):
        # freeze D for the segmenter's update: its loss must leave no gradient on D's parameters
        self.discriminator.train()
        self.discriminator.zero_grad(set_to_none=True)  # no stale D gradient during the segmenter's update
        requires_grad = [(p, p.requires_grad) for p in self.discriminator.parameters()]
        for p, _ in requires_grad:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p, flag in requires_grad:
                p.requires_grad_(flag)

    def forward_passes(self, inputs, target_batch, args, kwargs) -> dict:
        target_inputs = self.target_inputs(target_batch)
        pred = self.inferer(inputs, self.network, *args, **kwargs)
        return {Keys.PRED: pred, "target_pred": self.network(target_inputs)}

    def losses(self, passes: dict, targets: torch.Tensor) -> dict:
        seg = self.loss_function(passes[Keys.PRED], targets).mean()
        with full_precision(self):
            target_prob = torch.softmax(passes["target_pred"].float(), dim=1)
            adv = self._domain_bce(self.discriminator(target_prob), self.source_domain_label)
        return {Keys.LOSS: seg + self.lambda_adv * adv, "seg_loss": seg.detach(), "adv_loss": adv.detach()}

    def after_update(self, passes: dict) -> None:
        self.state.output["disc_loss"] = self.discriminator_step(passes[Keys.PRED], passes["target_pred"])


def _check_disjoint_optimisers(network, optimizer, discriminator, discriminator_optimizer) -> None:
    # each network must be updated by its own optimiser only
    def ids(params):
        return {id(p) for p in params}

    segmenter, critic = ids(network.parameters()), ids(discriminator.parameters())
    seg_opt = ids(p for group in optimizer.param_groups for p in group["params"])
    disc_opt = ids(p for group in discriminator_optimizer.param_groups for p in group["params"])
    if segmenter & critic:
        raise ValueError("the segmenter and the discriminator share parameters.")
    if seg_opt & critic:
        raise ValueError("the segmenter's optimizer holds discriminator parameters.")
    if not disc_opt <= critic:
        raise ValueError("the discriminator_optimizer holds parameters that are not the discriminator's.")
