"""Ignite handlers, one idea a module: per-epoch clustering and matching for AIVA (``aiva_clustering``, with
``site_counts`` for several source sites, ``clustering_state`` for its checkpoints, ``background_round`` for its
overlapped rounds and ``background`` for their worker process), checkpoint savers' state (``saver_state``),
per-volume surface Dice (``surface_dice``) and time-based progress lines (``progress_log``)."""

from aiva_monai.handlers.aiva_clustering import AIVAClusteringHandler
from aiva_monai.handlers.progress_log import ProgressLogHandler
from aiva_monai.handlers.saver_state import SaverState
from aiva_monai.handlers.site_counts import per_group_cluster_counts, source_slice_groups
from aiva_monai.handlers.surface_dice import SurfaceDiceHandler

__all__ = [
    "AIVAClusteringHandler",
    "ProgressLogHandler",
    "SaverState",
    "SurfaceDiceHandler",
    "per_group_cluster_counts",
    "source_slice_groups",
]
