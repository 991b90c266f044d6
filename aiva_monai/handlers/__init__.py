"""Ignite handlers, one idea a module: per-epoch clustering and matching for AIVA (``aiva_clustering``, with
``site_counts`` for several source sites, ``clustering_state`` for its checkpoints, ``background_round`` for its
overlapped rounds and ``background`` for their worker process), checkpoint savers' state (``saver_state``)
and per-volume surface Dice (``surface_dice``)."""

from aiva_monai.handlers.aiva_clustering import AIVAClusteringHandler
from aiva_monai.handlers.saver_state import SaverState
from aiva_monai.handlers.site_counts import per_group_cluster_counts, source_slice_groups
from aiva_monai.handlers.surface_dice import SurfaceDiceHandler

__all__ = [
    "AIVAClusteringHandler",
    "SaverState",
    "SurfaceDiceHandler",
    "per_group_cluster_counts",
    "source_slice_groups",
]
