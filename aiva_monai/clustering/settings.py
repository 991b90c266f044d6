"""Every setting of a clustering round in one frozen ``ClusteringSettings``, and the round's result
(``SiteClustering``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

TSNE_METHODS = ("opentsne", "sklearn")


TSNE_NEIGHBORS = ("exact", "auto", "annoy")


SOURCE_MEANS = ("store", "second_pass")


STORE_DTYPES = ("float16", "float32")


PRECISIONS = ("auto", "cpu_bfloat16", "float32", "bfloat16", "float16")


MATCH_SPACES = ("tsne", "pca")


@dataclass(frozen=True)
class ClusteringSettings:
    """Every setting of an AIVA clustering round, in one frozen (immutable, hashable) object.

    Built once (from the bundle's ``cluster_options`` dict: ``ClusteringSettings.coerce``) and passed
    unchanged from ``AIVAClusteringHandler`` to ``embed_and_cluster`` and ``cluster_sketches``.
    ``settings.replace(name=value)`` returns a modified copy.

    Embedding pass (``aiva_monai.embedding``):
        batch_size: slices per network batch (on a CPU small batches are faster, as their activations stay in
            cache: the bundles use 8 there, 64 on a GPU).
        encoder_only: run only the encoder up to the bottleneck (``aiva_monai.networks.encode``);
            False runs the full network (the decoder's output is discarded), as before issue 14.
        channels_last: run the encoder's activations in channels-last memory format (faster
            convolutions on CPU and with AMP; features equal up to float rounding).
        fold_batchnorm: with ``encoder_only``, run an eval-mode copy of the network whose BatchNorms that
            follow a convolution are folded into it (``folding.fold_batchnorm``; made inside each site's
            context, so per-site statistics are folded; 1.2 x faster on CPU; features equal up to float
            rounding).
        precision: "auto" (the trainer's AMP setting, as before), "cpu_bfloat16" (bfloat16 on a CPU with
            bfloat16 instructions, AMX-BF16 or AVX512-BF16; elsewhere as "auto": the bundles' default),
            "float32", "bfloat16" or "float16" (autocast for the embedding pass only). bfloat16 cuts the
            pass's CPU cost 3 x with AMX at about 1 % relative error in the features; AIVA's adaptation
            with it was not worse over 3 seeds (docs/experiments/ixi_sim_1000_bf16). The dtype used is
            logged with the round (``network_pass.pass_dtype``).
        source_stride: embed and cluster every ``source_stride``-th source slice (positions 0, s, 2s, ... of
            the source dataset; 1: all; opt-in, not recommended: at 4 the clusters agree poorly with the full
            round's, benchmarks/README.md). Neighbouring slices are nearly the same image, so the source
            clusters and their means come from a thinned set at 1/s of the source pass's cost; the target
            is always embedded whole (every target slice needs its cluster). ``SiteClustering.source_rows``
            names the slices clustered.
        source_means: "store" (one network pass per round: each source slice's full feature is kept in
            a ``FeatureStore`` and the means are summed from it once the clusters exist) or
            "second_pass" (a second pass over the source after clustering, as before issue 14).
        store_dtype: "float16" (per-row scaled: relative error ~2e-4 per value, unbiased) or "float32"
            (the means are then bit-identical to the second pass's).
        store_memory_mb: host memory the store may hold; rows beyond it go to a temporary file.
        store_dir: folder of that file (default: the system's temporary folder).

    Steps 2-4 (``cluster_sketches``):
        sketch_dim: random-projection size before PCA (``FeatureProjector``).
        pca_components: PCA size before t-SNE (reference: 20).
        pca_device: None (scikit-learn on the CPU) or a torch device for ``torch_pca`` (the embedding
            pass sets the training device when it is a GPU).
        tsne_method: "opentsne" (FFT-accelerated, default) or "sklearn" (Barnes-Hut).
        perplexity: t-SNE perplexity (reference: 30); lowered to (n - 1) / 3 for very small sets.
        tsne_neighbors: openTSNE's nearest-neighbour search for the affinities: "exact" (scikit-learn's
            exact search: the same neighbours on any number of threads, so the same t-SNE map on any
            machine; faster than Annoy up to at least 50,000 slices of 20 PCA components, measured in
            benchmarks/README.md) or "auto" / "annoy" (openTSNE's default from 1,000 points: approximate,
            built in parallel, so the map changes with ``n_jobs``; every round before this setting existed).
        tsne_fft_cell: side, in map units, of one cell of the grid on which openTSNE's FFT method
            interpolates the repulsive forces (openTSNE's ``ints_in_interval``; its default, and every round
            before this setting existed, 1). 2 halves the t-SNE stage at IXI-HH's 8,550 slices; its clusters
            agree with those of 1 as closely as 1's agree with themselves under another seed
            (benchmarks/README.md). The coarser grid makes the map about 20 % more compact.
        tsne_exaggeration_iter: early-exaggeration iterations (openTSNE's default, 250; scikit-learn's
            is fixed at 250).
        tsne_iter: iterations after the early exaggeration (openTSNE's default is 500; 250 agrees with
            it on IXI-HH features, ARI 0.97 of the target clusters, at 55 % of the cost:
            ``benchmarks/clustering_round.py``).
        tsne_warm_start: from the second round on, start t-SNE from the previous round's embedding
            (same slices in the same order: the features moved, the slices did not) and run
            ``tsne_warm_iter`` iterations without early exaggeration (openTSNE only).
        tsne_warm_iter: iterations of a warm-started round.
        kmeans_n_init: k-means restarts (the source's; and the target's unless initialised from it).
        target_init_from_source: initialise the target k-means from the source centres (one run)
            instead of k-means++ (the reference code's option; not in the paper).
        slice_position: weight of each slice's normalised position in its volume (0 at its first
            slice, 1 at its last), appended as one more column after PCA, before t-SNE (the reference
            code's option; not in the paper). The column is ``slice_position * sqrt(total variance of
            the PCA scores) * position``: weight 1 gives the position a range equal to the features'
            RMS spread. 0 (default) appends nothing.
        match_space: where the matched clusters' centres are compared (step 4): "tsne" (the paper: the k-means
            centres in the 2D t-SNE map) or "pca" (the same clusters' member means in the joint PCA space, the
            t-SNE input). t-SNE keeps neighbourhoods but not the distances between islands, so matching in the map
            is fragile: on planted structure it pairs 3 of 12 clusters wrongly on some seeds and thread counts
            where the PCA space gets every pair (benchmarks/README.md). Both matches are kept in the result.
            The library default stays the paper's "tsne"; both bundles set "pca" (since 0.2.5: on ixi-sim it
            was above the map's match and AdaBN, docs/experiments.md, "Matching in the PCA space").
        seed: seeds the projection, PCA, t-SNE and k-means: a fixed seed gives identical results.
        n_jobs: threads for t-SNE (-1: all cores).

    Scheduling (``AIVAClusteringHandler``):
        overlap: compute each round's PCA, t-SNE, k-means and matching in a background process while
            training continues with the previous round's clusters (one epoch stale; see the handler).
        overlap_embedding: with ``overlap``, the embedding pass too runs in the background (a thread of the
            training process), on per-site copies of the network taken when the round is due, so training
            waits only for those copies and, when the round is collected (the next due epoch, or a checkpoint
            save before it: ``state_dict`` waits for a round in flight), for the source means. Same clusters as
            ``overlap`` alone (same weights); the pass competes with training for the machine, so use it
            where a core (or the GPU's idle time) is free: on a CPU, train with fewer torch threads than cores.
        overlap_lead_steps: with ``overlap``: 0 launches each round when its epoch is due and uses it one
            clustering interval later (one interval stale); N > 0 launches it N training steps before the next
            due epoch and uses it from that epoch on (N steps stale, not an interval). Choose N a little above
            the round's length in training steps, or training waits for the rest at the due epoch; it must be
            less than one interval (``interval * epoch_length``).
        log_every_s: at most this many seconds between two progress lines of a round in the log.
    """

    batch_size: int = 32
    encoder_only: bool = True
    channels_last: bool = True
    fold_batchnorm: bool = True
    precision: str = "auto"
    source_stride: int = 1
    source_means: str = "store"
    store_dtype: str = "float16"
    store_memory_mb: float = 1024.0
    store_dir: str | None = None
    sketch_dim: int = 1024
    pca_components: int = 20
    pca_device: str | None = None
    tsne_method: str = "opentsne"
    perplexity: float = 30.0
    tsne_neighbors: str = "exact"
    tsne_fft_cell: float = 2.0
    tsne_exaggeration_iter: int = 250
    tsne_iter: int = 250
    tsne_warm_start: bool = False
    tsne_warm_iter: int = 150
    kmeans_n_init: int = 10
    target_init_from_source: bool = False
    slice_position: float = 0.0
    match_space: str = "tsne"
    seed: int = 0
    n_jobs: int = -1
    overlap: bool = False
    overlap_embedding: bool = False
    overlap_lead_steps: int = 0
    log_every_s: float = 10.0

    def __post_init__(self) -> None:
        choices = {
            "tsne_method": TSNE_METHODS,
            "tsne_neighbors": TSNE_NEIGHBORS,
            "source_means": SOURCE_MEANS,
            "store_dtype": STORE_DTYPES,
            "precision": PRECISIONS,
            "match_space": MATCH_SPACES,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed}.")
        for name in ("batch_size", "source_stride", "sketch_dim", "pca_components", "kmeans_n_init"):
            if isinstance(getattr(self, name), bool) or not float(getattr(self, name)).is_integer():
                raise ValueError(f"{name} must be a whole number, got {getattr(self, name)!r}.")
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("tsne_exaggeration_iter", "tsne_iter", "tsne_warm_iter"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.tsne_iter + self.tsne_exaggeration_iter < 1:
            raise ValueError("tsne_exaggeration_iter + tsne_iter must be at least 1.")
        if not (self.tsne_fft_cell > 0 and np.isfinite(self.tsne_fft_cell)):
            raise ValueError(f"tsne_fft_cell must be a positive number, got {self.tsne_fft_cell}.")
        if not self.perplexity > 0:
            raise ValueError(f"perplexity must be positive, got {self.perplexity}.")
        if self.slice_position < 0 or not np.isfinite(self.slice_position):
            raise ValueError(f"slice_position (a weight) must be a finite number >= 0, got {self.slice_position}.")
        if isinstance(self.overlap_lead_steps, bool) or not float(self.overlap_lead_steps).is_integer():
            raise ValueError(f"overlap_lead_steps must be a whole number, got {self.overlap_lead_steps!r}.")
        if self.overlap_lead_steps < 0 or (self.overlap_lead_steps and not self.overlap):
            raise ValueError(f"overlap_lead_steps ({self.overlap_lead_steps}) must be >= 0, and > 0 only with overlap.")
        if self.overlap_embedding and not self.overlap:
            raise ValueError("overlap_embedding runs the embedding pass of an overlapped round: set overlap too.")
        if self.store_memory_mb < 0:
            raise ValueError(f"store_memory_mb must be >= 0, got {self.store_memory_mb}.")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> ClusteringSettings:
        """A copy with ``changes`` applied (unknown names raise ValueError)."""
        unknown = sorted(set(changes) - set(self.names()))
        if unknown:
            raise ValueError(f"unknown clustering setting(s) {unknown}; known: {', '.join(self.names())}.")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def coerce(cls, settings=None, **changes) -> ClusteringSettings:
        """``settings`` as a ``ClusteringSettings``: an instance, a dict of settings (a bundle's
        ``cluster_options``) or None (the defaults); then ``changes`` applied, None values ignored."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if settings is None:
            base = cls()
        elif isinstance(settings, cls):
            base = settings
        elif isinstance(settings, dict) or hasattr(settings, "items"):
            base = cls().replace(**dict(settings.items()))
        else:
            raise TypeError(
                f"clustering settings must be a ClusteringSettings, a dict or None, got {type(settings).__name__}."
            )
        return base.replace(**changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class SiteClustering:
    """Result of one clustering round. k = number of clusters, D = flattened feature size.

    Attributes:
        source_labels: (n_s,) source cluster id of every clustered source sample.
        target_labels: (n_t,) target cluster id of every target sample.
        embedding: (n_s + n_t, 2) joint t-SNE embedding, source rows first.
        source_centers: (k, 2) k-means centres of the source points in the embedding.
        target_centers: (k, 2) k-means centres of the target points in the embedding.
        match: (k,) ``match[i]`` is the source cluster matched to target cluster ``i`` (in ``match_space``).
        matched_cost: sum of squared centre distances of the matched pairs, in ``match_space``.
        source_means: (k, D) float32 mean full-dimensional source feature of each source cluster,
            or None before it has been computed.
        perplexity: the t-SNE perplexity actually used (lowered for very small sets).
        timings: seconds spent in each stage.
        warm_started: whether t-SNE started from the previous round's embedding.
        source_rows: (n_s,) position in the source dataset of each clustered source sample, or None when
            every source sample was clustered in order (``ClusteringSettings.source_stride`` 1).
        match_space: the space ``match`` was computed in ("tsne" or "pca": ``ClusteringSettings.match_space``).
        matches: (k,) match of the same clusters in each space, by space name (a diagnostic: how many pairs the
            choice of space changes); empty for a result restored from a checkpoint.
    """

    source_labels: np.ndarray
    target_labels: np.ndarray
    embedding: np.ndarray
    source_centers: np.ndarray
    target_centers: np.ndarray
    match: np.ndarray
    matched_cost: float
    source_means: torch.Tensor | None = None
    perplexity: float = 30.0
    timings: dict = field(default_factory=dict)
    warm_started: bool = False
    source_rows: np.ndarray | None = None
    match_space: str = "tsne"
    matches: dict = field(default_factory=dict)

    @property
    def n_clusters(self) -> int:
        return int(self.source_centers.shape[0])

    @property
    def pairs_unlike_other_space(self) -> int | None:
        """How many target clusters the other ``match_space`` would pair with another source cluster (None when
        ``matches`` is empty)."""
        others = [np.asarray(match) for space, match in self.matches.items() if space != self.match_space]
        return int(sum((other != self.match).sum() for other in others)) if others else None

    @property
    def source_sizes(self) -> np.ndarray:
        return np.bincount(self.source_labels, minlength=self.n_clusters)

    @property
    def target_sizes(self) -> np.ndarray:
        return np.bincount(self.target_labels, minlength=self.n_clusters)
