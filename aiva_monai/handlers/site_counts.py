"""Several source sites clustered as one source: each slice's site, and each site's share of every cluster."""

from __future__ import annotations

import numpy as np


def source_slice_groups(dataset, key: str = "site") -> np.ndarray | None:
    """The ``key`` of every slice's volume entry, for a ``SliceDataset`` (None for other datasets)."""
    data, counts = getattr(dataset, "data", None), getattr(dataset, "slice_counts", None)
    if data is None or counts is None:
        return None
    return np.repeat(np.asarray([str(entry.get(key, "?")) for entry in data], dtype=object), counts)


def per_group_cluster_counts(groups: np.ndarray, labels: np.ndarray, n_clusters: int) -> dict:
    """For each group (site): slice count, per-cluster slice counts (k,), clusters used, largest share."""
    stats = {}
    for group in sorted(set(groups.tolist())):
        counts = np.bincount(np.asarray(labels)[groups == group], minlength=n_clusters)
        stats[group] = {
            "slices": int(counts.sum()),
            "cluster_counts": counts.tolist(),
            "clusters_used": int((counts > 0).sum()),
            "largest_share": float(counts.max() / max(1, counts.sum())),
        }
    return stats
