"""The embedding pass: run a network over every source and target slice and cluster both sites.

Ignite-free, so evaluation scripts and the clustering handler share it. One round is three steps, also
callable one by one (the handler's ``overlap`` mode runs the middle one in a background process):

1. ``embed_sites``: one pass over every source and target slice, encoder only (``networks.encode``),
   in eval mode. Each slice's bottleneck is projected to a sketch (``FeatureProjector``); each source
   slice's full bottleneck is also kept in a ``FeatureStore`` (float16 in memory up to a budget, the rest
   in a temporary file), so no second pass is needed for the source means.
2. ``cluster_embedded``: ``cluster_sketches`` on the sketches (PCA, t-SNE, k-means, matching); under
   torch.distributed rank 0 computes it and broadcasts it.
3. ``compute_source_means``: the full-dimensional mean of every source cluster, summed from the store
   (or, with ``source_means="second_pass"``, from a second pass through the network).

Every setting comes from one ``ClusteringSettings``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import DataLoader
from tqdm.auto import tqdm

from aiva_monai.clustering import (
    ClusteringSettings,
    ClusterMeanAccumulator,
    FeatureProjector,
    FeatureStore,
    SiteClustering,
    cluster_sketches,
    slice_positions,
)
from aiva_monai.networks import BottleneckTap, _unwrap, encode
from aiva_monai.progress import RoundProgress

__all__ = [
    "embed_and_cluster",
    "embed_sites",
    "cluster_embedded",
    "compute_source_means",
    "EmbeddedSites",
    "iterate_features",
    "distributed_context",
]

logger = logging.getLogger(__name__)

SiteContext = Callable[[str], contextlib.AbstractContextManager]


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


def _autocast(device, precision: str, amp: bool, amp_kwargs):
    device_type = torch.device(device).type
    if precision == "auto":
        return torch.autocast(device_type, enabled=bool(amp), **(amp_kwargs or {}))
    if precision == "float32":
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=getattr(torch, precision))


def iterate_features(
    network,
    tap: BottleneckTap | None,
    dataset,
    *,
    device,
    batch_size=32,
    num_workers=0,
    image_key="image",
    index_key="index",
    amp=False,
    amp_kwargs=None,
    progress=True,
    site="slices",
    rank=0,
    world_size=1,
    encoder_only=False,
    channels_last=False,
    precision="auto",
    on_batch: Callable[[int], None] | None = None,
):
    """Yield (bottleneck features (B, ...), position of the batch's first sample) over ``dataset`` in order.

    The caller sets eval mode and disables gradients. With ``encoder_only`` only the encoder runs
    (``networks.encode`` up to ``tap.module_name``); otherwise the full network runs and ``tap`` records
    the bottleneck. Samples carrying ``index_key`` must carry their own position (checked), so cluster
    ids can later be looked up by that index. With ``world_size`` > 1 only the batches ``rank``,
    ``rank + world_size``, ... are run (the same batches as in one process). ``on_batch(B)`` is called
    after every batch.
    """
    if world_size > 1:
        shard = _batch_shard(len(dataset), batch_size, rank, world_size)
        loader = DataLoader(dataset, batch_sampler=shard, num_workers=num_workers)
        starts = [indices[0] for indices in shard]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        starts = None
    module_name = tap.module_name if tap is not None else None
    position = 0
    for number, batch in enumerate(tqdm(loader, desc=f"AIVA embedding {site}", disable=not progress, leave=False)):
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
        with _autocast(device, precision, amp, amp_kwargs):
            if encoder_only:
                features = encode(network, images, module_name, channels_last=channels_last)
            else:
                network(images)
                features = tap.features
        if not bool(torch.isfinite(features).all()):
            raise ValueError(
                f"non-finite bottleneck features for {site} slices {position}..{position + len(images) - 1}."
            )
        yield features, position
        if on_batch is not None:
            on_batch(len(images))
        position += len(images)


@dataclass
class EmbeddedSites:
    """What one embedding pass leaves for the clustering and the source means.

    Attributes:
        source_sketch, target_sketch: (n_s, m), (n_t, m) float32 sketches, all rows (gathered over ranks).
        source_positions, target_positions: slice positions in [0, 1], or None when not needed.
        store: the source slices' full features (this rank's rows), or None with ``second_pass``.
        n_features: D, the flattened bottleneck size.
        seconds: wall time of the pass.
    """

    source_sketch: np.ndarray
    target_sketch: np.ndarray
    source_positions: np.ndarray | None
    target_positions: np.ndarray | None
    store: FeatureStore | None
    n_features: int
    seconds: float

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


class _EvalMode:
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


def _site_scope(site_context: SiteContext | None, site: str):
    return site_context(site) if site_context is not None else contextlib.nullcontext()


def _pass_options(
    settings: ClusteringSettings, device, num_workers, image_key, index_key, amp, amp_kwargs, bar, rank, world_size
):
    return dict(
        device=device,
        batch_size=settings.batch_size,
        num_workers=num_workers,
        image_key=image_key,
        index_key=index_key,
        amp=amp,
        amp_kwargs=amp_kwargs,
        progress=False,
        rank=rank,
        world_size=world_size,
        encoder_only=settings.encoder_only,
        channels_last=settings.channels_last,
        precision=settings.precision,
    )


def embed_sites(
    network,
    tap: BottleneckTap | None,
    source_dataset,
    target_dataset,
    settings: ClusteringSettings,
    *,
    device="cpu",
    num_workers=0,
    image_key="image",
    index_key="index",
    amp=False,
    amp_kwargs=None,
    site_context: SiteContext | None = None,
    progress: RoundProgress | None = None,
) -> EmbeddedSites:
    """Step 1: one eval-mode pass over every source and target slice (see the module docstring).

    ``site_context(site)``, when given, is entered around each site's pass ("source", then "target"),
    inside eval mode (e.g. to swap in per-site BatchNorm statistics). ``tap`` names the bottleneck
    module (``tap.module_name``); without ``encoder_only`` it also records the features.
    """
    rank, world_size = distributed_context()
    options = _pass_options(
        settings, device, num_workers, image_key, index_key, amp, amp_kwargs, False, rank, world_size
    )
    n_total = len(source_dataset) + len(target_dataset)
    detail = "encoder only" if settings.encoder_only else "full network"
    if progress is not None:
        progress.start(
            "embed",
            n_total,
            f"{len(source_dataset)} source + {len(target_dataset)} target, {detail}"
            + (f", {world_size} ranks" if world_size > 1 else ""),
        )
    done = [0]
    start = time.perf_counter()
    projector, store, sketches = None, None, {}
    with _EvalMode(network, tap) as plain:
        if world_size > 1:
            _broadcast_buffers(plain)  # BN running statistics drift per rank between DDP forwards
        for site, dataset in (("source", source_dataset), ("target", target_dataset)):
            offset = 0 if site == "source" else len(source_dataset)

            def on_batch(size, site=site, offset=offset):
                done[0] += size * world_size  # the other ranks run their batches meanwhile
                if progress is not None:
                    progress("embed", min(done[0], n_total), n_total, site)

            rows = []
            with _site_scope(site_context, site):
                for features, position in iterate_features(
                    plain, tap, dataset, site=site, on_batch=on_batch, **options
                ):
                    if projector is None:
                        projector = FeatureProjector(features[0].numel(), settings.sketch_dim, settings.seed)
                    if site == "source" and settings.source_means == "store":
                        if store is None:
                            store = FeatureStore(
                                len(dataset),
                                projector.n_features,
                                settings.store_dtype,
                                settings.store_memory_mb,
                                settings.store_dir,
                            )
                        store.write(position, features)
                    rows.append((position, projector(features).cpu().numpy()))
            if world_size > 1:
                rows = _all_gather_rows(rows, world_size)
            sketches[site] = np.concatenate([row for _, row in sorted(rows, key=lambda item: item[0])])
        if projector is None:  # a rank with no batch (fewer batches than ranks) still needs D
            n_features = int(np.prod(_features_shape(plain, tap, source_dataset, image_key, device, settings)))
        else:
            n_features = projector.n_features
    if settings.source_means == "store" and store is None:
        store = FeatureStore(
            len(source_dataset), n_features, settings.store_dtype, settings.store_memory_mb, settings.store_dir
        )
    positions = (
        (slice_positions(source_dataset), slice_positions(target_dataset)) if settings.slice_position else (None, None)
    )
    seconds = time.perf_counter() - start
    if progress is not None:
        progress("embed", n_total, n_total)
    return EmbeddedSites(sketches["source"], sketches["target"], *positions, store, n_features, seconds)


def cluster_embedded(
    embedded: EmbeddedSites,
    n_clusters: int,
    settings: ClusteringSettings,
    *,
    init_embedding=None,
    progress: RoundProgress | None = None,
) -> SiteClustering:
    """Step 2: ``cluster_sketches`` on the pass's sketches; one result for all ranks (rank 0 computes it)."""
    rank, world_size = distributed_context()
    run = lambda: cluster_sketches(  # noqa: E731
        embedded.source_sketch,
        embedded.target_sketch,
        n_clusters,
        settings,
        source_positions=embedded.source_positions,
        target_positions=embedded.target_positions,
        init_embedding=init_embedding,
        progress=progress,
    )
    if world_size == 1:
        return run()
    import torch.distributed as dist

    start = time.perf_counter()
    shared = [run() if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    result = shared[0]
    result.timings = {**result.timings, "broadcast": time.perf_counter() - start - sum(result.timings.values())}
    return result


def compute_source_means(
    result: SiteClustering,
    embedded: EmbeddedSites,
    n_clusters: int,
    settings: ClusteringSettings,
    *,
    network=None,
    tap=None,
    source_dataset=None,
    device="cpu",
    num_workers=0,
    image_key="image",
    index_key="index",
    amp=False,
    amp_kwargs=None,
    site_context: SiteContext | None = None,
    progress: RoundProgress | None = None,
) -> torch.Tensor:
    """Step 3: (k, D) float32 mean full feature of every source cluster, on ``device``.

    From ``embedded.store`` (``source_means="store"``), or from a second pass through ``network``
    (``"second_pass"``: needs network, tap, source_dataset). Summed over ranks under torch.distributed.
    """
    rank, world_size = distributed_context()
    n_source = len(result.source_labels)
    report = progress or (lambda *args: None)
    report("means", 0, n_source, "from the stored features" if embedded.store is not None else "second pass")
    if embedded.store is not None:
        accumulator = embedded.store.cluster_sums(
            result.source_labels,
            n_clusters,
            device,
            progress=lambda done: report("means", min(done * world_size, n_source), n_source),
        )
    else:
        if network is None or source_dataset is None:
            raise ValueError("source_means='second_pass' needs the network, its tap and the source dataset.")
        accumulator = ClusterMeanAccumulator(n_clusters, embedded.n_features, device)
        options = _pass_options(
            settings, device, num_workers, image_key, index_key, amp, amp_kwargs, False, rank, world_size
        )
        done = [0]

        def on_batch(size):
            done[0] += size * world_size
            report("means", min(done[0], n_source), n_source)

        with _EvalMode(network, tap) as plain, _site_scope(site_context, "source"):
            for features, position in iterate_features(
                plain, tap, source_dataset, site="source means", on_batch=on_batch, **options
            ):
                accumulator.update(features, result.source_labels[position : position + len(features)])
    if world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(accumulator.sums)
        dist.all_reduce(accumulator.counts)
    report("means", n_source, n_source)
    return accumulator.means()


def embed_and_cluster(
    network,
    tap: BottleneckTap | None,
    source_dataset,
    target_dataset,
    n_clusters: int = 12,
    settings: ClusteringSettings | dict | None = None,
    *,
    device="cpu",
    num_workers=0,
    image_key="image",
    index_key="index",
    amp=False,
    amp_kwargs=None,
    progress=True,
    label="",
    site_context: SiteContext | None = None,
    init_embedding=None,
    log: logging.Logger | None = None,
    **options,
) -> SiteClustering:
    """One clustering round (paper, Algorithm 1 steps 1-5) with ``network`` in eval mode.

    Args:
        network, tap: the network and a ``BottleneckTap`` on it (its ``module_name`` is the bottleneck).
        source_dataset, target_dataset: slice datasets (only ``image_key`` is read; ``SliceDataset``
            when ``settings.slice_position`` > 0).
        n_clusters: k.
        settings: a ``ClusteringSettings`` (or a dict of settings, e.g. a bundle's ``cluster_options``;
            None: the defaults). On a CUDA device the PCA runs there unless ``pca_device`` is set.
        progress: show progress bars (log lines are always written, at most ``settings.log_every_s``
            seconds apart, through ``log``).
        label: prefix of the log lines (e.g. "epoch 3: ").
        site_context: ``site_context("source")`` / ``site_context("target")`` is entered around each
            site's network pass, inside eval mode and ``no_grad`` (e.g. to swap in per-site BatchNorm
            statistics); None: the network as it is.
        init_embedding: the previous round's embedding, for ``settings.tsne_warm_start``.
        options: settings as keywords (``batch_size``, ``sketch_dim``, ``seed``, ``pca_components``,
            ``tsne_method``, ``perplexity``, ``n_jobs``, ``kmeans_n_init``, ...), applied on top of
            ``settings``, for callers of the former signature.

    Returns:
        SiteClustering with ``source_means`` (k, D) on ``device`` and the seconds of every stage in
        ``timings`` (``embed``, ``pca``, ``tsne``, ``kmeans``, ``match``, ``means``).
    """
    settings = ClusteringSettings.coerce(settings, **options)
    if torch.device(device).type == "cuda" and settings.pca_device is None:
        settings = settings.replace(pca_device=str(device))  # exact PCA with torch on the GPU
    rank, _ = distributed_context()
    reporter = RoundProgress(log or logger, f"AIVA {label}", settings.log_every_s, bar=progress and rank == 0)
    common = dict(
        device=device,
        num_workers=num_workers,
        image_key=image_key,
        index_key=index_key,
        amp=amp,
        amp_kwargs=amp_kwargs,
        site_context=site_context,
        progress=reporter,
    )
    embedded = embed_sites(network, tap, source_dataset, target_dataset, settings, **common)
    try:
        result = cluster_embedded(embedded, n_clusters, settings, init_embedding=init_embedding, progress=reporter)
        start = time.perf_counter()
        result.source_means = compute_source_means(
            result, embedded, n_clusters, settings, network=network, tap=tap, source_dataset=source_dataset, **common
        )
        result.timings = {"embed": embedded.seconds, **result.timings, "means": time.perf_counter() - start}
    finally:
        embedded.close()
        reporter.close()
    return result


def _broadcast_buffers(network) -> None:
    import torch.distributed as dist

    for buffer in network.buffers():
        dist.broadcast(buffer, src=0)


def _all_gather_rows(rows, world_size: int) -> list:
    import torch.distributed as dist

    gathered = [None] * world_size
    dist.all_gather_object(gathered, rows)
    return [row for part in gathered for row in part]


def _features_shape(network, tap, dataset, image_key, device, settings):
    image = torch.as_tensor(dataset[0][image_key])[None].to(device)
    features = (
        encode(network, image, tap.module_name if tap is not None else None)
        if settings.encoder_only or tap is None
        else (network(image), tap.features)[1]
    )
    if tap is not None:
        tap.features = None
    return tuple(features.shape[1:])
