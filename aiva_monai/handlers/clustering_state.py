"""A ``SiteClustering`` as a checkpointable dict of tensors, and back (``AIVAClusteringHandler.state_dict``)."""

from __future__ import annotations

import numpy as np
import torch

from aiva_monai.clustering import SiteClustering

__all__ = ["clustering_to_state", "clustering_from_state"]

_ARRAY_FIELDS = ("source_labels", "target_labels", "embedding", "source_centers", "target_centers", "match")


def clustering_to_state(result: SiteClustering, epoch: int) -> dict:
    """``result`` (clustered at ``epoch``) as a dict of tensors and plain values that ``torch.save`` keeps."""
    state = {name: torch.as_tensor(np.asarray(getattr(result, name))) for name in _ARRAY_FIELDS}
    state.update(
        clustered_epoch=int(epoch),
        matched_cost=float(result.matched_cost),
        perplexity=float(result.perplexity),
        source_means=result.source_means.detach().cpu(),
        timings={k: float(v) for k, v in result.timings.items()},
        warm_started=bool(result.warm_started),
        match_space=str(result.match_space),
    )
    if result.source_rows is not None:
        state["source_rows"] = torch.as_tensor(result.source_rows)
    return state


def clustering_from_state(state: dict, n_clusters: int) -> SiteClustering:
    """The ``SiteClustering`` of ``clustering_to_state``; ValueError when it holds another number of clusters."""
    arrays = {name: torch.as_tensor(state[name]).numpy() for name in _ARRAY_FIELDS}
    result = SiteClustering(
        **arrays,
        matched_cost=float(state["matched_cost"]),
        source_means=torch.as_tensor(state["source_means"]).float(),
        perplexity=float(state["perplexity"]),
        timings=dict(state["timings"]),
        warm_started=bool(state.get("warm_started", False)),
        match_space=str(state.get("match_space", "tsne")),
        source_rows=torch.as_tensor(state["source_rows"]).numpy() if "source_rows" in state else None,
    )
    if result.n_clusters != n_clusters:
        raise ValueError(f"checkpoint holds {result.n_clusters} clusters, the handler is set up for {n_clusters}.")
    return result
