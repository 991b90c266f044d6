"""The embedding pass: run a network over every source and target slice and cluster both sites.

Ignite-free, so evaluation scripts and the clustering handler share it. One round is three steps, also
callable one by one (the handler's ``overlap`` mode runs the middle one in a background process):

1. ``embed_sites``: one pass over every target slice and every ``settings.source_stride``-th source slice
   (all by default), encoder only (``networks.encode``),
   in eval mode. Each slice's bottleneck is projected to a sketch (``FeatureProjector``); each source
   slice's full bottleneck is also kept in a ``FeatureStore`` (float16 in memory up to a budget, the rest
   in a temporary file), so no second pass is needed for the source means.
2. ``cluster_embedded``: ``cluster_sketches`` on the sketches (PCA, t-SNE, k-means, matching); under
   torch.distributed rank 0 computes it and broadcasts it.
3. ``compute_source_means``: the full-dimensional mean of every source cluster, summed from the store
   (or, with ``source_means="second_pass"``, from a second pass through the network).

What the round computes comes from one ``ClusteringSettings``; how the network is run (device, loader
workers, keys, AMP, per-site context) from one ``NetworkPass`` (``aiva_monai.network_pass``).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from aiva_monai.clustering import (
    ClusteringSettings,
    ClusterMeanAccumulator,
    FeatureProjector,
    FeatureStore,
    SiteClustering,
    cluster_sketches,
    slice_positions,
)
from aiva_monai.network_pass import (
    EvalMode,
    EveryNth,
    NetworkPass,
    all_gather_rows,
    broadcast_buffers,
    distributed_context,
    features_shape,
    iterate_features,
    pass_dtype,
)
from aiva_monai.networks import BottleneckTap
from aiva_monai.progress import RoundProgress

__all__ = [
    "NetworkPass",
    "embed_and_cluster",
    "embed_sites",
    "clustered_source",
    "cluster_embedded",
    "compute_source_means",
    "EmbeddedSites",
]

logger = logging.getLogger(__name__)


@dataclass
class EmbeddedSites:
    """What one embedding pass leaves for the clustering and the source means.

    Attributes:
        source_sketch, target_sketch: (n_s, m), (n_t, m) float32 sketches, all rows (gathered over ranks).
        source_positions, target_positions: slice positions in [0, 1], or None when not needed.
        store: the source slices' full features (this rank's rows), or None with ``second_pass``.
        n_features: D, the flattened bottleneck size.
        seconds: wall time of the pass.
        source_rows: (n_s,) positions in the source dataset of the embedded source slices, or None (all).
    """

    source_sketch: np.ndarray
    target_sketch: np.ndarray
    source_positions: np.ndarray | None
    target_positions: np.ndarray | None
    store: FeatureStore | None
    n_features: int
    seconds: float
    source_rows: np.ndarray | None = None

    def cluster(self, n_clusters: int, settings: ClusteringSettings, *, init_embedding=None, progress=None, run=None):
        """``cluster_sketches`` on these sketches; ``run(function, *args, **kwargs)`` calls it (default: here; e.g.
        an executor's ``submit``, which then returns a future)."""
        run = run or (lambda function, *args, **kwargs: function(*args, **kwargs))
        return run(
            cluster_sketches,
            self.source_sketch,
            self.target_sketch,
            n_clusters,
            settings,
            source_positions=self.source_positions,
            target_positions=self.target_positions,
            init_embedding=init_embedding,
            progress=progress,
        )

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def clustered_source(source_dataset, settings: ClusteringSettings, network_pass: NetworkPass = NetworkPass()):
    """The source slices a round clusters: ``source_dataset`` itself, or every ``settings.source_stride``-th
    slice of it (an ``EveryNth`` view whose ``rows`` name them)."""
    if settings.source_stride == 1:
        return source_dataset
    return EveryNth(source_dataset, settings.source_stride, network_pass.index_key)


def embed_sites(
    network,
    tap: BottleneckTap | None,
    source_dataset,
    target_dataset,
    settings: ClusteringSettings,
    network_pass: NetworkPass = NetworkPass(),
    progress: RoundProgress | None = None,
    *,
    site_networks: dict | None = None,
) -> EmbeddedSites:
    """Step 1: one eval-mode pass over every source and target slice (see the module docstring).

    ``network_pass.site_context(site)``, when given, is entered around each site's pass ("source", then
    "target"), inside eval mode (e.g. to swap in per-site BatchNorm statistics). ``tap`` names the bottleneck
    module (``tap.module_name``); without ``encoder_only`` it also records the features.

    ``site_networks``: {"source": module, "target": module} made by ``network_pass.site_snapshots`` (each
    inside its site's context): each site's pass runs its copy, no site context is entered, and neither
    ``network`` nor ``tap`` is touched (only ``tap.module_name`` is read), so training may go on meanwhile
    in another thread (the handler's ``overlap_embedding``).
    """
    rank, world_size = distributed_context()
    all_source = source_dataset
    source_dataset = clustered_source(all_source, settings, network_pass)
    source_rows = getattr(source_dataset, "rows", None)
    n_total = len(source_dataset) + len(target_dataset)
    detail = "encoder only" if settings.encoder_only else "full network"
    detail += ", " + pass_dtype(network_pass.device, settings.precision, network_pass.amp, network_pass.amp_kwargs)
    if source_rows is not None:
        detail += f", 1 in {settings.source_stride} of {len(all_source)} source slices"
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
    module_name = tap.module_name if tap is not None else None
    with contextlib.ExitStack() as scopes:
        if site_networks is None:
            plain = scopes.enter_context(EvalMode(network, tap))
            if world_size > 1:
                broadcast_buffers(plain)  # BN running statistics drift per rank between DDP forwards
        else:
            scopes.enter_context(torch.no_grad())  # per thread: the training thread keeps its gradients
        for site, dataset in (("source", source_dataset), ("target", target_dataset)):
            if site_networks is None:
                runner, site_tap, site_scope = plain, tap, network_pass.site_scope(site)
            else:  # a copy with its own tap (the full-network pass reads the bottleneck from it)
                runner = site_networks[site]
                site_tap = scopes.enter_context(BottleneckTap(runner, module_name)) if tap is not None else None
                site_scope = contextlib.nullcontext()
            offset = 0 if site == "source" else len(source_dataset)

            def on_batch(size, site=site, offset=offset):
                done[0] += size * world_size  # the other ranks run their batches meanwhile
                if progress is not None:
                    progress("embed", min(done[0], n_total), n_total, site)

            rows = []
            with site_scope:
                for features, position in iterate_features(
                    runner,
                    site_tap,
                    dataset,
                    network_pass,
                    settings,
                    site=site,
                    rank=rank,
                    world_size=world_size,
                    on_batch=on_batch,
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
                rows = all_gather_rows(rows, world_size)
            sketches[site] = np.concatenate([row for _, row in sorted(rows, key=lambda item: item[0])])
        if projector is None:  # a rank with no batch (fewer batches than ranks) still needs D
            n_features = int(np.prod(features_shape(runner, site_tap, source_dataset, network_pass, settings)))
        else:
            n_features = projector.n_features
    if settings.source_means == "store" and store is None:
        store = FeatureStore(
            len(source_dataset), n_features, settings.store_dtype, settings.store_memory_mb, settings.store_dir
        )
    positions = (None, None)
    if settings.slice_position:
        source_positions = slice_positions(all_source)
        positions = (
            source_positions if source_rows is None else source_positions[source_rows],
            slice_positions(target_dataset),
        )
    seconds = time.perf_counter() - start
    if progress is not None:
        progress("embed", n_total, n_total)
    return EmbeddedSites(sketches["source"], sketches["target"], *positions, store, n_features, seconds, source_rows)


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
    run = lambda: embedded.cluster(n_clusters, settings, init_embedding=init_embedding, progress=progress)  # noqa: E731
    if world_size == 1:
        result = run()
    else:
        import torch.distributed as dist

        start = time.perf_counter()
        shared = [run() if rank == 0 else None]
        dist.broadcast_object_list(shared, src=0)
        result = shared[0]
        result.timings = {**result.timings, "broadcast": time.perf_counter() - start - sum(result.timings.values())}
    result.source_rows = embedded.source_rows
    return result


def compute_source_means(
    result: SiteClustering,
    embedded: EmbeddedSites,
    n_clusters: int,
    settings: ClusteringSettings,
    network_pass: NetworkPass = NetworkPass(),
    *,
    network=None,
    tap=None,
    source_dataset=None,
    progress: RoundProgress | None = None,
) -> torch.Tensor:
    """Step 3: (k, D) float32 mean full feature of every source cluster, on ``network_pass.device``.

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
            network_pass.device,
            progress=lambda done: report("means", min(done * world_size, n_source), n_source),
        )
    else:
        if network is None or source_dataset is None:
            raise ValueError("source_means='second_pass' needs the network, its tap and the source dataset.")
        accumulator = ClusterMeanAccumulator(n_clusters, embedded.n_features, network_pass.device)
        done = [0]

        def on_batch(size):
            done[0] += size * world_size
            report("means", min(done[0], n_source), n_source)

        with EvalMode(network, tap) as plain, network_pass.site_scope("source"):
            for features, position in iterate_features(
                plain,
                tap,
                clustered_source(source_dataset, settings, network_pass),
                network_pass,
                settings,
                site="source means",
                rank=rank,
                world_size=world_size,
                on_batch=on_batch,
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
    network_pass: NetworkPass = NetworkPass(),
    *,
    init_embedding=None,
    report: RoundProgress | None = None,
) -> SiteClustering:
    """One clustering round (paper, Algorithm 1 steps 1-5) with ``network`` in eval mode.

    Args:
        network, tap: the network and a ``BottleneckTap`` on it (its ``module_name`` is the bottleneck).
        source_dataset, target_dataset: slice datasets (only ``image_key`` is read; ``SliceDataset``
            when ``settings.slice_position`` > 0).
        n_clusters: k.
        settings: a ``ClusteringSettings`` (or a dict of settings, e.g. a bundle's ``cluster_options``;
            None: the defaults). On a CUDA device the PCA runs there unless ``pca_device`` is set.
        network_pass: how the network runs (device, workers, keys, AMP, per-site context).
        init_embedding: the previous round's embedding, for ``settings.tsne_warm_start``.
        report: where the round's progress goes: a ``RoundProgress`` (its logger, line prefix, interval
            and whether it draws bars; e.g. ``RoundProgress(logger, "AIVA epoch 3: ", bar=True)``). None:
            lines through this module's logger prefixed "AIVA ", at most ``settings.log_every_s`` seconds
            apart, no bar. Closed when the round ends.

    Returns:
        SiteClustering with ``source_means`` (k, D) on ``network_pass.device`` and the seconds of every stage in
        ``timings`` (``embed``, ``pca``, ``tsne``, ``kmeans``, ``match``, ``means``).
    """
    settings = ClusteringSettings.coerce(settings)
    if torch.device(network_pass.device).type == "cuda" and settings.pca_device is None:
        settings = settings.replace(pca_device=str(network_pass.device))  # exact PCA with torch on the GPU
    reporter = report or RoundProgress(logger, "AIVA ", settings.log_every_s)
    embedded = embed_sites(network, tap, source_dataset, target_dataset, settings, network_pass, reporter)
    try:
        result = cluster_embedded(embedded, n_clusters, settings, init_embedding=init_embedding, progress=reporter)
        start = time.perf_counter()
        result.source_means = compute_source_means(
            result,
            embedded,
            n_clusters,
            settings,
            network_pass,
            network=network,
            tap=tap,
            source_dataset=source_dataset,
            progress=reporter,
        )
        result.timings = {"embed": embedded.seconds, **result.timings, "means": time.perf_counter() - start}
    finally:
        embedded.close()
        reporter.close()
    return result
