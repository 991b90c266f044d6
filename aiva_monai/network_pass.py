"""Running a network over slices: how (``NetworkPass``), which slices (``EveryNth``), the batch-by-batch
bottleneck features (``iterate_features``), eval mode without gradients, and the torch.distributed sharing
of a pass."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import DataLoader

from aiva_monai.clustering import (
    ClusteringSettings,
)
from aiva_monai.folding import fold_batchnorm
from aiva_monai.networks import BottleneckTap, _unwrap, encode

__all__ = [
    "NetworkPass",
    "EveryNth",
    "SiteContext",
    "iterate_features",
    "distributed_context",
    "EvalMode",
    "site_snapshots",
    "features_shape",
    "cpu_has_native_bfloat16",
    "pass_dtype",
]


SiteContext = Callable[[str], contextlib.AbstractContextManager]


@dataclass(frozen=True)
class NetworkPass:
    """How a pass over the slices runs the network (what the round computes is ``ClusteringSettings``).

    Attributes:
        device: where the network and the batches are.
        num_workers: data-loader workers.
        image_key, index_key: keys of the image and of the dataset index in a sample.
        amp, amp_kwargs: autocast of the pass (``settings.precision == "auto"``), as the trainer's.
        site_context: ``site_context("source")`` / ``site_context("target")`` is entered around each site's
            pass, inside eval mode and ``no_grad`` (e.g. per-site BatchNorm statistics); None: the network
            as it is.
    """

    device: str | torch.device = "cpu"
    num_workers: int = 0
    image_key: str = "image"
    index_key: str = "index"
    amp: bool = False
    amp_kwargs: dict | None = None
    site_context: SiteContext | None = None

    def site_scope(self, site: str) -> contextlib.AbstractContextManager:
        return self.site_context(site) if self.site_context is not None else contextlib.nullcontext()


class EveryNth(torch.utils.data.Dataset):
    """Samples 0, stride, 2 * stride, ... of ``dataset``, with ``index_key`` renumbered 0, 1, 2, ... (the
    position in this view, as ``iterate_features`` checks); ``rows`` (n,) are their positions in ``dataset``."""

    def __init__(self, dataset, stride: int, index_key: str = "index") -> None:
        if int(stride) < 1:
            raise ValueError(f"stride must be at least 1, got {stride}.")
        self.dataset, self.index_key = dataset, index_key
        self.rows = np.arange(0, len(dataset), int(stride), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, position: int) -> dict:
        sample = dict(self.dataset[int(self.rows[position])])
        if self.index_key in sample:
            sample[self.index_key] = int(position)
        return sample


def distributed_context() -> tuple[int, int]:
    """(rank, world_size) of the initialised default torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_shard(n: int, batch_size: int, rank: int, world_size: int) -> list[list[int]]:
    # whole batches, round-robin: rank r runs batches r, r + W, ... of the single-process order, so every
    # batch (and its features) is exactly the one a single process computes
    batches = [list(range(begin, min(begin + batch_size, n))) for begin in range(0, n, batch_size)]
    return batches[rank::world_size]


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AMX-BF16 or AVX512-BF16). With them oneDNN's
    bfloat16 convolutions are faster than float32 ones (3 x with AMX on the bundle's encoder,
    benchmarks/README.md); without them bfloat16 is emulated and slower than float32."""
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is None or not torch.backends.mkldnn.is_available():
        return False
    capabilities = get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def _default_autocast_dtype(device_type: str) -> torch.dtype:
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def pass_dtype(device, precision: str, amp: bool = False, amp_kwargs: dict | None = None) -> str:
    """The dtype a pass with ``settings.precision == precision`` computes in on ``device``: "float32",
    "bfloat16" or "float16" ("auto": the autocast dtype when ``amp``, else float32; "cpu_bfloat16":
    bfloat16 on a CPU with ``cpu_has_native_bfloat16``, else as "auto")."""
    device_type = torch.device(device).type
    if precision == "cpu_bfloat16":
        if device_type == "cpu" and cpu_has_native_bfloat16():
            return "bfloat16"
        precision = "auto"
    if precision == "auto":
        if not amp:
            return "float32"
        dtype = (amp_kwargs or {}).get("dtype") or _default_autocast_dtype(device_type)
        return str(dtype).removeprefix("torch.")
    return precision


def _autocast(device, precision: str, amp: bool, amp_kwargs):
    device_type = torch.device(device).type
    if precision == "cpu_bfloat16":
        precision = "bfloat16" if pass_dtype(device, precision) == "bfloat16" else "auto"
    if precision == "auto":
        return torch.autocast(device_type, enabled=bool(amp), **(amp_kwargs or {}))
    if precision == "float32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=getattr(torch, precision))


def iterate_features(
    network,
    tap: BottleneckTap | None,
    dataset,
    network_pass: NetworkPass,
    settings: ClusteringSettings,
    *,
    site: str = "slices",
    rank: int = 0,
    world_size: int = 1,
    on_batch: Callable[[int], None] | None = None,
):
    """Yield (bottleneck features (B, ...), position of the batch's first sample) over ``dataset`` in order.

    The caller sets eval mode and disables gradients. Batches of ``settings.batch_size``, in
    ``settings.precision``. With ``settings.encoder_only`` only the encoder runs
    (``networks.encode`` up to ``tap.module_name``; of a ``folding.fold_batchnorm`` copy made at the start
    when ``settings.fold_batchnorm``); otherwise the full network runs and ``tap`` records
    the bottleneck. Samples carrying ``index_key`` must carry their own position (checked), so cluster
    ids can later be looked up by that index. With ``world_size`` > 1 only the batches ``rank``,
    ``rank + world_size``, ... are run (the same batches as in one process). ``on_batch(B)`` is called
    after every batch.
    """
    batch_size, num_workers = settings.batch_size, network_pass.num_workers
    image_key, index_key, device = network_pass.image_key, network_pass.index_key, network_pass.device
    if world_size > 1:
        shard = _batch_shard(len(dataset), batch_size, rank, world_size)
        loader = DataLoader(dataset, batch_sampler=shard, num_workers=num_workers)
        starts = [indices[0] for indices in shard]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        starts = None
    module_name = tap.module_name if tap is not None else None
    if settings.encoder_only and settings.fold_batchnorm:
        network = fold_batchnorm(network, module_name)  # inside the caller's site context: its statistics fold
    position = 0
    for number, batch in enumerate(loader):
        if starts is not None:
            position = starts[number]
        images = torch.as_tensor(batch[image_key]).to(device, non_blocking=True)
        if index_key in batch:
            index = torch.as_tensor(batch[index_key]).cpu()
            if not torch.equal(index, torch.arange(position, position + len(index))):
                raise ValueError(
                    f"the {site} dataset's '{index_key}' values must equal each sample's position; "
                    f"got {index[:5].tolist()}... at position {position}."
                )
        with _autocast(device, settings.precision, network_pass.amp, network_pass.amp_kwargs):
            if settings.encoder_only:
                features = encode(network, images, module_name, channels_last=settings.channels_last)
            else:
                network(images)
                features = tap.features
        # a sum is non-finite when any value is (or, rarely, when it overflows: then the full check decides);
        # 5 x cheaper than checking every value (0.12 ms per slice, 2 % of the bfloat16 CPU pass)
        if not bool(torch.isfinite(features.sum(dtype=torch.float32))) and not bool(torch.isfinite(features).all()):
            raise ValueError(
                f"non-finite bottleneck features for {site} slices {position}..{position + len(images) - 1}."
            )
        yield features, position
        if on_batch is not None:
            on_batch(len(images))
        position += len(images)


class EvalMode:
    """The plain network in eval mode, without gradients; restores its mode and clears the tap on exit."""

    def __init__(self, network, tap) -> None:
        self.network, self.tap = _unwrap(network), tap

    def __enter__(self):
        self.was_training = self.network.training
        self.network.eval()
        self.no_grad = torch.no_grad()
        self.no_grad.__enter__()
        return self.network

    def __exit__(self, *exc) -> None:
        self.no_grad.__exit__(*exc)
        self.network.train(self.was_training)
        if self.tap is not None:
            self.tap.features = None


def site_snapshots(network, network_pass: NetworkPass) -> dict[str, torch.nn.Module]:
    """{"source": copy, "target": copy}: eval-mode copies of ``network`` (wrappers looked through), each made
    inside ``network_pass.site_context(site)`` so that it keeps that site's BatchNorm statistics (one copy for
    both without a site context). A pass over these (``embed_sites(..., site_networks=...)``) computes what a
    pass over ``network`` would have computed now, however ``network`` trains on meanwhile."""
    plain = _unwrap(network)
    if network_pass.site_context is None:
        shared = copy.deepcopy(plain).eval()
        return {"source": shared, "target": shared}
    snapshots = {}
    for site in ("source", "target"):
        with network_pass.site_scope(site):
            snapshots[site] = copy.deepcopy(plain).eval()
    return snapshots


def broadcast_buffers(network) -> None:
    import torch.distributed as dist

    for buffer in network.buffers():
        dist.broadcast(buffer, src=0)


def all_gather_rows(rows, world_size: int) -> list:
    import torch.distributed as dist

    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def features_shape(network, tap, dataset, network_pass: NetworkPass, settings):
    image = torch.as_tensor(dataset[0][network_pass.image_key])[None].to(network_pass.device)
    features = (
        encode(network, image, tap.module_name if tap is not None else None)
        if settings.encoder_only or tap is None
        else (network(image), tap.features)[1]
    )
    if tap is not None:
        tap.features = None
    return tuple(features.shape[1:])
