"""Networks and the bottleneck tap.

``BottleneckTap`` records the output of a network's bottleneck module on every forward pass with a
removable forward hook, so the network itself stays a plain module: remove the tap (or build the
network fresh, as the bundles' export does) and it scripts and exports unchanged.

``PreActResUNet`` is the reference code's architecture rebuilt from MONAI blocks: a pre-activation
residual U-Net (BatchNorm, 16/32/64/128 channels, 3 down-samplings, additive skips) whose
``bottleneck`` stage yields 128 x 32 x 32 features for 256 x 256 slices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import ADN, Convolution
from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, DynUNet, UNet
from torch import nn

__all__ = ["PreActResUNet", "BottleneckTap", "find_bottleneck"]


def _unwrap(network: nn.Module) -> nn.Module:
    # DistributedDataParallel / DataParallel keep the real network in .module
    while isinstance(network, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        network = network.module
    return network


def find_bottleneck(network: nn.Module) -> str:
    """Name (as in ``named_modules``) of the bottleneck module of a supported network.

    Supported: MONAI ``BasicUNet`` (``down_4``), ``UNet`` (its innermost layer), ``DynUNet`` and
    ``PreActResUNet`` (``bottleneck``), and any network with a ``bottleneck`` attribute.

    Raises:
        ValueError: for other networks; pass the module name to ``BottleneckTap`` explicitly.
    """
    network = _unwrap(network)
    if isinstance(network, BasicUNet):
        return "down_4"
    if isinstance(network, UNet):
        name, module = "model", network.model
        while isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[1], SkipConnection):
            name, module = f"{name}.1.submodule", module[1].submodule
        return name
    if isinstance(network, (DynUNet, PreActResUNet)) or isinstance(getattr(network, "bottleneck", None), nn.Module):
        return "bottleneck"
    raise ValueError(
        f"cannot locate the bottleneck of a {type(network).__name__}: pass the module name "
        "(one of network.named_modules()) to BottleneckTap(network, module_name)."
    )


class BottleneckTap:
    """Keeps the bottleneck tensor of the last forward pass of ``network``.

    Args:
        network: the segmentation network (DDP/DataParallel wrappers are looked through).
        module_name: name of the module whose output is the bottleneck; found automatically for
            supported networks (see ``find_bottleneck``).

    ``tap.features`` is the (B, C, *spatial) output of that module in the last forward pass, still
    attached to the autograd graph when gradients are enabled. ``tap.remove()`` (or leaving a
    ``with`` block) detaches the hook and leaves the network exactly as it was.
    """

    def __init__(self, network: nn.Module, module_name: str | None = None) -> None:
        plain = _unwrap(network)
        self.module_name = find_bottleneck(plain) if module_name is None else module_name
        modules = dict(plain.named_modules())
        if self.module_name not in modules:
            raise ValueError(f"{type(plain).__name__} has no module named {self.module_name!r}.")
        self.features: torch.Tensor | None = None
        self._handle = modules[self.module_name].register_forward_hook(self._record)

    def _record(self, module: nn.Module, inputs, output) -> None:
        self.features = output

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.features = None

    def __enter__(self) -> BottleneckTap:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PreActResBlock(nn.Module):
    """(BN-ReLU-Conv) x 2 with an identity shortcut (He et al. 2016, pre-activation ResNet)."""

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int = 3, norm="batch", act="relu") -> None:
        super().__init__()
        layers = []
        for _ in range(2):
            layers.append(ADN(ordering="NA", in_channels=channels, norm=norm, act=act, norm_dim=spatial_dims))
            layers.append(
                Convolution(spatial_dims, channels, channels, kernel_size=kernel_size, bias=False, conv_only=True)
            )
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _pre_activated(spatial_dims, in_channels, out_channels, kernel_size, strides, norm, act, transposed=False):
    return nn.Sequential(
        ADN(ordering="NA", in_channels=in_channels, norm=norm, act=act, norm_dim=spatial_dims),
        Convolution(
            spatial_dims,
            in_channels,
            out_channels,
            strides=strides,
            kernel_size=kernel_size,
            bias=False,
            conv_only=True,
            is_transposed=transposed,
            padding=0 if kernel_size == strides else None,
            output_padding=0 if transposed else None,
        ),
    )


class DecoderStage(nn.Module):
    """Up-sample, add the encoder skip, refine with residual blocks."""

    def __init__(self, up: nn.Module, blocks: nn.Module) -> None:
        super().__init__()
        self.up = up
        self.blocks = blocks

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.up(x) + skip)


class PreActResUNet(nn.Module):
    """Pre-activation residual U-Net with additive skips (the AIVA reference architecture).

    Args:
        spatial_dims: 2 for slices (3 works too).
        in_channels: input channels (1 for T1; 3 with neighbouring slices as channels).
        out_channels: classes, background included.
        channels: channels per level, shallowest first; ``len(channels) - 1`` down-samplings.
            The input's spatial size must be divisible by ``2 ** (len(channels) - 1)``.
        blocks_per_level: residual blocks after each (down/up)-sampling.
        norm, act: MONAI layer factory names for the pre-activations.

    ``self.bottleneck`` is the deepest stage (down-sampling + residual blocks): its output is the
    bottleneck space used by AIVA, (B, channels[-1], H / 2**L, W / 2**L).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64, 128),
        blocks_per_level: int = 2,
        norm="batch",
        act="relu",
    ) -> None:
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"PreActResUNet needs at least 2 levels of channels, got {channels}.")

        def blocks(c: int) -> nn.Sequential:
            return nn.Sequential(*[PreActResBlock(spatial_dims, c, norm=norm, act=act) for _ in range(blocks_per_level)])

        stem = Convolution(spatial_dims, in_channels, channels[0], kernel_size=3, bias=False, conv_only=True)
        encoder = [nn.Sequential(stem, blocks(channels[0]))]
        for c_in, c_out in zip(channels[:-2], channels[1:-1]):
            encoder.append(nn.Sequential(_pre_activated(spatial_dims, c_in, c_out, 2, 2, norm, act), blocks(c_out)))
        self.encoder = nn.ModuleList(encoder)
        self.bottleneck = nn.Sequential(
            _pre_activated(spatial_dims, channels[-2], channels[-1], 2, 2, norm, act), blocks(channels[-1])
        )
        decoder = []
        for c_in, c_out in zip(channels[:0:-1], channels[-2::-1]):
            up = _pre_activated(spatial_dims, c_in, c_out, 2, 2, norm, act, transposed=True)
            decoder.append(DecoderStage(up, blocks(c_out)))
        self.decoder = nn.ModuleList(decoder)
        self.head = _pre_activated(spatial_dims, channels[0], out_channels, 1, 1, norm, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips: list[torch.Tensor] = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        x = self.bottleneck(x)
        for i, stage in enumerate(self.decoder):
            x = stage(x, skips[len(skips) - 1 - i])
        return self.head(x)
