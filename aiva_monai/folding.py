"""BatchNorm folding for inference passes: ``fold_batchnorm`` returns an eval-mode copy of a network with each
BatchNorm that follows a convolution folded into it (the clustering round's embedding pass)."""

from __future__ import annotations

import copy

from torch import nn

from aiva_monai.networks import _unwrap, runs_children_in_order

__all__ = ["fold_batchnorm"]


_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class _Folded(nn.Identity):
    """Where a BatchNorm was, after ``fold_batchnorm`` moved it into the convolution before it."""


def _is_chain(module: nn.Module, opaque: set[int]) -> bool:
    # a plain chain that is not a module whose output must stay as it is
    return runs_children_in_order(module) and id(module) not in opaque


def _edge(parent: nn.Module, name: str, last: bool, opaque: set[int]) -> tuple[nn.Module, str, nn.Module]:
    # the module run last (first) by parent.name, looking only through plain chains
    module = parent._modules[name]
    while _is_chain(module, opaque) and len(module) > 0:
        parent, name = module, list(module._modules)[-1 if last else 0]
        module = module._modules[name]
    return parent, name, module


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    return (
        isinstance(conv, _CONVS)
        and isinstance(norm, _BATCHNORMS)
        and norm.running_mean is not None
        and norm.running_var is not None
        and norm.num_features == conv.out_channels
        and not conv._forward_hooks
        and not norm._forward_hooks
        and not norm._forward_pre_hooks
    )


def fold_batchnorm(network: nn.Module, module_name: str | None = None) -> nn.Module:
    """An eval-mode copy of ``network`` computing the same function with fewer passes over memory.

    Every BatchNorm that directly follows a convolution in a plain ``nn.Sequential`` chain (default
    ``forward``, no hooks: MONAI's ``Convolution`` / ``ADN``, the second pre-activation of each
    ``PreActResUNet`` block) is folded into the convolution's weights and bias with its running statistics,
    and each ReLU right after a BatchNorm (or a folded one) in such a chain runs in place on that fresh
    tensor. ``module_name`` (e.g. the tapped bottleneck) and modules with hooks are never looked into from
    outside, so no fold crosses their boundary and their output stays what the original computes. The result
    equals the original's in eval mode up to float rounding; about 1.2 x faster encoder passes on CPU
    (benchmarks/README.md). Only for inference: the folded layers no longer follow BatchNorm statistics.
    ``network`` is not modified.
    """
    folded = copy.deepcopy(_unwrap(network)).eval()
    opaque = {id(folded.get_submodule(module_name))} if module_name else set()
    chains = [m for m in folded.modules() if isinstance(m, nn.Sequential)]
    for sequential in chains:
        if not _is_chain(sequential, set()):  # a tapped chain may still fold inside itself
            continue
        names = list(sequential._modules)
        for before, after in zip(names, names[1:]):
            conv_parent, conv_name, conv = _edge(sequential, before, True, opaque)
            norm_parent, norm_name, norm = _edge(sequential, after, False, opaque)
            if _foldable(conv, norm):
                conv_parent._modules[conv_name] = nn.utils.fusion.fuse_conv_bn_eval(conv, norm)
                norm_parent._modules[norm_name] = _Folded()
    for sequential in chains:
        if not _is_chain(sequential, set()):
            continue
        children = list(sequential.children())
        for before, after in zip(children, children[1:]):
            if isinstance(after, nn.ReLU) and isinstance(before, (*_BATCHNORMS, _Folded)) and not after._forward_hooks:
                after.inplace = True  # its input is the BatchNorm's (or the folded convolution's) own output
    return folded
