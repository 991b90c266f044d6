"""Ignite handlers: per-epoch clustering and matching for AIVA, and per-volume surface Dice."""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path
from collections.abc import Callable

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers.ignite_metric import IgniteMetricHandler
from monai.utils import CommonKeys as Keys

from aiva_monai.clustering import SiteClustering
from aiva_monai.embedding import embed_and_cluster
from aiva_monai.engines import ClusterAssignment
from aiva_monai.metrics import VolumeSurfaceDiceMetric

__all__ = ["AIVAClusteringHandler", "SaverState", "SurfaceDiceHandler", "per_group_cluster_counts", "source_slice_groups"]

_ARRAY_FIELDS = ("source_labels", "target_labels", "embedding", "source_centers", "target_centers", "match")


class AIVAClusteringHandler:
    """Re-clusters source and target at the start of every adaptation epoch of an ``AIVATrainer``.

    At ``EPOCH_STARTED`` (every ``interval`` epochs) it runs the network in eval mode over every source
    and every target slice (no gradients), reduces each bottleneck map with a ``FeatureProjector``,
    clusters both sites (``cluster_sketches``: joint PCA, joint t-SNE, per-site k-means, Hungarian
    matching), then makes a second pass over the source slices to average their full bottleneck
    features per source cluster. The trainer receives the target cluster ids and the source means as
    ``engine.state.aiva_assignment``. Host memory stays at (n_s + n_t) x ``sketch_dim`` floats plus one
    batch, whatever the bottleneck size.

    Args:
        source_dataset: labelled source slices (only ``image_key`` is read).
        target_dataset: unlabelled target slices, in the order of their ``index`` values: sample ``i``
            must carry ``index == i``, as ``aiva_monai.data.SliceDataset`` does.
        n_clusters: k (paper: 12).
        interval: re-cluster every this many epochs.
        batch_size, num_workers: of the embedding passes.
        image_key, index_key: keys of the image and of the dataset index in a sample.
        pca_components, sketch_dim, tsne_method, perplexity, seed, n_jobs: see ``cluster_sites``.
        progress: show a progress bar over the embedding batches (default: when stderr is a terminal).
        group_key: volume entry key naming each source slice's site (``SliceDataset`` data). When the
            source holds several sites (leave-one-site-out), their union is clustered as one source and
            each site's share of every source cluster is logged and kept in ``history``.
        name: logger name.

    The clustering of the current epoch is in ``state_dict()`` / ``load_state_dict()``: save the handler
    with the checkpoint and a run resumed mid-epoch continues with the same clusters and means.
    """

    def __init__(
        self,
        source_dataset,
        target_dataset,
        n_clusters: int = 12,
        interval: int = 1,
        batch_size: int = 32,
        num_workers: int = 0,
        image_key: str = Keys.IMAGE,
        index_key: str = "index",
        pca_components: int = 20,
        sketch_dim: int = 1024,
        tsne_method: str = "opentsne",
        perplexity: float = 30.0,
        seed: int = 0,
        n_jobs: int = -1,
        progress: bool | None = None,
        group_key: str | None = "site",
        name: str | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}.")
        self.source_dataset = source_dataset
        self.target_dataset = target_dataset
        self.n_clusters = int(n_clusters)
        self.interval = int(interval)
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.image_key = image_key
        self.index_key = index_key
        self.cluster_kwargs = dict(pca_components=pca_components, tsne_method=tsne_method, perplexity=perplexity, n_jobs=n_jobs)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.source_groups = source_slice_groups(source_dataset, group_key) if group_key else None
        self.logger = logging.getLogger(name or __name__)
        self.clustering: SiteClustering | None = None
        self.clustered_epoch: int | None = None
        self.history: list[dict] = []

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine, "bottleneck_tap"):
            raise TypeError(f"AIVAClusteringHandler needs an AIVATrainer, got {type(engine).__name__}.")
        for site, dataset in (("source", self.source_dataset), ("target", self.target_dataset)):
            if len(dataset) < self.n_clusters:
                raise ValueError(
                    f"the {site} dataset has {len(dataset)} slices, fewer than n_clusters={self.n_clusters}."
                )
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        due = (epoch - 1) % self.interval == 0
        if self.clustering is None or (due and self.clustered_epoch != epoch):
            self.run_clustering(engine)
        self._hand_over(engine)

    # -- the clustering round -------------------------------------------------------------------

    def run_clustering(self, engine: Engine) -> SiteClustering:
        """One clustering round; stores and returns the ``SiteClustering`` (with ``source_means``)."""
        epoch = engine.state.epoch
        result = embed_and_cluster(
            engine.network,
            engine.bottleneck_tap,
            self.source_dataset,
            self.target_dataset,
            self.n_clusters,
            device=engine.state.device,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            image_key=self.image_key,
            index_key=self.index_key,
            amp=engine.amp,
            amp_kwargs=engine.amp_kwargs,
            sketch_dim=self.sketch_dim,
            seed=self.seed,
            progress=self.progress,
            label=f"epoch {epoch}: ",
            **self.cluster_kwargs,
        )
        self.clustering, self.clustered_epoch = result, epoch
        summary = {
            "epoch": epoch,
            "n_source": int(len(result.source_labels)),
            "n_target": int(len(result.target_labels)),
            "n_clusters": self.n_clusters,
            "matched_cost": float(result.matched_cost),
            "source_cluster_min": int(result.source_sizes.min()),
            "source_cluster_max": int(result.source_sizes.max()),
            "target_cluster_min": int(result.target_sizes.min()),
            "target_cluster_max": int(result.target_sizes.max()),
            **{f"time_{stage}": float(seconds) for stage, seconds in result.timings.items()},
        }
        if self.source_groups is not None and len(set(self.source_groups)) > 1:
            summary["source_sites"] = per_group_cluster_counts(self.source_groups, result.source_labels, self.n_clusters)
        self.history.append(summary)
        times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
        self.logger.info(
            f"AIVA epoch {epoch}: k={self.n_clusters}, source clusters of {summary['source_cluster_min']}-"
            f"{summary['source_cluster_max']} slices, target clusters of {summary['target_cluster_min']}-"
            f"{summary['target_cluster_max']} slices; {times}; matched cost {result.matched_cost:.3g}"
        )
        if "source_sites" in summary:
            self.logger.info(
                f"AIVA epoch {epoch}: source sites (one source for the clustering): "
                + "; ".join(
                    f"{site} {stats['slices']} slices in {stats['clusters_used']}/{self.n_clusters} clusters, "
                    f"at most {100 * stats['largest_share']:.0f}% in one"
                    for site, stats in summary["source_sites"].items()
                )
            )
        return result

    def _hand_over(self, engine: Engine) -> None:
        result = self.clustering
        engine.state.aiva_assignment = ClusterAssignment(
            target_labels=torch.as_tensor(result.target_labels).long(),
            source_means=result.source_means.to(engine.state.device),
            match=torch.as_tensor(result.match).long(),
            epoch=self.clustered_epoch,
        )

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.clustering is None:
            return {"clustered_epoch": -1, "history": list(self.history)}
        result = self.clustering
        state = {name: torch.as_tensor(np.asarray(getattr(result, name))) for name in _ARRAY_FIELDS}
        state.update(
            clustered_epoch=int(self.clustered_epoch),
            matched_cost=float(result.matched_cost),
            perplexity=float(result.perplexity),
            source_means=result.source_means.detach().cpu(),
            timings={k: float(v) for k, v in result.timings.items()},
            history=list(self.history),
        )
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        if state["clustered_epoch"] < 0:
            self.clustering, self.clustered_epoch = None, None
            return
        arrays = {name: torch.as_tensor(state[name]).numpy() for name in _ARRAY_FIELDS}
        self.clustering = SiteClustering(
            **arrays,
            matched_cost=float(state["matched_cost"]),
            source_means=torch.as_tensor(state["source_means"]).float(),
            perplexity=float(state["perplexity"]),
            timings=dict(state["timings"]),
        )
        if self.clustering.n_clusters != self.n_clusters:
            raise ValueError(
                f"checkpoint holds {self.clustering.n_clusters} clusters, the handler is set up for {self.n_clusters}."
            )
        self.clustered_epoch = int(state["clustered_epoch"])


class SaverState:
    """What MONAI ``CheckpointSaver`` objects remember between saves (the best key-metric score so far,
    the files they keep), and the evaluator's best metric, as one checkpointable object.

    Put it in the periodic checkpoint's ``save_dict``: a resumed run then keeps the uninterrupted run's
    best model (instead of overwriting ``model.pt`` with its first validation) and replaces the
    checkpoint it resumed from (``n_saved``) instead of leaving it behind. The periodic saver itself
    holds this object in its ``save_dict``, so it is added after construction with ``track``.
    """

    def __init__(self, savers=(), evaluator=None) -> None:
        self.savers = {}
        self.resumed_from = {}
        self.evaluator = evaluator
        for name, saver in dict(savers).items():
            self.track(saver, name)

    def track(self, saver, name: str = "checkpoint", resumed_from=None):
        """Also save and restore ``saver``'s state under ``name``; returns self.

        ``resumed_from``: the checkpoint file a resumed run starts from, written by ``saver`` itself. Its
        saved state predates that file (a saver records a file after writing it), so the file is added
        back to the saver's list on loading, and is replaced like any other when newer ones are written.
        """
        self.savers[name] = saver
        if resumed_from:
            self.resumed_from[name] = Path(resumed_from).name
        return self

    def _checkpoints(self) -> dict:
        found = {}
        for name, saver in self.savers.items():
            for kind in ("key_metric", "interval"):
                checkpoint = getattr(saver, f"_{kind}_checkpoint", None)
                if checkpoint is not None:
                    found[f"{name}/{kind}"] = (checkpoint, name)
        return found

    def state_dict(self) -> dict:
        state = {key: [(float(p), str(f)) for p, f in checkpoint.state_dict()["_saved"]] for key, (checkpoint, _) in self._checkpoints().items()}
        if self.evaluator is not None:
            state["best_metric"] = float(self.evaluator.state.best_metric)
            state["best_metric_epoch"] = int(self.evaluator.state.best_metric_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        for key, (checkpoint, name) in self._checkpoints().items():
            folder = Path(getattr(checkpoint.save_handler, "dirname", "."))
            # files deleted since the state was taken are forgotten; the file resumed from is remembered
            saved = [(p, f) for p, f in state.get(key, []) if (folder / f).exists()]
            resumed = self.resumed_from.get(name)
            if resumed and key.endswith("interval") and resumed not in [f for _, f in saved] and (folder / resumed).exists():
                numbers = re.findall(r"(\d+)", Path(resumed).stem)  # its global step, as the saver named it
                saved.append((float(numbers[-1]) if numbers else 0.0, resumed))
            checkpoint.load_state_dict({"_saved": saved})
        if self.evaluator is not None and "best_metric" in state:
            self.evaluator.state.best_metric = state["best_metric"]
            self.evaluator.state.best_metric_epoch = state["best_metric_epoch"]


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


class SurfaceDiceHandler(IgniteMetricHandler):
    """Per-volume surface Dice at a tolerance in mm (MONAI metric handler wiring).

    Args:
        tolerance_mm: boundary tolerance in millimetres (paper: 1 mm).
        include_background, use_subvoxels, reduction: see ``VolumeSurfaceDiceMetric``.
        output_transform: extracts ``(y_pred, y)`` (one-hot, channel-first, MetaTensors with affines)
            from ``engine.state.output``.
        save_details: keep every volume's score in ``engine.state.metric_details``.
    """

    def __init__(
        self,
        tolerance_mm: float = 1.0,
        include_background: bool = False,
        use_subvoxels: bool = True,
        reduction="mean",
        output_transform: Callable = lambda x: x,
        save_details: bool = True,
    ) -> None:
        metric = VolumeSurfaceDiceMetric(
            tolerance_mm=tolerance_mm,
            include_background=include_background,
            use_subvoxels=use_subvoxels,
            reduction=reduction,
        )
        super().__init__(metric_fn=metric, output_transform=output_transform, save_details=save_details)
