"""AIVATrainer: a MONAI SupervisedTrainer that adds one unlabelled target batch per iteration."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys as Keys

from aiva_monai.batchnorm import AdaptationBatchNorm
from aiva_monai.data.samplers import SeededEndlessSampler
from aiva_monai.losses import AIVALoss
from aiva_monai.networks import BottleneckTap, encode

__all__ = ["AIVATrainer", "ClusterAssignment", "TargetBatchMixin"]


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


class TargetBatchMixin:
    """One unlabelled target batch per iteration, for trainers whose ``train_data_loader`` is the source.

    The subclass sets ``target_data_loader``, ``target_image_key`` and ``_target_iterator = None`` in its
    ``__init__``. ``next_target_batch`` cycles over the target loader independently of the source epochs
    (a new pass, reshuffled by the loader, each time it runs out); ``target_inputs`` reads the image and
    nothing else, so a trainer that only uses it never touches a target label.
    """

    target_data_loader: Iterable
    target_image_key: str = Keys.IMAGE
    _target_iterator = None

    def next_target_batch(self) -> dict:
        """Next target batch, restarting (and reshuffling) the target loader when it runs out.

        With a ``SeededEndlessSampler`` the target order is resumable: the number of target samples
        drawn is part of ``state_dict()``, and a resumed run continues the stream where it was.
        """
        if self._target_iterator is not None:
            try:
                return self._count_target(next(self._target_iterator))
            except StopIteration:
                pass
        sampler = getattr(self.target_data_loader, "sampler", None)
        if isinstance(sampler, SeededEndlessSampler):
            sampler.position = int(getattr(self.state, "target_samples", 0))
        self._target_iterator = iter(self.target_data_loader)
        try:
            return self._count_target(next(self._target_iterator))
        except StopIteration:
            raise ValueError("the target data loader yields no batch: the target dataset is empty.") from None

    def _count_target(self, batch: dict) -> dict:
        self.state.target_samples = int(getattr(self.state, "target_samples", 0)) + len(batch[self.target_image_key])
        return batch

    def _setup_engine(self) -> None:
        # ignite re-creates the source iterator when a run starts or resumes: position a resumable sampler
        # at the samples already consumed, so the resumed run sees the uninterrupted run's batches.
        # Under torch.distributed the positions (this one and ``target_samples``) count the samples of
        # *this rank*, which is what a ``SeededEndlessSampler(rank=..., world_size=...)`` position means;
        # an exact resume therefore needs the same number of processes.
        loader = self.state.dataloader
        sampler, batch_size = getattr(loader, "sampler", None), getattr(loader, "batch_size", None)
        if isinstance(sampler, SeededEndlessSampler) and batch_size:
            sampler.position = int(self.state.iteration) * int(batch_size)
        super()._setup_engine()

    def state_dict(self):
        state = super().state_dict()
        state["target_samples"] = int(getattr(self.state, "target_samples", 0))
        return state

    def load_state_dict(self, state_dict) -> None:
        state_dict = dict(state_dict)
        target_samples = int(state_dict.pop("target_samples", 0))
        super().load_state_dict(state_dict)
        self.state.target_samples = target_samples
        self._target_iterator = None

    def backward_and_step(self, forward_and_loss) -> None:
        """Runs ``forward_and_loss`` (which fills ``state.output`` with the loss and fires FORWARD_COMPLETED
        and LOSS_COMPLETED), then backward and one optimiser step, under AMP with the grad scaler when the
        trainer uses it; fires BACKWARD_COMPLETED."""
        if self.amp and self.scaler is not None:
            with torch.autocast("cuda", **self.amp_kwargs):
                forward_and_loss()
            self.scaler.scale(self.state.output[Keys.LOSS]).backward()
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            forward_and_loss()
            self.state.output[Keys.LOSS].backward()
            self.fire_event(IterationEvents.BACKWARD_COMPLETED)
            self.optimizer.step()

    def step_with(self, forward_and_loss) -> dict:
        """``backward_and_step``, then drops the bottleneck tap's graph reference and fires MODEL_COMPLETED.
        Returns ``state.output``."""
        self.backward_and_step(forward_and_loss)
        tap = getattr(self, "bottleneck_tap", None)
        if tap is not None:
            tap.features = None  # drop the graph reference until the next pass
        self.fire_event(IterationEvents.MODEL_COMPLETED)
        return self.state.output

    def target_inputs(self, target_batch) -> torch.Tensor:
        """The (B, C, *spatial) image of a target batch on the training device (the only key read)."""
        return torch.as_tensor(target_batch[self.target_image_key]).to(
            self.state.device, non_blocking=self.non_blocking
        )


class AIVATrainer(TargetBatchMixin, SupervisedTrainer):
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
        other args: as ``monai.engines.SupervisedTrainer`` (``epoch_length`` = iterations per
            adaptation epoch, i.e. per re-clustering).
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        target_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: AIVALoss,
        bottleneck: str | None = None,
        target_image_key: str = Keys.IMAGE,
        target_index_key: str = "index",
        batchnorm: AdaptationBatchNorm | None = None,
        target_pass: str = "full",
        **kwargs,
    ) -> None:
        if target_pass not in ("full", "encoder"):
            raise ValueError(f"target_pass must be 'full' or 'encoder', got {target_pass!r}.")
        if not isinstance(loss_function, AIVALoss):
            raise TypeError(f"AIVATrainer needs an aiva_monai.losses.AIVALoss, got {type(loss_function).__name__}.")
        if kwargs.get("accumulation_steps", 1) != 1 or kwargs.get("compile", False):
            raise ValueError("AIVATrainer supports neither gradient accumulation nor torch.compile.")
        # set before the base class attaches the train handlers: the clustering handler needs the tap
        self.bottleneck_tap = BottleneckTap(network, bottleneck)
        self.target_data_loader = target_data_loader
        self.target_image_key = target_image_key
        self.target_index_key = target_index_key
        self._target_iterator = None
        self.batchnorm = batchnorm if batchnorm is not None else AdaptationBatchNorm(network, "shared")
        self.target_pass = target_pass
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=loss_function,
            **kwargs,
        )
        self.state.aiva_assignment = None
        self.add_event_handler(Events.STARTED, self.batchnorm.start)

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

    def _iteration(self, engine: AIVATrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        assignment: ClusterAssignment | None = engine.state.aiva_assignment
        if assignment is None:
            raise RuntimeError(
                "no target clustering: attach an aiva_monai.handlers.AIVAClusteringHandler to the trainer."
            )
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})

        target_batch = engine.next_target_batch()
        target_inputs = engine.target_inputs(target_batch)
        target_index = torch.as_tensor(target_batch[engine.target_index_key]).long().cpu()
        target_clusters = assignment.target_labels[target_index]

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def _forward_and_loss():
            with engine.batchnorm.source_pass():
                engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            with engine.batchnorm.target_pass():  # only the tapped bottleneck of the target pass is used
                if engine.target_pass == "encoder":
                    encode(engine.network, target_inputs, engine.bottleneck_tap.module_name)
                else:
                    engine.network(target_inputs)
            target_features = engine.bottleneck_tap.features
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            parts = engine.loss_function(
                engine.state.output[Keys.PRED],
                targets,
                target_features,
                target_clusters,
                assignment.source_means,
                assignment.match,
                round_id=assignment.epoch,
            )
            engine.state.output[Keys.LOSS] = parts["loss"]
            engine.state.output["seg_loss"] = parts["seg_loss"]
            engine.state.output["align_loss"] = parts["align_loss"]
            engine.state.output["lambda"] = parts["lambda"]
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        return engine.step_with(_forward_and_loss)
