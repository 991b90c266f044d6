"""Cluster matching and the AIVA alignment loss (paper, Algorithm 1 and eq. 2).

Pure functions: no Ignite, no state. ``match_clusters`` runs once per adaptation epoch on the
2D embedding; ``alignment_loss`` runs every mini-batch on full-dimensional bottleneck features.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "match_clusters",
    "matched_cost",
    "cluster_sums",
    "matched_alignment",
    "alignment_loss",
    "all_reduce_cluster_sums",
    "global_alignment_loss",
]


def _as_centers(name: str, centers) -> np.ndarray:
    array = np.asarray(centers, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"{name} must be a (k, d) array, got shape {array.shape}.")
    if array.shape[0] == 0:
        raise ValueError(f"{name} is empty: k must be at least 1.")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} holds non-finite values (NaN or Inf).")
    return array


def match_clusters(source_centers, target_centers) -> np.ndarray:
    """Hungarian matching of target clusters to source clusters.

    Args:
        source_centers: (k, d) source cluster centres.
        target_centers: (k, d) target cluster centres.

    Returns:
        perm: (k,) int64 array; ``perm[i]`` is the source cluster matched to target cluster ``i``,
        minimising ``sum_i ||target_centers[i] - source_centers[perm[i]]||^2`` over permutations.

    Raises:
        ValueError: on a shape mismatch, k = 0 or a non-finite value.
    """
    source = _as_centers("source_centers", source_centers)
    target = _as_centers("target_centers", target_centers)
    if source.shape != target.shape:
        raise ValueError(
            f"source_centers {source.shape} and target_centers {target.shape} must have the same (k, d) shape."
        )
    cost = ((target[:, None, :] - source[None, :, :]) ** 2).sum(axis=-1)  # (k_target, k_source)
    rows, cols = linear_sum_assignment(cost)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return perm


def matched_cost(source_centers, target_centers, match) -> float:
    """Sum over target clusters of the squared distance to their matched source centre."""
    source = _as_centers("source_centers", source_centers)
    target = _as_centers("target_centers", target_centers)
    return float(((target - source[np.asarray(match)]) ** 2).sum())


def _flat_features(target_features: torch.Tensor) -> torch.Tensor:
    if target_features.ndim < 2:
        raise ValueError(f"target_features must be (B, ...) with B samples, got shape {tuple(target_features.shape)}.")
    features = target_features.reshape(target_features.shape[0], -1)
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()  # squared distances of large vectors overflow/lose precision in half types
    return features


def cluster_sums(target_features: torch.Tensor, target_clusters, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums and counts of a batch's flattened features.

    Args:
        target_features: (B, ...) features; flattened per sample to D values (half types computed in float32).
        target_clusters: (B,) cluster id of each sample in [0, n_clusters), or -1 for a sample with no cluster.
        n_clusters: k.

    Returns:
        sums: (k, D) differentiable in ``target_features``; counts: (k,) of the same dtype, not differentiable.
    """
    features = _flat_features(target_features)
    clusters = torch.as_tensor(target_clusters).long().reshape(-1)
    if clusters.numel() != features.shape[0]:
        raise ValueError(f"target_clusters has {clusters.numel()} entries for a batch of {features.shape[0]} samples.")
    if clusters.numel() and int(clusters.max()) >= n_clusters:
        raise ValueError(f"target cluster id {int(clusters.max())} is out of range for k = {n_clusters}.")
    # index bookkeeping stays on the clusters' own device (the CPU in the trainer): no GPU sync per step
    assigned = torch.nonzero(clusters >= 0).reshape(-1)
    index = clusters[assigned].to(features.device, non_blocking=True)
    rows = assigned.to(features.device, non_blocking=True)
    sums = torch.zeros(n_clusters, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, index, features.index_select(0, rows))
    counts = torch.zeros(n_clusters, dtype=features.dtype, device=features.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=features.dtype))
    return sums, counts


def matched_alignment(
    target_means: torch.Tensor,
    clusters: torch.Tensor,
    source_means: torch.Tensor,
    match,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum over ``clusters`` i of ``weights[i] * ||target_means[i] - source_means[match[i]]||^2``.

    Args:
        target_means: (k, D) target cluster means (rows outside ``clusters`` are not read).
        clusters: (n,) int64 ids of the clusters that take part (e.g. those present in the batch).
        source_means: (k, D) source cluster means; a constant (no gradient reaches it).
        match: (k,) ``match[i]`` = source cluster matched to target cluster ``i``.
        weights: optional (k,) per-cluster weights (default 1).
    """
    match_t = torch.as_tensor(np.asarray(match)).long().reshape(-1)
    if source_means.ndim != 2 or source_means.shape[1] != target_means.shape[1]:
        raise ValueError(
            f"source_means must be (k, {target_means.shape[1]}) to match the flattened target features, "
            f"got {tuple(source_means.shape)}."
        )
    if match_t.numel() != source_means.shape[0]:
        raise ValueError(f"match has {match_t.numel()} entries for {source_means.shape[0]} source clusters.")
    if clusters.numel() == 0:
        return target_means.sum() * 0.0
    device = target_means.device
    anchor_ids = match_t.to(source_means.device)[clusters.to(source_means.device)]
    anchors = source_means.detach()[anchor_ids].to(device=device, dtype=target_means.dtype)
    distances = ((target_means.index_select(0, clusters.to(device)) - anchors) ** 2).sum(dim=1)
    if weights is not None:
        distances = distances * weights.to(device, target_means.dtype).index_select(0, clusters.to(device))
    return distances.sum()


def alignment_loss(
    target_features: torch.Tensor,
    target_clusters: torch.Tensor,
    source_means: torch.Tensor,
    match,
) -> torch.Tensor:
    """AIVA alignment loss, eq. (2) of the paper.

    For every cluster ``i`` present in the batch: ``||mean of its target features - source_means[match[i]]||^2``,
    summed over those clusters.

    Args:
        target_features: (B, ...) bottleneck features of the target batch; flattened per sample to D values.
        target_clusters: (B,) integer cluster id of each sample; -1 marks a sample with no cluster.
        source_means: (k, D) mean source feature of each source cluster. Treated as a constant
            (no gradient reaches it).
        match: (k,) ``match[i]`` is the source cluster matched to target cluster ``i``.

    Returns:
        A scalar tensor (float32 or wider). Zero, still attached to ``target_features``' graph, when no
        sample of the batch carries a cluster.
    """
    features = _flat_features(target_features)
    if source_means.ndim != 2 or source_means.shape[1] != features.shape[1]:
        raise ValueError(
            f"source_means must be (k, {features.shape[1]}) to match the flattened target features, "
            f"got {tuple(source_means.shape)}."
        )
    sums, counts = cluster_sums(features, target_clusters, source_means.shape[0])
    present = torch.nonzero(counts > 0).reshape(-1)
    means = sums / counts.clamp_min(1)[:, None]
    return matched_alignment(means, present, source_means, match)


def all_reduce_cluster_sums(sums: torch.Tensor, counts: torch.Tensor, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cluster_sums`` of the union of every process's batch (torch.distributed): the (k, D) sums are
    all-reduced differentiably (``torch.distributed.nn.functional.all_reduce``), the (k,) counts plainly.
    Under DistributedDataParallel the gradient of a loss of these sums equals the single-process gradient
    on the concatenated batch: the all-reduce's backward sums the W ranks' identical upstream gradients
    and DDP divides the parameter gradients by W."""
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    counts = counts.clone()
    dist.all_reduce(counts, group=group)
    return all_reduce(sums, group=group), counts


def global_alignment_loss(
    target_features: torch.Tensor,
    target_clusters: torch.Tensor,
    source_means: torch.Tensor,
    match,
    group=None,
) -> tuple[torch.Tensor, bool]:
    """``alignment_loss`` of the union of every process's target batch (torch.distributed), see
    ``all_reduce_cluster_sums``: every rank gets the loss a single process computes on the concatenated batch.

    Returns:
        (loss, whether any sample of the global batch carries a cluster).
    """
    features = _flat_features(target_features)
    k = int(np.asarray(match).size)
    if source_means.ndim != 2 or source_means.shape[1] != features.shape[1] or source_means.shape[0] != k:
        raise ValueError(f"source_means must be ({k}, {features.shape[1]}), got {tuple(source_means.shape)}.")
    sums, counts = all_reduce_cluster_sums(*cluster_sums(features, target_clusters, k), group=group)
    present = torch.nonzero(counts > 0).reshape(-1)
    if present.numel() == 0:
        return features.sum() * 0.0, False
    means = sums / counts.clamp_min(1)[:, None]
    return matched_alignment(means, present, source_means, match), True
