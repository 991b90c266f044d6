"""``AdaptationTrainer``: the one base of the unsupervised adaptation trainers (AIVA, AdaptSegNet, Seg-JDOT).

It owns what every method shares, as MONAI's ``GanTrainer`` owns its loop: the unlabelled target stream
(cycled independently of the source epochs, resumable), the iteration's fixed sequence (prepare the source
batch, draw a target batch, forward, loss, backward and optimiser step under AMP, the standard iteration
events in order) and the output keys. A method supplies two hooks, ``forward_passes`` and ``losses``, and
optionally ``update_context`` / ``after_update`` (AdaptSegNet's discriminator).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.utils import CommonKeys as Keys

from aiva_monai.data.samplers import SeededEndlessSampler

__all__ = ["AdaptationTrainer", "default_seg_loss", "full_precision"]


def default_seg_loss() -> Callable:
    """The source objective of every method: cross-entropy on (B, 1, ...) class-index labels (as ``AIVALoss``)."""
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0)


def full_precision(engine) -> contextlib.AbstractContextManager:
    """float32 even under AMP: adversarial BCE logits of a small discriminator and squared distances of
    10^5-dimensional features overflow or lose precision in fp16."""
    return torch.autocast("cuda", enabled=False) if engine.amp else contextlib.nullcontext()


class AdaptationTrainer(SupervisedTrainer):
    """Per iteration: one labelled source batch (``train_data_loader``) and one unlabelled target batch
    (``target_data_loader``, cycled; only ``target_image_key`` and what a method's hook reads of it, never a
    target label).

    The iteration: ``prepare_batch`` on the source batch, ``next_target_batch``, ``network.train()``, zero the
    gradients, then inside ``update_context()``: ``forward_passes`` (its ``pred`` becomes ``output["pred"]``),
    FORWARD_COMPLETED, ``losses`` (merged into ``output``; ``loss`` is what is back-propagated),
    LOSS_COMPLETED, backward and one optimiser step (with the grad scaler under AMP), BACKWARD_COMPLETED;
    then ``after_update``, and MODEL_COMPLETED. ``engine.state.output`` holds ``image``, ``label``, ``pred``
    and ``loss`` as ``SupervisedTrainer``, plus the method's other loss terms.

    Resuming: ``state_dict()`` carries the number of target samples drawn, and a ``SeededEndlessSampler``
    on either loader is positioned where the interrupted run was, so a resumed run sees the same batches.

    Subclasses take their own keyword arguments, pass the rest (``*args, **kwargs``) to this ``__init__`` and
    implement:

    - ``forward_passes(inputs, target_batch, args, kwargs) -> dict``: the network passes (``pred`` required);
    - ``losses(passes, targets) -> dict``: ``loss`` (a tensor with a graph) and detached terms to log;
    - optionally ``setup(device, network, optimizer)`` (runs before the train handlers are attached),
      ``check_ready()``, ``update_context(passes)`` (a context manager around forward + backward + step) and
      ``after_update(passes)`` (e.g. a second network's update).

    Args:
        target_data_loader: iterable of dicts with (at least) the target images.
        target_image_key: key of the target image in a target batch.
        loss_function: the source segmentation loss or the method's loss; default ``default_seg_loss()``.
        other args: as ``monai.engines.SupervisedTrainer``; gradient accumulation and ``torch.compile``
            are not supported (the iteration is the method's own).
    """

    reads_target_labels = False

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        target_data_loader: Iterable,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        target_image_key: str = Keys.IMAGE,
        **kwargs,
    ) -> None:
        if kwargs.get("accumulation_steps", 1) != 1 or kwargs.get("compile", False):
            raise ValueError(f"{type(self).__name__} supports neither gradient accumulation nor torch.compile.")
        self.target_data_loader = target_data_loader
        self.target_image_key = target_image_key
        self._target_iterator = None
        self.setup(device, network, optimizer)  # before SupervisedTrainer attaches the train handlers
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=default_seg_loss() if loss_function is None else loss_function,
            **kwargs,
        )
        self.state.reads_target_labels = self.reads_target_labels

    # -- the method's hooks ------------------------------------------------------------------------------

    def setup(self, device: str | torch.device, network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Called by ``__init__`` before the train handlers are attached: what they may need (e.g. a
        bottleneck tap) is built here."""

    def forward_passes(self, inputs: torch.Tensor, target_batch: dict, args, kwargs) -> dict:
        """The network passes of one iteration: a dict with at least ``pred`` (the source prediction)."""
        raise NotImplementedError

    def losses(self, passes: dict, targets: torch.Tensor) -> dict:
        """The loss terms from ``forward_passes``' dict: ``loss`` (back-propagated) and detached terms to log."""
        raise NotImplementedError

    def update_context(self, passes: dict) -> contextlib.AbstractContextManager:
        """Entered around forward, backward and the optimiser step (``passes`` is filled inside it)."""
        return contextlib.nullcontext()

    def after_update(self, passes: dict) -> None:
        """Runs after the optimiser step, before MODEL_COMPLETED."""

    # -- the iteration -----------------------------------------------------------------------------------

    def _iteration(self, engine: AdaptationTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        engine.check_ready()
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        target_batch = engine.next_target_batch()

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        passes: dict = {}

        def forward_and_loss():
            passes.update(engine.forward_passes(inputs, target_batch, args, kwargs))
            engine.state.output[Keys.PRED] = passes[Keys.PRED]
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            engine.state.output.update(engine.losses(passes, targets))
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        with engine.update_context(passes):
            engine.backward_and_step(forward_and_loss)
        engine.after_update(passes)
        tap = getattr(engine, "bottleneck_tap", None)
        if tap is not None:
            tap.features = None  # drop the graph reference until the next pass
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output

    def check_ready(self) -> None:
        """Raises when the trainer cannot run an iteration yet (e.g. AIVA without a clustering)."""

    def backward_and_step(self, forward_and_loss: Callable[[], None]) -> None:
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

    # -- the target stream -------------------------------------------------------------------------------

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

    def target_inputs(self, target_batch: dict) -> torch.Tensor:
        """The (B, C, *spatial) image of a target batch on the training device (the only key read)."""
        return torch.as_tensor(target_batch[self.target_image_key]).to(
            self.state.device, non_blocking=self.non_blocking
        )

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
