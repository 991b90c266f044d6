"""Cluster matching and the AIVA alignment loss (paper, Algorithm 1 and eq. 2).

Pure functions: no Ignite, no state. ``match_clusters`` runs once per adaptation epoch on the
2D embedding; ``alignment_loss`` runs every mini-batch on full-dimensional bottleneck features.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["match_clusters", "matched_cost", "alignment_loss"]


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
    if target_features.ndim < 2:
        raise ValueError(f"target_features must be (B, ...) with B samples, got shape {tuple(target_features.shape)}.")
    batch_size = target_features.shape[0]
    features = target_features.reshape(batch_size, -1)
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()  # squared distances of large vectors overflow/lose precision in half types
    # index bookkeeping stays on the clusters' own device (the CPU in the trainer): no GPU sync per step
    clusters = torch.as_tensor(target_clusters).long().reshape(-1)
    if clusters.numel() != batch_size:
        raise ValueError(f"target_clusters has {clusters.numel()} entries for a batch of {batch_size} samples.")
    if source_means.ndim != 2 or source_means.shape[1] != features.shape[1]:
        raise ValueError(
            f"source_means must be (k, {features.shape[1]}) to match the flattened target features, "
            f"got {tuple(source_means.shape)}."
        )
    match_t = torch.as_tensor(np.asarray(match)).long().reshape(-1)
    if match_t.numel() != source_means.shape[0]:
        raise ValueError(f"match has {match_t.numel()} entries for {source_means.shape[0]} source clusters.")
    if clusters.numel() and int(clusters.max()) >= match_t.numel():
        raise ValueError(f"target cluster id {int(clusters.max())} is out of range for k = {match_t.numel()}.")

    assigned = clusters >= 0
    if not bool(assigned.any()):
        return features.sum() * 0.0
    present, inverse = torch.unique(clusters[assigned], return_inverse=True)
    counts = torch.bincount(inverse, minlength=present.numel()).to(features.dtype)
    # membership (n_present, n_assigned) with rows normalised: one matmul gives all cluster means
    membership = torch.zeros(present.numel(), inverse.numel(), dtype=features.dtype)
    membership[inverse, torch.arange(inverse.numel())] = 1.0
    membership = (membership / counts[:, None]).to(features.device, non_blocking=True)
    assigned_rows = torch.nonzero(assigned).reshape(-1).to(features.device, non_blocking=True)
    target_means = membership @ features.index_select(0, assigned_rows)
    anchor_ids = match_t.to(source_means.device)[present.to(source_means.device)]
    anchors = source_means.detach()[anchor_ids].to(device=features.device, dtype=features.dtype)
    return ((target_means - anchors) ** 2).sum()


def global_alignment_loss(
    target_features: torch.Tensor,
    target_clusters: torch.Tensor,
    source_means: torch.Tensor,
    match,
    group=None,
) -> tuple[torch.Tensor, bool]:
    """``alignment_loss`` of the union of every process's target batch (torch.distributed).

    Each rank sums its target features per cluster; the (k, D) sums and (k,) counts are all-reduced
    (the sums differentiably, ``torch.distributed.nn.functional.all_reduce``), so every rank gets the
    loss a single process would compute on the concatenated batch. Under DistributedDataParallel the
    gradient then equals the single-process gradient: the all-reduce's backward sums the W ranks'
    identical upstream gradients and DDP divides the parameter gradients by W.

    Returns:
        (loss, whether any sample of the global batch carries a cluster).
    """
    import torch.distributed as dist
    from torch.distributed.nn.functional import all_reduce

    batch_size = target_features.shape[0]
    features = target_features.reshape(batch_size, -1)
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    clusters = torch.as_tensor(target_clusters).long().reshape(-1)
    if clusters.numel() != batch_size:
        raise ValueError(f"target_clusters has {clusters.numel()} entries for a batch of {batch_size} samples.")
    match_t = torch.as_tensor(np.asarray(match)).long().reshape(-1)
    k = match_t.numel()
    if source_means.ndim != 2 or source_means.shape[1] != features.shape[1] or source_means.shape[0] != k:
        raise ValueError(f"source_means must be ({k}, {features.shape[1]}), got {tuple(source_means.shape)}.")
    if clusters.numel() and int(clusters.max()) >= k:
        raise ValueError(f"target cluster id {int(clusters.max())} is out of range for k = {k}.")
    assigned = torch.nonzero(clusters >= 0).reshape(-1)
    index = clusters[assigned].to(features.device)
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums = sums.index_add(0, index, features.index_select(0, assigned.to(features.device)))
    counts = torch.zeros(k, dtype=features.dtype, device=features.device)
    counts.index_add_(0, index, torch.ones_like(index, dtype=features.dtype))
    dist.all_reduce(counts, group=group)
    sums = all_reduce(sums, group=group)
    present = torch.nonzero(counts > 0).reshape(-1)
    if present.numel() == 0:
        return features.sum() * 0.0, False
    target_means = sums.index_select(0, present) / counts.index_select(0, present)[:, None]
    anchor_ids = match_t.to(source_means.device)[present.to(source_means.device)]
    anchors = source_means.detach()[anchor_ids].to(device=features.device, dtype=features.dtype)
    return ((target_means - anchors) ** 2).sum(), True
