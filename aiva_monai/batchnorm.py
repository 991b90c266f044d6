"""BatchNorm running statistics during site adaptation: AdaBN, and which statistics each pass updates.

An adaptation step runs the network twice in train mode: on a labelled source batch and on an unlabelled
target batch. In train mode a BatchNorm layer normalises with the batch's own statistics, and *also* moves
its running statistics (the ones evaluation uses) towards them. Which passes may do that decides what the
adapted model carries:

- ``"shared"``: both passes update one set (the first implementation): after adaptation the running
  statistics are a mix of about half source and half target batches.
- ``"target"``: the source pass normalises with its batch statistics but leaves the running statistics
  alone; only target passes update them, so the adapted model carries target statistics (AdaBN's idea,
  kept up to date while the weights move). The source statistics of the starting model are kept for the
  source embedding pass.
- ``"per_site"``: two sets: source passes update a source set, target passes the target set; the network
  holds the target set outside the source pass. The source embedding pass uses the (current) source set.

``start`` optionally re-estimates the target statistics with AdaBN before the first clustering round, so
that round already sees target features normalised with target statistics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping

import torch
from monai.utils import CommonKeys as Keys
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from aiva_monai.networks import _unwrap
from aiva_monai.progress import RoundProgress

__all__ = ["BATCHNORM_MODES", "batchnorm_layers", "adapt_batchnorm", "adabn_batches", "AdaptationBatchNorm"]

logger = logging.getLogger(__name__)

BATCHNORM_MODES = ("shared", "target", "per_site")


def batchnorm_layers(network: nn.Module) -> list[tuple[str, _BatchNorm]]:
    """(name, module) of every BatchNorm layer (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``) of ``network``.

    Instance, group and layer norms are not BatchNorm: they keep no running statistics (or, for instance
    norm with ``track_running_stats``, statistics per image that AdaBN does not define).
    """
    return [(name, m) for name, m in _unwrap(network).named_modules() if isinstance(m, _BatchNorm)]


def _images_of(batch, image_key: str):
    # only the image is taken from a batch; a dict's other keys (e.g. a label) are never accessed
    if isinstance(batch, Mapping):
        return batch[image_key]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def adapt_batchnorm(
    network: nn.Module,
    target_loader: Iterable,
    image_key: str = Keys.IMAGE,
    device: str | torch.device | None = None,
    progress: Callable | None = None,
) -> nn.Module:
    """AdaBN (Li et al. 2016): replace every BatchNorm's running statistics by those of the target site.

    Each BatchNorm layer's ``running_mean`` / ``running_var`` are reset and re-estimated over ONE full
    pass of ``target_loader`` as a cumulative average (``momentum=None``: after batch b the running
    value is the mean of the b per-batch values), not as a 0.1-momentum moving average that would mostly
    reflect the last batches. As in ``torch.optim.swa_utils.update_bn``, the BatchNorm layers are in train
    mode during the pass (each normalises with its batch statistics) and every other module is in eval
    mode (dropout off). ``running_mean`` is then the mean of the per-batch channel means (the exact target
    mean when all batches have the same size) and ``running_var`` the mean of the per-batch unbiased
    variances. No parameter changes, no gradient is computed; the original momentum of every layer and
    the train/eval mode of every module are restored afterwards. If the pass fails (e.g. an empty
    loader), the previous statistics are restored too.

    Args:
        network: the segmentation network (DDP/DataParallel wrappers are looked through), modified in place.
        target_loader: iterable of target batches: dicts holding the (B, C, *spatial) image under
            ``image_key`` (nothing else is read: target labels are never touched), or image tensors, or
            (image, ...) tuples.
        image_key: key of the image in a dict batch.
        device: device the images are moved to; default: the device of the network's first parameter.
        progress: ``progress("adabn", done, total)`` after each batch (``aiva_monai.progress.RoundProgress``);
            None: this module's logger, a line at most every 10 s (a pass over a site takes minutes on a CPU).

    Returns:
        the same ``network`` (so a bundle config can chain it).

    Raises:
        ValueError: if the network has no BatchNorm layer (e.g. instance norm), if a BatchNorm layer keeps
            no running statistics (``track_running_stats=False``), or if the loader yields no batch.
    """
    layers = batchnorm_layers(network)
    if not layers:
        raise ValueError(
            f"AdaBN re-estimates BatchNorm statistics, but {type(_unwrap(network)).__name__} has no BatchNorm "
            "layer (instance / group / layer norm keep no running statistics to adapt)."
        )
    untracked = [name for name, m in layers if not m.track_running_stats]
    if untracked:
        raise ValueError(f"AdaBN needs running statistics, but these BatchNorm layers do not track them: {untracked}.")
    if device is None:
        first = next(iter(network.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")

    modes = [(m, m.training) for m in network.modules()]
    momenta = [(m, m.momentum) for _, m in layers]
    saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()) for _, m in layers]
    n_batches = 0
    try:
        network.eval()
        for _, m in layers:
            m.reset_running_stats()  # mean 0, var 1, num_batches_tracked 0
            m.momentum = None  # cumulative average: factor 1 / num_batches_tracked
            m.train()
        try:
            total = len(target_loader)
        except TypeError:  # a generator, or a DataLoader over an IterableDataset
            total = 0
        if total:  # a loader without a length (a generator) runs without progress lines
            progress = progress or RoundProgress(logger, every_s=10.0, clock=None)
            progress("adabn", 0, total)  # the stage starts now: its clock counts the first batch
        for batch in target_loader:
            network(torch.as_tensor(_images_of(batch, image_key)).to(device))
            n_batches += 1
            if total:
                progress("adabn", n_batches, total)
        if n_batches == 0:
            raise ValueError("the target loader yields no batch: AdaBN has nothing to estimate the statistics on.")
    except BaseException:
        for m, mean, var, count in saved:
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
        raise
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training  # per module: Module.train() would recurse over children
    return network


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class AdaptationBatchNorm:
    """Which BatchNorm running statistics the two passes of an adaptation step update (module docstring).

    Args:
        network: the adapted network (DDP wrappers looked through).
        mode: "shared", "target" or "per_site".
        start_loader: unlabelled target batches; when given, ``start`` re-estimates the running statistics
            on them with ``adapt_batchnorm`` before adaptation (use a loader that does not draw from the
            global random generator, e.g. ``shuffle=False``, so that a resumed run stays bit-identical).
        image_key: key of the image in a ``start_loader`` batch.

    Use ``with bn.source_pass(): ...`` and ``with bn.target_pass(): ...`` around the two forward passes of
    a step, and ``bn.site_statistics(site)`` around an eval-mode embedding pass of that site. ``start`` runs
    once when adaptation starts (``AIVATrainer`` calls it at ``Events.STARTED``, after the source weights are
    loaded). The source set ("target", "per_site") is in ``state_dict()``. A network without BatchNorm layers
    (instance or group norm) keeps no running statistics: every mode then behaves the same and ``start`` does nothing.
    """

    def __init__(
        self,
        network: nn.Module,
        mode: str = "shared",
        start_loader: Iterable | None = None,
        image_key: str = Keys.IMAGE,
    ) -> None:
        if mode not in BATCHNORM_MODES:
            raise ValueError(f"batchnorm mode must be one of {BATCHNORM_MODES}, got {mode!r}.")
        self.network = network
        self.mode = mode
        self.start_loader = start_loader
        self.image_key = image_key
        self.layers = [m for _, m in batchnorm_layers(network)]
        self.source_set: list[dict[str, torch.Tensor]] | None = None

    def _current(self) -> list[dict[str, torch.Tensor]]:
        return [{name: getattr(m, name) for name in _BUFFERS} for m in self.layers]

    def _install(self, statistics: list[dict[str, torch.Tensor]]) -> None:
        # the tensors themselves are installed, not copied in place: autograd may have saved the previous
        # ones for the backward pass of the current step
        for m, buffers in zip(self.layers, statistics):
            for name, tensor in buffers.items():
                setattr(m, name, tensor)

    def start(self, engine=None) -> None:
        """Keep the starting (source) statistics as the source set, then AdaBN on ``start_loader`` if given."""
        if self.mode == "per_site" and isinstance(self.network, nn.parallel.DistributedDataParallel):
            raise NotImplementedError(
                "batchnorm mode 'per_site' swaps buffers, which DistributedDataParallel does "
                "not follow; use 'target' for multi-GPU runs."
            )
        if not self.layers:  # instance / group norm: no running statistics, every mode is the same
            return
        if self.mode != "shared":
            self.source_set = [{k: v.detach().clone() for k, v in buffers.items()} for buffers in self._current()]
        if self.start_loader is not None:
            adapt_batchnorm(self.network, self.start_loader, image_key=self.image_key)

    @contextlib.contextmanager
    def source_pass(self):
        """Around the source forward pass of a training step."""
        if self.mode == "shared":
            yield
        elif self.mode == "target":
            tracked = [(m, m.track_running_stats) for m in self.layers]
            for m in self.layers:
                m.track_running_stats = False  # train mode: batch statistics, running statistics untouched
            try:
                yield
            finally:
                for m, flag in tracked:
                    m.track_running_stats = flag
        else:
            target_set = self._current()
            self._install(self._source_set())
            try:
                yield
            finally:
                self.source_set = self._current()
                self._install(target_set)

    @contextlib.contextmanager
    def target_pass(self):
        """Around the target forward pass of a training step: the network's running statistics are the
        target's in every mode, so the pass updates them as usual."""
        yield

    @contextlib.contextmanager
    def site_statistics(self, site: str):
        """Around an eval-mode pass over ``site`` ("source" or "target") slices: source slices are normalised
        with the source set ("target", "per_site"), target slices with the network's own statistics."""
        if self.mode == "shared" or site != "source":
            yield
            return
        target_set = self._current()
        self._install(self._source_set())
        try:
            yield
        finally:
            if self.mode == "per_site":
                self.source_set = self._current()
            self._install(target_set)

    def _source_set(self):
        if not self.layers:  # no BatchNorm layer: nothing to swap
            return []
        if self.source_set is None:
            raise RuntimeError("AdaptationBatchNorm.start() has not run: no source statistics are kept yet.")
        return self.source_set

    def state_dict(self) -> dict:
        return {
            "mode": self.mode,
            "source_set": None
            if self.source_set is None
            else [{k: v.detach().cpu().clone() for k, v in buffers.items()} for buffers in self.source_set],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"checkpoint was made with batchnorm mode {state['mode']!r}, this run uses {self.mode!r}.")
        source = state.get("source_set")
        if source is None:
            self.source_set = None
            return
        devices = [getattr(m, "running_mean").device for m in self.layers]
        self.source_set = [{k: v.to(device) for k, v in buffers.items()} for buffers, device in zip(source, devices)]


def adabn_batches(dataset, batch_size: int = 64, seed: int = 0, num_workers: int = 0):
    """A loader over ``dataset`` for AdaBN: shuffled (batches mix volumes) by its own generator seeded with
    ``seed``, so every call gives the same order and the global random generator is never drawn from (a
    resumed run stays bit-identical)."""
    from monai.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=True,
        num_workers=int(num_workers),
        generator=torch.Generator().manual_seed(int(seed)),
    )
