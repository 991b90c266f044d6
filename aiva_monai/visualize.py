"""Figures: clusters of source and target in the joint 2D embedding (paper Fig. 3-4)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from aiva_monai.clustering import SiteClustering  # noqa: E402
from aiva_monai.io import atomic_path  # noqa: E402

__all__ = ["plot_clusterings", "save_figure_atomic"]


def save_figure_atomic(figure, path: str | Path, dpi: int = 110) -> Path:
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(figure)
    return Path(path)


def plot_clusterings(clusterings: dict[str, SiteClustering], path: str | Path, title: str = "") -> Path:
    """One panel per clustering (e.g. "before adaptation", "after adaptation").

    Source slices are dots, target slices crosses; source cluster j and the target cluster matched to
    it share colour j. Cluster centres are drawn large with their matched-pair number.
    """
    figure, axes = plt.subplots(1, len(clusterings), figsize=(6 * len(clusterings), 5.5), squeeze=False)
    colours = plt.get_cmap("tab20")
    for axis, (name, result) in zip(axes[0], clusterings.items()):
        n_source = len(result.source_labels)
        source_points, target_points = result.embedding[:n_source], result.embedding[n_source:]
        pair_of_target = np.asarray(result.match)  # target cluster i -> source cluster (= colour) match[i]
        axis.scatter(
            *source_points.T,
            c=[colours(j % 20) for j in result.source_labels],
            s=6,
            marker="o",
            alpha=0.5,
            linewidths=0,
        )
        axis.scatter(
            *target_points.T,
            c=[colours(pair_of_target[i] % 20) for i in result.target_labels],
            s=10,
            marker="x",
            alpha=0.6,
            linewidths=0.8,
        )
        for j, centre in enumerate(result.source_centers):
            axis.scatter(*centre, s=160, marker="o", color=colours(j % 20), edgecolors="black")
            axis.annotate(str(j), centre, ha="center", va="center", fontsize=7)
        for i, centre in enumerate(result.target_centers):
            axis.scatter(*centre, s=160, marker="X", color=colours(pair_of_target[i] % 20), edgecolors="black")
            axis.annotate(str(pair_of_target[i]), centre, ha="center", va="center", fontsize=7)
        axis.set_title(f"{name}\nmatched cost {result.matched_cost:.3g}", fontsize=10)
        axis.set_xticks([])
        axis.set_yticks([])
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color="grey", label="source slice"),
        plt.Line2D([], [], marker="x", linestyle="", color="grey", label="target slice"),
    ]
    figure.legend(handles=handles, loc="lower center", ncol=2, frameon=False)
    if title:
        figure.suptitle(title, fontsize=11)
    return save_figure_atomic(figure, path)
