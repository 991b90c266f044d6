"""Seg-JDOT / DeepJDOT as a trainer: source segmentation loss + the JDOT transport loss between mini-batches."""

from __future__ import annotations

import math

import torch
from monai.utils import CommonKeys as Keys

from aiva_monai.engines.base import AdaptationTrainer, full_precision
from aiva_monai.jdot import onehot_at_prediction, segjdot_loss
from aiva_monai.networks import BottleneckTap

__all__ = ["SegJDOTTrainer"]


class SegJDOTTrainer(AdaptationTrainer):
    """Seg-JDOT / DeepJDOT as a MONAI trainer: source segmentation loss + JDOT transport loss.

    Per iteration: one labelled source batch and one unlabelled target batch (cycled; only
    ``target_image_key`` is read). Source and target go through the network in separate forward passes
    (per-site BatchNorm statistics); a ``BottleneckTap`` records each pass's bottleneck features.
    ``loss = seg_loss(pred_s, y_s) + segjdot_loss(f_s, f_t, onehot(y_s), softmax(pred_t), alpha, beta)``:
    the plan between the two mini-batches is solved exactly (``ot.emd``) on the current cost and held
    constant, and one optimiser step is taken on the loss (DeepJDOT's alternating scheme, one plan per
    mini-batch). The transport term is computed in float32 even under AMP.

    Defaults alpha = 0.001, beta = 0.0001 are DeepJDOT's (Damodaran et al. 2018, Sec. 4, and its
    reference code's ``jdot_alpha=0.001, tloss=0.0001``). They were set for classification features;
    Seg-JDOT's own values for segmentation were not at hand here, and with sums over
    10^5-dimensional bottleneck maps and every pixel of the label, the scale of both terms depends on the
    network and the slice size: check the logged ``jdot_loss`` against ``seg_loss``.

    ``engine.state.output``: ``image``, ``label``, ``pred`` (source), ``loss``, ``seg_loss``, ``jdot_loss``.

    Args:
        target_data_loader: iterable of dicts with the target images.
        loss_function: source segmentation loss; default cross-entropy (as ``AIVALoss``).
        alpha, beta, label_cost: of ``jdot_plan``.
        bottleneck: module name of the bottleneck (see ``aiva_monai.networks.find_bottleneck``).
        target_image_key: key of the target image in a target batch.
        other args: as ``AdaptationTrainer`` (device, loaders, network, optimizer, ...; the inferer must call
            the network once on the whole batch, e.g. ``SimpleInferer``, for the tap to see its features).
    """

    def __init__(
        self,
        *args,
        alpha: float = 0.001,
        beta: float = 0.0001,
        label_cost: str = "sqeuclidean",
        bottleneck: str | None = None,
        **kwargs,
    ) -> None:
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite value >= 0, got {value}.")
        if label_cost not in ("sqeuclidean", "cross_entropy"):
            raise ValueError(f"label_cost must be 'sqeuclidean' or 'cross_entropy', got {label_cost!r}.")
        self.alpha, self.beta, self.label_cost = float(alpha), float(beta), label_cost
        self.bottleneck_name = bottleneck
        super().__init__(*args, **kwargs)

    def setup(self, device, network, optimizer) -> None:
        self.bottleneck_tap = BottleneckTap(network, self.bottleneck_name)

    def forward_passes(self, inputs, target_batch, args, kwargs) -> dict:
        target_inputs = self.target_inputs(target_batch)
        pred = self.inferer(inputs, self.network, *args, **kwargs)
        source_features = self.bottleneck_tap.features
        target_pred = self.network(target_inputs)
        return {
            Keys.PRED: pred,
            "source_features": source_features,
            "target_pred": target_pred,
            "target_features": self.bottleneck_tap.features,
        }

    def losses(self, passes: dict, targets: torch.Tensor) -> dict:
        pred = passes[Keys.PRED]
        seg = self.loss_function(pred, targets).mean()
        with full_precision(self):
            jdot = segjdot_loss(
                passes["source_features"].float(),
                passes["target_features"].float(),
                onehot_at_prediction(targets, pred),
                torch.softmax(passes["target_pred"].float(), dim=1),
                self.alpha,
                self.beta,
                self.label_cost,
            )
        return {Keys.LOSS: seg + jdot, "seg_loss": seg.detach(), "jdot_loss": jdot.detach()}
