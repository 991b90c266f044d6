"""The embedding pass: run a network over every source and target slice and cluster both sites.

Ignite-free, so evaluation scripts and the clustering handler share it.
"""

from __future__ import annotations

import logging
import time

import torch
from monai.data import DataLoader
from tqdm.auto import tqdm

from aiva_monai.clustering import ClusterMeanAccumulator, FeatureProjector, SiteClustering, cluster_sketches
from aiva_monai.networks import BottleneckTap

__all__ = ["embed_and_cluster", "iterate_features"]

logger = logging.getLogger(__name__)


def iterate_features(network, tap: BottleneckTap, dataset, *, device, batch_size=32, num_workers=0,
                     image_key="image", index_key="index", amp=False, amp_kwargs=None, progress=True, site="slices"):
    """Yield (bottleneck features (B, ...), position of the batch's first sample) over ``dataset`` in order.

    The caller sets eval mode and disables gradients. Samples carrying ``index_key`` must carry their
    own position (checked), so cluster ids can later be looked up by that index.
    """
    position = 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    for batch in tqdm(loader, desc=f"AIVA embedding {site}", disable=not progress, leave=False):
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
    options = dict(device=device, batch_size=batch_size, num_workers=num_workers, image_key=image_key,
                   index_key=index_key, amp=amp, amp_kwargs=amp_kwargs, progress=progress)
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            start = time.perf_counter()
            projector, sketches = None, {}
            for site, dataset in (("source", source_dataset), ("target", target_dataset)):
                rows = []
                for features, _ in iterate_features(network, tap, dataset, site=site, **options):
                    if projector is None:
                        projector = FeatureProjector(features[0].numel(), sketch_dim, seed)
                    rows.append(projector(features).cpu())
                sketches[site] = torch.cat(rows).numpy()
            embed_time = time.perf_counter() - start
            logger.info(
                f"AIVA {label}embedded {len(sketches['source'])} source + {len(sketches['target'])} target slices "
                f"in {embed_time:.1f} s; clustering (PCA, t-SNE, k-means, matching)"
            )
            result = cluster_sketches(sketches["source"], sketches["target"], n_clusters, seed=seed, **cluster_kwargs)
            start = time.perf_counter()
            accumulator = None
            for features, position in iterate_features(network, tap, source_dataset, site="source means", **options):
                if accumulator is None:
                    accumulator = ClusterMeanAccumulator(n_clusters, features[0].numel(), features.device)
                accumulator.update(features, result.source_labels[position : position + len(features)])
            result.source_means = accumulator.means()
            result.timings = {"embed": embed_time, **result.timings, "means": time.perf_counter() - start}
    finally:
        network.train(was_training)
    return result
