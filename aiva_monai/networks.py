"""Networks and the bottleneck tap.

``BottleneckTap`` records the output of a network's bottleneck module on every forward pass with a
removable forward hook, so the network itself stays a plain module: remove the tap (or build the
network fresh, as the bundles' export does) and it scripts and exports unchanged.

``encode`` runs only the part of a network that the bottleneck depends on (the encoder), for passes
that need the bottleneck and not the segmentation (the clustering's embedding pass, the trainer's
target pass): about half the cost of a full forward for a symmetric U-Net.

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

__all__ = ["PreActResUNet", "BottleneckTap", "find_bottleneck", "encode", "encoder_stages", "runs_children_in_order"]


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
            return nn.Sequential(
                *[PreActResBlock(spatial_dims, c, norm=norm, act=act) for _ in range(blocks_per_level)]
            )

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


# -- encoder-only passes -----------------------------------------------------------------------------


def runs_children_in_order(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Sequential with the default forward and no hooks: it computes exactly its
    children, one after another (so they can be run, or rewritten, one by one)."""
    return (
        isinstance(module, nn.Sequential)
        and type(module).forward is nn.Sequential.forward
        and not module._forward_hooks
        and not module._forward_pre_hooks
    )


def _plain_chain(module: nn.Module) -> list[nn.Module]:
    # run a plain chain's children one by one (so the memory format can change early); anything else is one
    # opaque stage
    if runs_children_in_order(module):
        return [stage for child in module for stage in _plain_chain(child)]
    return [module]


def encoder_stages(network: nn.Module, module_name: str | None = None) -> list[nn.Module] | None:
    """The modules that compute the output of ``module_name`` (default: the bottleneck, ``find_bottleneck``)
    of a supported network, in order: feeding the input through them gives the bottleneck exactly as the
    full forward computes it, and nothing after it is run. The last stage is the module itself, so forward
    hooks on it (a ``BottleneckTap``) fire.

    Known chains: ``PreActResUNet`` (``encoder`` stages, ``bottleneck``), MONAI ``BasicUNet`` (``conv_0``,
    ``down_1`` .. ``down_4``), ``UNet`` (each level's down layer, then the innermost layer) and ``DynUNet``
    (``input_block``, the down-samplings, ``bottleneck``, read from its skip layers). Returns None for any
    other network or module (``encode`` then stops the full forward at the module instead).
    """
    network = _unwrap(network)
    if module_name is None:
        module_name = find_bottleneck(network)
    chain: list[nn.Module]
    if isinstance(network, PreActResUNet) and module_name == "bottleneck":
        chain = [*network.encoder, network.bottleneck]
    elif isinstance(network, BasicUNet) and module_name == "down_4":
        chain = [network.conv_0, network.down_1, network.down_2, network.down_3, network.down_4]
    elif isinstance(network, UNet) and module_name == find_bottleneck(network):
        chain, module = [], network.model
        while isinstance(module, nn.Sequential) and len(module) >= 2 and isinstance(module[1], SkipConnection):
            chain.append(module[0])  # SkipConnection feeds its input unchanged to its submodule
            module = module[1].submodule
        chain.append(module)
    elif isinstance(network, DynUNet) and module_name == "bottleneck":
        from monai.networks.nets.dynunet import DynUNetSkipLayer

        chain, layer = [], network.skip_layers
        while isinstance(layer, DynUNetSkipLayer):
            chain.append(layer.downsample)  # DynUNetSkipLayer: next_layer(downsample(x))
            layer = layer.next_layer
        if layer is not network.bottleneck:
            return None
        chain.append(layer)
    else:
        return None
    return [stage for module in chain[:-1] for stage in _plain_chain(module)] + [chain[-1]]


class _BottleneckReached(Exception):
    pass


def _forward_until(network: nn.Module, module_name: str, images: torch.Tensor) -> torch.Tensor:
    # any network: run its own forward and stop it (with an exception) as soon as the module has run
    modules = dict(network.named_modules())
    if module_name not in modules:
        raise ValueError(f"{type(network).__name__} has no module named {module_name!r}.")
    found: list[torch.Tensor] = []

    def stop(module, inputs, output):
        found.append(output)
        raise _BottleneckReached

    handle = modules[module_name].register_forward_hook(stop)
    try:
        network(images)
    except _BottleneckReached:
        pass
    finally:
        handle.remove()
    if not found:
        raise RuntimeError(f"the forward pass of {type(network).__name__} never ran {module_name!r}.")
    return found[0]


def encode(
    network: nn.Module, images: torch.Tensor, module_name: str | None = None, *, channels_last: bool = False
) -> torch.Tensor:
    """Bottleneck features of ``images``, running only what the bottleneck depends on.

    Args:
        network: a supported network (see ``encoder_stages``) or any network with ``module_name`` given;
            DDP/DataParallel wrappers are looked through (the plain module runs: no DDP collectives, but
            gradients still reach DDP's reducer when a DDP forward of the same iteration precedes the
            backward).
        images: (B, C, *spatial) input.
        module_name: the tapped module (``BottleneckTap.module_name``); default ``find_bottleneck``.
        channels_last: run the encoder's activations in channels-last memory format (2D and 3D), which
            is faster for convolutions on CPU (oneDNN) and with AMP on GPU. The result equals the
            default's up to float rounding (different convolution kernels).

    Returns:
        The (B, C', *spatial') output of the module, as the full forward computes it (bit-identical
        with ``channels_last=False``; a test checks all four supported networks in eval and train mode),
        attached to the autograd graph when gradients are enabled. Nothing after the module runs, so in
        train mode only the BatchNorm statistics up to the bottleneck are updated. Forward hooks on the
        module itself fire (a ``BottleneckTap`` records the features as after a full forward).

    Networks outside the known chains run their own forward, stopped right after the module: same
    features, same saving, no channels-last conversion.
    """
    plain = _unwrap(network)
    name = find_bottleneck(plain) if module_name is None else module_name
    stages = encoder_stages(plain, name)
    if stages is None:
        return _forward_until(plain, name, images)
    x = images
    for stage in stages:
        if channels_last and x.dim() in (4, 5) and x.shape[1] > 1:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        x = stage(x)
    return x
