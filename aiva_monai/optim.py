"""What adaptation trains: the parameters left trainable when some modules are frozen."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from aiva_monai.networks import _unwrap

__all__ = ["freeze_modules", "trainable_parameters"]


def trainable_parameters(network: nn.Module, frozen_modules: Sequence[str] = ()) -> list[torch.nn.Parameter]:
    """Freeze the parameters of the named modules and return every other parameter, for the optimiser.

    ``frozen_modules`` are names of ``network.named_modules()`` (DDP wrappers looked through), e.g.
    ``["decoder"]`` for ``PreActResUNet``: the AIVA authors train the encoder up to the tapped layer and the
    output layer only. Frozen parameters get ``requires_grad = False``: gradients still flow *through* the
    frozen modules to the trainable ones, and BatchNorm running statistics of frozen modules still follow the
    adaptation's BatchNorm mode (they are buffers, not parameters).

    Raises:
        ValueError: a name that is not a module of the network, or nothing left to train.
    """
    plain = _unwrap(network)
    modules = dict(plain.named_modules())
    unknown = [name for name in frozen_modules if name not in modules]
    if unknown:
        tops = [name for name in modules if name and "." not in name]
        raise ValueError(
            f"frozen_modules {unknown} are not modules of {type(plain).__name__}; its top-level modules: {tops}."
        )
    frozen = {id(p) for name in frozen_modules for p in modules[name].parameters()}
    for parameter in plain.parameters():
        if id(parameter) in frozen:
            parameter.requires_grad_(False)
    trainable = [p for p in plain.parameters() if id(p) not in frozen]
    if not trainable:
        raise ValueError(
            f"frozen_modules {list(frozen_modules)} leave no parameter of {type(plain).__name__} to train."
        )
    return trainable


def freeze_modules(network: nn.Module, frozen_modules: Sequence[str] = ()) -> nn.Module:
    """``network`` with the parameters of the named modules frozen (``requires_grad = False``), returned for use
    in a config expression. Freeze *before* wrapping a network in ``DistributedDataParallel``: DDP registers the
    parameters that require gradients when it is built and waits for their gradients at every step."""
    if frozen_modules:
        trainable_parameters(network, frozen_modules)
    return network
