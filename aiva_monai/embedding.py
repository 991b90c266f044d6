"""The embedding pass: run a network over every source and target slice and cluster both sites.

Ignite-free, so evaluation scripts and the clustering handler share it.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from monai.data import DataLoader
from tqdm.auto import tqdm

from aiva_monai.clustering import ClusterMeanAccumulator, FeatureProjector, SiteClustering, cluster_sketches
from aiva_monai.networks import BottleneckTap, _unwrap

__all__ = ["embed_and_cluster", "iterate_features", "distributed_context"]


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

logger = logging.getLogger(__name__)


def iterate_features(network, tap: BottleneckTap, dataset, *, device, batch_size=32, num_workers=0,
                     image_key="image", index_key="index", amp=False, amp_kwargs=None, progress=True, site="slices",
                     rank=0, world_size=1):
    """Yield (bottleneck features (B, ...), position of the batch's first sample) over ``dataset`` in order.

    The caller sets eval mode and disables gradients. Samples carrying ``index_key`` must carry their
    own position (checked), so cluster ids can later be looked up by that index. With ``world_size`` > 1
    only the batches ``rank``, ``rank + world_size``, ... are run (the same batches as in one process).
    """
    if world_size > 1:
        shard = _batch_shard(len(dataset), batch_size, rank, world_size)
        loader = DataLoader(dataset, batch_sampler=shard, num_workers=num_workers)
        starts = [indices[0] for indices in shard]
    else:
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        starts = None
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
        with torch.autocast(torch.device(device).type, enabled=amp, **(amp_kwargs or {})):
            network(images)
        features = tap.features
        if not bool(torch.isfinite(features).all()):
            raise ValueError(f"non-finite bottleneck features for {site} slices {position}..{position + len(images) - 1}.")
        yield features, position
        position += len(images)


def embed_and_cluster(network, tap: BottleneckTap, source_dataset, target_dataset, n_clusters: int = 12, *,
                      device="cpu", batch_size=32, num_workers=0, image_key="image", index_key="index", amp=False,
                      amp_kwargs=None, sketch_dim=1024, seed=0, progress=True, label="", **cluster_kwargs) -> SiteClustering:
    """One clustering round (paper, Algorithm 1 steps 1-5) with ``network`` in eval mode.

    Pass 1 streams every source and target slice through the network and keeps only the projected
    bottleneck (``sketch_dim`` values per slice); ``cluster_sketches`` clusters and matches; pass 2
    streams the source slices again to average their full bottleneck per source cluster.

    Args:
        network, tap: the network and a ``BottleneckTap`` on it.
        source_dataset, target_dataset: slice datasets (only ``image_key`` is read).
        n_clusters: k.
        cluster_kwargs: ``pca_components``, ``tsne_method``, ``perplexity``, ``n_jobs``, ``kmeans_n_init``.

    Returns:
        SiteClustering with ``source_means`` (k, D) on ``device`` and timings of every stage.
    """
    if torch.device(device).type == "cuda":
        cluster_kwargs.setdefault("pca_device", device)  # exact PCA with torch on the GPU
    rank, world_size = distributed_context()
    options = dict(device=device, batch_size=batch_size, num_workers=num_workers, image_key=image_key,
                   index_key=index_key, amp=amp, amp_kwargs=amp_kwargs, progress=progress and rank == 0,
                   rank=rank, world_size=world_size)
    wrapper, network = network, _unwrap(network)  # the plain module: no DDP collectives per forward
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            if world_size > 1:
                _broadcast_buffers(network)  # BN running statistics drift per rank between DDP forwards
            start = time.perf_counter()
            projector, sketches = None, {}
            for site, dataset in (("source", source_dataset), ("target", target_dataset)):
                rows = []
                for features, position in iterate_features(network, tap, dataset, site=site, **options):
                    if projector is None:
                        projector = FeatureProjector(features[0].numel(), sketch_dim, seed)
                    rows.append((position, projector(features).cpu().numpy()))
                if world_size > 1:
                    rows = _all_gather_rows(rows, world_size)
                sketches[site] = np.concatenate([row for _, row in sorted(rows, key=lambda item: item[0])])
            embed_time = time.perf_counter() - start
            logger.info(
                f"AIVA {label}embedded {len(sketches['source'])} source + {len(sketches['target'])} target slices "
                f"in {embed_time:.1f} s{f' on {world_size} ranks' if world_size > 1 else ''}; "
                "clustering (PCA, t-SNE, k-means, matching)"
            )
            if world_size > 1:
                # one clustering for all ranks: rank 0 computes it, the others receive it
                start = time.perf_counter()
                shared = [cluster_sketches(sketches["source"], sketches["target"], n_clusters, seed=seed, **cluster_kwargs)
                          if rank == 0 else None]
                import torch.distributed as dist

                dist.broadcast_object_list(shared, src=0)
                result = shared[0]
                result.timings = {**result.timings, "broadcast": time.perf_counter() - start - sum(result.timings.values())}
            else:
                result = cluster_sketches(sketches["source"], sketches["target"], n_clusters, seed=seed, **cluster_kwargs)
            start = time.perf_counter()
            n_features = int(np.prod(_unwrap_features_shape(tap, network, source_dataset, image_key, device))) if projector is None \
                else projector.n_features
            accumulator = ClusterMeanAccumulator(n_clusters, n_features, device)
            for features, position in iterate_features(network, tap, source_dataset, site="source means", **options):
                accumulator.update(features, result.source_labels[position : position + len(features)])
            if world_size > 1:
                import torch.distributed as dist

                dist.all_reduce(accumulator.sums)
                dist.all_reduce(accumulator.counts)
            result.source_means = accumulator.means()
            result.timings = {"embed": embed_time, **result.timings, "means": time.perf_counter() - start}
    finally:
        network.train(was_training)
        tap.features = None
        del wrapper
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


def _unwrap_features_shape(tap, network, dataset, image_key, device):
    # a rank with no embedding batch (fewer batches than ranks) still needs D for the all-reduce
    image = torch.as_tensor(dataset[0][image_key])[None].to(device)
    network(image)
    shape = tuple(tap.features.shape[1:])
    tap.features = None
    return shape
