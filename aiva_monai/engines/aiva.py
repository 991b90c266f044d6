"""AIVATrainer: one unlabelled target batch per iteration, aligned to the matched source cluster means."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from ignite.engine import Events
from monai.utils import CommonKeys as Keys

from aiva_monai.batchnorm import AdaptationBatchNorm
from aiva_monai.engines.base import AdaptationTrainer
from aiva_monai.losses import AIVALoss
from aiva_monai.networks import BottleneckTap, encode

__all__ = ["AIVATrainer", "ClusterAssignment"]


@dataclass
class ClusterAssignment:
    """What the clustering handler hands to the trainer for one adaptation epoch.

    Attributes:
        target_labels: (n_t,) int64 CPU tensor, cluster id of every target slice by dataset index.
        source_means: (k, D) float32 tensor on the training device.
        match: (k,) int64 tensor, ``match[i]`` = source cluster matched to target cluster ``i``.
        epoch: the adaptation epoch this assignment was computed for.
    """

    target_labels: torch.Tensor
    source_means: torch.Tensor
    match: torch.Tensor
    epoch: int


class AIVATrainer(AdaptationTrainer):
    """Per iteration: one labelled source batch (the usual ``train_data_loader``) and one unlabelled
    target batch (``target_data_loader``, cycled). Only ``target_image_key`` and ``target_index_key``
    of a target batch are read; target labels, if present, are never touched.

    The loss is ``AIVALoss``: cross-entropy on the source prediction plus lambda times the alignment of
    the target batch's bottleneck features (recorded by a ``BottleneckTap``) to the matched source
    cluster means. Cluster ids and means come from ``engine.state.aiva_assignment``, which an
    ``AIVAClusteringHandler`` sets at the start of every adaptation epoch (``epoch_length`` iterations).

    ``engine.state.output`` holds ``image``, ``label``, ``pred``, ``loss`` (as SupervisedTrainer) plus
    ``seg_loss``, ``align_loss`` and ``lambda``. The standard iteration events fire in order.

    Args:
        target_data_loader: iterable of dicts with the target images and their dataset indices.
        loss_function: an ``AIVALoss``.
        bottleneck: module name of the bottleneck (see ``aiva_monai.networks.find_bottleneck``).
        target_image_key: key of the target image in a target batch.
        target_index_key: key of each target sample's index in the target dataset.
        batchnorm: which BatchNorm running statistics the source and target passes update
            (``aiva_monai.batchnorm.AdaptationBatchNorm``: "shared", "target" or "per_site"); its ``start``
            runs at ``Events.STARTED``, after the train handlers' (e.g. the source weights' loader).
            Default: "shared" (both passes), the first implementation.
        target_pass: "full" runs the whole network on the target batch; "encoder" runs only what the
            bottleneck depends on (``aiva_monai.networks.encode``): about half the target pass's cost, but the
            decoder's BatchNorm layers then never see target data, so use it when their statistics are
            re-estimated afterwards (the selection's AdaBN ``prepare``) or not needed.
        other args: as ``AdaptationTrainer`` (device, loaders, network, optimizer, ``loss_function``: an
            ``AIVALoss``, ...; ``epoch_length`` = iterations per adaptation epoch, i.e. per re-clustering).
    """

    def __init__(
        self,
        *args,
        bottleneck: str | None = None,
        target_index_key: str = "index",
        batchnorm: AdaptationBatchNorm | None = None,
        target_pass: str = "full",
        **kwargs,
    ) -> None:
        if target_pass not in ("full", "encoder"):
            raise ValueError(f"target_pass must be 'full' or 'encoder', got {target_pass!r}.")
        self.bottleneck_name = bottleneck
        self.target_index_key = target_index_key
        self.batchnorm = batchnorm
        self.target_pass = target_pass
        super().__init__(*args, **kwargs)
        if not isinstance(self.loss_function, AIVALoss):
            raise TypeError(
                f"AIVATrainer needs an aiva_monai.losses.AIVALoss, got {type(self.loss_function).__name__}."
            )
        self.state.aiva_assignment = None
        self.add_event_handler(Events.STARTED, self.batchnorm.start)

    def setup(self, device, network, optimizer) -> None:
        # the clustering handler, a train handler, needs the tap when it is attached
        self.bottleneck_tap = BottleneckTap(network, self.bottleneck_name)
        if self.batchnorm is None:
            self.batchnorm = AdaptationBatchNorm(network, "shared")

    def state_dict(self):
        state = super().state_dict()
        state["batchnorm"] = self.batchnorm.state_dict()
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        batchnorm = state_dict.pop("batchnorm", None)
        super().load_state_dict(state_dict)
        if batchnorm is not None:
            self.batchnorm.load_state_dict(batchnorm)

    def check_ready(self) -> None:
        if self.state.aiva_assignment is None:
            raise RuntimeError(
                "no target clustering: attach an aiva_monai.handlers.AIVAClusteringHandler to the trainer."
            )

    def forward_passes(self, inputs, target_batch, args, kwargs) -> dict:
        assignment: ClusterAssignment = self.state.aiva_assignment
        target_inputs = self.target_inputs(target_batch)
        target_index = torch.as_tensor(target_batch[self.target_index_key]).long().cpu()
        with self.batchnorm.source_pass():
            pred = self.inferer(inputs, self.network, *args, **kwargs)
        with self.batchnorm.target_pass():  # only the tapped bottleneck of the target pass is used
            if self.target_pass == "encoder":
                encode(self.network, target_inputs, self.bottleneck_tap.module_name)
            else:
                self.network(target_inputs)
        return {
            Keys.PRED: pred,
            "target_features": self.bottleneck_tap.features,
            "target_clusters": assignment.target_labels[target_index],
        }

    def losses(self, passes: dict, targets: torch.Tensor) -> dict:
        assignment: ClusterAssignment = self.state.aiva_assignment
        parts = self.loss_function(
            passes[Keys.PRED],
            targets,
            passes["target_features"],
            passes["target_clusters"],
            assignment.source_means,
            assignment.match,
            round_id=assignment.epoch,
        )
        return {key: parts[key] for key in (Keys.LOSS, "seg_loss", "align_loss", "lambda")}
