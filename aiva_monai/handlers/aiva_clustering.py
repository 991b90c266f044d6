"""``AIVAClusteringHandler``: re-clusters source and target at the start of every adaptation epoch."""

from __future__ import annotations

import dataclasses
import logging
import sys
import time

import torch
from ignite.engine import Engine, Events

from aiva_monai.clustering import ClusteringSettings, SiteClustering, slice_positions
from aiva_monai.embedding import clustered_source, embed_and_cluster
from aiva_monai.engines import ClusterAssignment
from aiva_monai.handlers.background_round import BackgroundRound
from aiva_monai.handlers.clustering_state import clustering_from_state, clustering_to_state
from aiva_monai.handlers.site_counts import per_group_cluster_counts, source_slice_groups
from aiva_monai.io import write_csv_atomic
from aiva_monai.network_pass import NetworkPass, distributed_context, pass_dtype
from aiva_monai.progress import RoundProgress


class AIVAClusteringHandler:
    """Re-clusters source and target at the start of every adaptation epoch of an ``AIVATrainer``.

    At ``EPOCH_STARTED`` (every ``interval`` epochs) it runs one clustering round (``embed_and_cluster``):
    one eval-mode pass of the network's encoder over every target slice and every source slice (or every
    ``settings.source_stride``-th; no gradients),
    each bottleneck reduced to a sketch (``FeatureProjector``) and each source bottleneck kept in a
    ``FeatureStore``; joint PCA, joint t-SNE, per-site k-means and Hungarian matching on the sketches
    (``cluster_sketches``); the full-dimensional source means per cluster from the store. The trainer
    receives the target cluster ids and the source means as ``engine.state.aiva_assignment``.

    Args:
        source_dataset: labelled source slices (only ``image_key`` is read).
        target_dataset: unlabelled target slices, in the order of their ``index`` values: sample ``i``
            must carry ``index == i``, as ``aiva_monai.data.SliceDataset`` does.
        n_clusters: k (paper: 12).
        interval: re-cluster every this many epochs.
        settings: every setting of the round, one ``ClusteringSettings`` (or a dict of them, such as a
            bundle's ``cluster_options``; None: the defaults).
        network_pass: how the embedding pass runs the network: loader workers, image and index keys,
            per-site context around each site's pass (``NetworkPass`` or a dict of its fields; the device
            and AMP come from the trainer).
        progress: show progress bars (default: when stderr is a terminal); log lines are always written.
        group_key: volume entry key naming each source slice's site (``SliceDataset`` data). When the
            source holds several sites (leave-one-site-out), their union is clustered as one source and
            each site's share of every source cluster is logged and kept in ``history``.
        name: logger name.
        stats_file: CSV file rewritten after every round, one row per round (epoch, sizes, matched cost,
            seconds per stage); None: no file.

    Every round's seconds per stage are also put in ``engine.state.metrics`` as ``aiva_time_<stage>``
    (and ``aiva_round_seconds``, the time training waited) for the epoch, so MONAI's ``StatsHandler`` and
    ``TensorBoardStatsHandler`` log them at the end of the epoch; they are absent in epochs without a round.

    ``settings.overlap``: the first round runs as above. At every later due epoch the handler runs the
    embedding pass (the network is needed), hands the rest of the round (PCA, t-SNE, k-means, matching)
    to a background process, and trains this epoch with the previous round's clusters; the round's result
    (its source means summed from the store) is taken into use at the next due epoch. So clusters and
    means used in an epoch come from the network of one clustering interval earlier (one round stale; in
    return, only the embedding pass stops training). With ``settings.overlap_embedding`` that pass too runs
    in the background (``BackgroundRound``: a thread, on copies of the network taken at the due epoch), and
    training waits only for those copies and, at the next due epoch, for the source means. With
    ``settings.overlap_lead_steps`` = N > 0 a round is launched N steps before its due epoch starts (at
    ``ITERATION_COMPLETED``) and used from that epoch: N steps stale instead of one interval. The result is
    the same whatever the timing, with or without ``overlap_embedding`` (the weights at the due epoch decide
    it; the background process computes exactly ``cluster_sketches``), and ``state_dict()`` waits for a
    round in flight, so resuming from a checkpoint is exact. Under torch.distributed it falls back to
    synchronous rounds.

    The clustering of the current epoch (and, with ``overlap``, the next) is in ``state_dict()`` /
    ``load_state_dict()``: save the handler with the checkpoint and a run resumed mid-epoch continues with
    the same clusters and means.
    """

    def __init__(
        self,
        source_dataset,
        target_dataset,
        n_clusters: int = 12,
        interval: int = 1,
        settings: ClusteringSettings | dict | None = None,
        network_pass: NetworkPass | dict | None = None,
        progress: bool | None = None,
        group_key: str | None = "site",
        name: str | None = None,
        stats_file: str | None = None,
    ) -> None:
        if interval < 1:
            raise ValueError(f"interval must be at least 1, got {interval}.")
        self.settings = ClusteringSettings.coerce(settings)
        self.source_dataset = source_dataset
        self.target_dataset = target_dataset
        self.n_clusters = int(n_clusters)
        self.interval = int(interval)
        self.network_pass = (
            NetworkPass(**network_pass) if isinstance(network_pass, dict) else network_pass or NetworkPass()
        )
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.source_groups = source_slice_groups(source_dataset, group_key) if group_key else None
        self.logger = logging.getLogger(name or __name__)
        self.stats_file = stats_file
        if self.settings.slice_position:
            slice_positions(source_dataset), slice_positions(target_dataset)  # fail now, not at the first round
        self.clustering: SiteClustering | None = None
        self.clustered_epoch: int | None = None
        self.history: list[dict] = []
        # overlap mode: the round taken into use at the next due epoch, and the one in flight
        self.pending: SiteClustering | None = None
        self.pending_epoch: int | None = None
        self.background = BackgroundRound()
        self._reported = 0
        self._device = "cpu"
        self._embed_dtype: str | None = None

    def attach(self, engine: Engine) -> None:
        if not hasattr(engine, "bottleneck_tap"):
            raise TypeError(f"AIVAClusteringHandler needs an AIVATrainer, got {type(engine).__name__}.")
        clustered = clustered_source(self.source_dataset, self.settings)
        for site, dataset in (("source", clustered), ("target", self.target_dataset)):
            if len(dataset) < self.n_clusters:
                stride = self.settings.source_stride if site == "source" else 1
                thinned = f" (1 in {stride})" if stride > 1 else ""
                raise ValueError(
                    f"the {site} dataset has {len(dataset)}{thinned} slices, fewer than n_clusters={self.n_clusters}."
                )
        engine.add_event_handler(Events.EPOCH_STARTED, self)
        if self.settings.overlap_lead_steps:
            engine.add_event_handler(Events.STARTED, self._check_lead)
            engine.add_event_handler(Events.ITERATION_COMPLETED, self._launch_ahead)
        engine.add_event_handler(Events.COMPLETED, lambda _: self.shutdown())
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._exception_raised)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        due = (epoch - 1) % self.interval == 0
        for key in [k for k in engine.state.metrics if k.startswith("aiva_time_") or k == "aiva_round_seconds"]:
            del engine.state.metrics[key]
        start, acted = time.perf_counter(), False
        overlapping = self._overlapping()
        ahead = overlapping and self.settings.overlap_lead_steps > 0
        if self.clustering is None or (due and self.clustered_epoch != epoch and not overlapping):
            self.run_clustering(engine)
            acted = True
        elif due and self.clustered_epoch != epoch and (ahead or self._launched_epoch() != epoch):
            acted = True
            self._collect()
            if self.pending is not None:
                self.clustering, self.clustered_epoch = self.pending, self.pending_epoch
                self.pending, self.pending_epoch = None, None
                self.logger.info(
                    f"AIVA epoch {epoch}: training with the clusters of epoch {self.clustered_epoch} "
                    "(computed in the background)"
                )
            if ahead and self.clustered_epoch != epoch:  # none was launched for this epoch: cluster now
                self.run_clustering(engine)
            elif not ahead and epoch + self.interval <= engine.state.max_epochs:  # else no epoch would use it
                self._launch(engine)
        waited = time.perf_counter() - start
        if len(self.history) > self._reported:  # a round finished since the last epoch started: its times
            for key, value in self.history[-1].items():
                if key.startswith("time_"):
                    engine.state.metrics[f"aiva_{key}"] = float(value)
            self._reported = len(self.history)
        if acted:
            engine.state.metrics["aiva_round_seconds"] = waited
        self._hand_over(engine)

    # -- the clustering round -------------------------------------------------------------------

    def _network_pass(self, engine: Engine) -> NetworkPass:
        network_pass = dataclasses.replace(
            self.network_pass, device=engine.state.device, amp=engine.amp, amp_kwargs=engine.amp_kwargs
        )
        # what "auto" / "cpu_bfloat16" mean on this engine, for the round's stats row
        self._embed_dtype = pass_dtype(
            network_pass.device, self.settings.precision, network_pass.amp, network_pass.amp_kwargs
        )
        return network_pass

    def _settings_for(self, engine: Engine) -> ClusteringSettings:
        settings = self.settings
        if torch.device(engine.state.device).type == "cuda" and settings.pca_device is None:
            settings = settings.replace(pca_device=str(engine.state.device))
        return settings

    def _reporter(self, epoch: int) -> RoundProgress:
        """The round's progress: log lines through the handler's logger; bars on rank 0 when asked for."""
        bar = self.progress and distributed_context()[0] == 0
        return RoundProgress(self.logger, f"AIVA epoch {epoch}: ", self.settings.log_every_s, bar=bar)

    def _previous_embedding(self):
        return None if self.clustering is None else self.clustering.embedding

    def run_clustering(self, engine: Engine) -> SiteClustering:
        """One clustering round; stores and returns the ``SiteClustering`` (with ``source_means``)."""
        epoch = engine.state.epoch
        result = embed_and_cluster(
            engine.network,
            engine.bottleneck_tap,
            self.source_dataset,
            self.target_dataset,
            self.n_clusters,
            self._settings_for(engine),
            self._network_pass(engine),
            init_embedding=self._previous_embedding(),
            report=self._reporter(epoch),
        )
        self.clustering, self.clustered_epoch = result, epoch
        self._record(epoch, result)
        return result

    def _summary(self, epoch: int, result: SiteClustering) -> dict:
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
            "tsne_warm_started": bool(result.warm_started),
            "match_space": result.match_space,
            "pairs_unlike_other_space": result.pairs_unlike_other_space,
            "embed_dtype": self._embed_dtype,
            **{f"time_{stage}": float(seconds) for stage, seconds in result.timings.items()},
        }
        if self.source_groups is not None and len(set(self.source_groups)) > 1:
            groups = self.source_groups if result.source_rows is None else self.source_groups[result.source_rows]
            summary["source_sites"] = per_group_cluster_counts(groups, result.source_labels, self.n_clusters)
        return summary

    def _record(self, epoch: int, result: SiteClustering) -> None:
        summary = self._summary(epoch, result)
        self.history.append(summary)
        times = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.timings.items())
        self.logger.info(
            f"AIVA epoch {epoch}: k={self.n_clusters}, source clusters of {summary['source_cluster_min']}-"
            f"{summary['source_cluster_max']} slices, target clusters of {summary['target_cluster_min']}-"
            f"{summary['target_cluster_max']} slices; {times} (round {sum(result.timings.values()):.1f} s); "
            f"matched cost {result.matched_cost:.3g}"
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
        self._write_stats()

    def _write_stats(self) -> None:
        if not self.stats_file or not self.history:
            return
        rows = [{k: v for k, v in row.items() if not isinstance(v, dict)} for row in self.history]
        fields = list(dict.fromkeys(key for row in rows for key in row))
        write_csv_atomic(self.stats_file, rows, fields)

    # -- overlap: the round's clustering in a background process ---------------------------------------

    def _overlapping(self) -> bool:
        if not self.settings.overlap:
            return False
        if distributed_context()[1] > 1:
            if not getattr(self, "_warned_distributed", False):
                self.logger.warning("AIVA: overlap is not supported under torch.distributed; clustering synchronously.")
                self._warned_distributed = True
            return False
        return True

    def _launched_epoch(self) -> int | None:
        return self.background.epoch if self.background.epoch is not None else self.pending_epoch

    def _check_lead(self, engine: Engine) -> None:
        # at STARTED, before any step (the epoch length is known only once the engine runs)
        lead, per_interval = self.settings.overlap_lead_steps, self.interval * engine.state.epoch_length
        if lead >= per_interval:
            raise ValueError(
                f"overlap_lead_steps ({lead}) must be less than the steps between two rounds ({per_interval})."
            )

    def _launch_ahead(self, engine: Engine) -> None:
        """``overlap_lead_steps`` > 0: launch the next due epoch's round that many steps before it starts."""
        if not self._overlapping():
            return
        lead, epoch = self.settings.overlap_lead_steps, engine.state.epoch
        due = epoch + self.interval - (epoch - 1) % self.interval
        if due > engine.state.max_epochs or engine.state.iteration != (due - 1) * engine.state.epoch_length - lead:
            return
        if self.background.epoch == due or self.pending_epoch == due:
            return
        self._launch(engine, due, f"step {engine.state.iteration}, ")

    def _launch(self, engine: Engine, epoch: int | None = None, at: str = "") -> None:
        """Launch the round used from ``epoch + interval`` (``overlap_lead_steps`` 0), or from ``epoch``."""
        used_from = engine.state.epoch + self.interval if epoch is None else epoch
        epoch = engine.state.epoch if epoch is None else epoch
        settings = self._settings_for(engine)
        if settings.overlap_embedding:  # log lines only: a bar would interleave with the training's
            reporter = RoundProgress(self.logger, f"AIVA epoch {epoch} (background): ", settings.log_every_s)
        else:
            reporter = self._reporter(epoch)
        what = self.background.launch(
            epoch,
            engine.network,
            engine.bottleneck_tap,
            self.source_dataset,
            self.target_dataset,
            self.n_clusters,
            settings,
            self._network_pass(engine),
            reporter,
            init_embedding=self._previous_embedding(),
        )
        self.logger.info(f"AIVA epoch {engine.state.epoch}, {at}{what}, used from epoch {used_from}")

    def _collect(self) -> None:
        """Wait for the round in flight (if any), sum its source means from the store, keep it as pending."""
        collected = self.background.collect(self.n_clusters, self.settings, self._device)
        if collected is not None:
            self.pending_epoch, self.pending = collected
            self._record(*collected)

    def _exception_raised(self, engine: Engine, exception: BaseException) -> None:
        # ignite re-raises an exception only when no EXCEPTION_RAISED handler is registered: raise it again
        # (as MONAI's StatsHandler does), or a failed run would end as if it had completed
        self.shutdown()
        raise exception

    def shutdown(self) -> None:
        """Stop the background thread and process (a round in flight is abandoned)."""
        self.background.shutdown()

    def _hand_over(self, engine: Engine) -> None:
        self._device = engine.state.device
        result = self.clustering
        engine.state.aiva_assignment = ClusterAssignment(
            target_labels=torch.as_tensor(result.target_labels).long(),
            source_means=result.source_means.to(engine.state.device),
            match=torch.as_tensor(result.match).long(),
            epoch=self.clustered_epoch,
        )

    # -- checkpointing ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """The current clustering (and, with ``overlap``, the next one: a round in flight is waited for)."""
        self._collect()
        if self.clustering is None:
            return {"clustered_epoch": -1, "history": list(self.history)}
        state = clustering_to_state(self.clustering, self.clustered_epoch)
        state["history"] = list(self.history)
        if self.pending is not None:
            state["pending"] = clustering_to_state(self.pending, self.pending_epoch)
        return state

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        self._reported = len(self.history)
        self.pending, self.pending_epoch = None, None
        if state["clustered_epoch"] < 0:
            self.clustering, self.clustered_epoch = None, None
            return
        self.clustering = clustering_from_state(state, self.n_clusters)
        self.clustered_epoch = int(state["clustered_epoch"])
        if "pending" in state:
            self.pending = clustering_from_state(state["pending"], self.n_clusters)
            self.pending_epoch = int(state["pending"]["clustered_epoch"])
