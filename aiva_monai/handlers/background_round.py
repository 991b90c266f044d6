"""``BackgroundRound``: the clustering round that ``AIVAClusteringHandler``'s ``overlap`` computes while
training goes on."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from aiva_monai.clustering import ClusteringSettings, SiteClustering
from aiva_monai.embedding import EmbeddedSites, compute_source_means, embed_sites
from aiva_monai.handlers.background import background_executor
from aiva_monai.network_pass import NetworkPass, site_snapshots
from aiva_monai.progress import RoundProgress

__all__ = ["BackgroundRound", "RoundCancelled"]


class RoundCancelled(Exception):
    """Raised inside a background embedding pass that ``BackgroundRound.shutdown`` stopped."""


class _Cancellable:
    """A ``RoundProgress`` that raises ``RoundCancelled`` at its next report once ``cancel`` is set (the pass
    reports after every batch, so a stopped pass ends within one batch)."""

    def __init__(self, progress: RoundProgress, cancel: threading.Event) -> None:
        self.progress, self.cancel = progress, cancel

    def _check(self) -> None:
        if self.cancel.is_set():
            raise RoundCancelled("the background embedding pass was stopped")

    def start(self, *args, **kwargs) -> None:
        self._check()
        self.progress.start(*args, **kwargs)

    def __call__(self, *args, **kwargs) -> None:
        self._check()
        self.progress(*args, **kwargs)


class BackgroundRound:
    """At most one clustering round in flight: launched at a due epoch, collected at the next one.

    ``launch`` runs the embedding pass (in the caller, or with ``settings.overlap_embedding`` in a background
    thread on ``site_snapshots`` of the network taken at launch) and hands PCA, t-SNE, k-means and matching to a
    spawned one-worker process (``background_executor``, made at the first launch); ``collect`` waits for the
    round and sums its source means from the feature store. The network's weights at launch alone decide the
    result, so it is the same whatever the timing.
    """

    def __init__(self) -> None:
        self._process = None
        self._thread: ThreadPoolExecutor | None = None
        self._cancel = threading.Event()
        self._in_flight = None  # (epoch, future, EmbeddedSites or None: the thread's future returns it)

    @property
    def epoch(self) -> int | None:
        """The epoch whose round is in flight, or None."""
        return None if self._in_flight is None else self._in_flight[0]

    def done(self) -> bool:
        """Whether the round in flight has finished (``collect`` will not wait for it); False when none is."""
        return self._in_flight is not None and self._in_flight[1].done()

    @property
    def running(self) -> bool:
        """Whether a process or thread is still alive (False after ``shutdown``)."""
        return self._process is not None or self._thread is not None

    def launch(
        self,
        epoch: int,
        network,
        tap,
        source_dataset,
        target_dataset,
        n_clusters: int,
        settings: ClusteringSettings,
        network_pass: NetworkPass,
        report: RoundProgress,
        init_embedding=None,
    ) -> str:
        """Start the round of ``epoch``; returns what to log about it. ``report`` is closed when the pass ends."""
        if self._in_flight is not None:
            raise RuntimeError(f"the round of epoch {self.epoch} is still in flight; collect it first.")
        if self._process is None:
            self._process = background_executor()
        process, background_settings = self._process, settings.replace(pca_device=None)

        def cluster(embedded: EmbeddedSites):  # a future of the round's SiteClustering
            return embedded.cluster(n_clusters, background_settings, init_embedding=init_embedding, run=process.submit)

        if not settings.overlap_embedding:
            try:
                embedded = embed_sites(
                    network, tap, source_dataset, target_dataset, settings, network_pass, progress=report
                )
            finally:
                report.close()
            self._in_flight = (epoch, cluster(embedded), embedded)
            return f"embedded in {embedded.seconds:.1f} s; PCA, t-SNE, k-means and matching run in a background process"

        snapshots = site_snapshots(network, network_pass)  # now: the weights this round is of
        free_pass = dataclasses.replace(network_pass, site_context=None)  # the copies carry their statistics
        self._cancel.clear()
        progress = _Cancellable(report, self._cancel)

        def run() -> tuple[SiteClustering, EmbeddedSites]:
            try:
                embedded = embed_sites(
                    None,
                    tap,
                    source_dataset,
                    target_dataset,
                    settings,
                    free_pass,
                    progress=progress,
                    site_networks=snapshots,
                )
            finally:
                report.close()
            try:
                return cluster(embedded).result(), embedded
            except BaseException:
                embedded.close()
                raise

        if self._thread is None:
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aiva-embedding")
        self._in_flight = (epoch, self._thread.submit(run), None)
        return "the embedding pass (a background thread) and PCA, t-SNE, k-means and matching run in the background"

    def collect(self, n_clusters: int, settings: ClusteringSettings, device) -> tuple[int, SiteClustering] | None:
        """Wait for the round in flight (None if there is none); returns (its epoch, the round with
        ``source_means`` on ``device`` and ``timings``: embed, the clustering stages, means, wait)."""
        if self._in_flight is None:
            return None
        epoch, future, embedded = self._in_flight
        start = time.perf_counter()
        try:
            if embedded is None:
                result, embedded = future.result()
            else:
                result = future.result()
            waited = time.perf_counter() - start
            result.source_rows = embedded.source_rows
            start = time.perf_counter()
            result.source_means = compute_source_means(
                result, embedded, n_clusters, settings, NetworkPass(device=device)
            )
            result.timings = {
                "embed": embedded.seconds,
                **result.timings,
                "means": time.perf_counter() - start,
                "wait": waited,
            }
        finally:
            if embedded is not None:
                embedded.close()
            self._in_flight = None
        return epoch, result

    def shutdown(self) -> None:
        """Stop the thread and the process (a round in flight is abandoned)."""
        self._cancel.set()
        in_flight, self._in_flight = self._in_flight, None
        if self._process is not None:
            self._process.shutdown(wait=True, cancel_futures=True)
            self._process = None
        if self._thread is not None:
            self._thread.shutdown(wait=True, cancel_futures=True)
            self._thread = None
        if in_flight is not None:
            epoch, future, embedded = in_flight
            if embedded is not None:
                embedded.close()
            elif future.done() and not future.cancelled() and future.exception() is None:
                future.result()[1].close()
