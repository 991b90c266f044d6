"""Joint embedding and per-site clustering of bottleneck features (paper, Algorithm 1, steps 2-5).

Pipeline, once per adaptation epoch (every setting in one frozen ``ClusteringSettings``):

1. ``FeatureProjector``: each flattened bottleneck vector (D values, 131,072 for a 128 x 32 x 32 map)
   is reduced on the fly to ``sketch_dim`` values by a seeded, very sparse random projection
   (Li, Hastie & Church 2006; scikit-learn's ``SparseRandomProjection``). Distances and inner
   products are preserved up to a small relative error (Johnson-Lindenstrauss), so the joint PCA
   that follows sees the same geometry, while the embedding pass never holds the full (n, D)
   matrix in float32: 25,000 slices need 100 MB instead of 13 GB. When D <= sketch_dim the
   projection is the identity and the PCA is exact.
2. Joint PCA (scikit-learn) of source + target sketches, optionally each slice's normalised position
   in its volume as one more weighted column (``slice_position``), then one joint 2D t-SNE (openTSNE's
   FFT method by default, scikit-learn's Barnes-Hut as an option; optionally warm-started from the
   previous round's embedding).
3. k-means separately on the source and on the target points of the 2D embedding (the target's
   optionally initialised from the source centres, ``target_init_from_source``).
4. Hungarian matching of target centres to source centres.
5. ``source_means``: mean *full-dimensional* source feature of each source cluster. The embedding
   pass keeps every source slice's full feature in a ``FeatureStore`` (float16 in memory up to a
   budget, the rest in a temporary file), so the means need no second pass through the network
   (``source_means="second_pass"`` keeps the old way). ``ClusterMeanAccumulator`` sums them.

``cluster_sites`` runs all five steps on arrays held in memory; the Ignite handler streams steps 1
and 5 through the network (``aiva_monai.embedding``) and calls ``cluster_sketches`` for steps 2-4.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.random_projection import SparseRandomProjection

from aiva_monai.alignment import match_clusters, matched_cost

__all__ = [
    "ClusteringSettings",
    "SiteClustering",
    "FeatureStore",
    "slice_positions",
    "FeatureProjector",
    "ClusterMeanAccumulator",
    "cluster_sketches",
    "cluster_sites",
    "TSNE_METHODS",
    "torch_pca",
    "tsne_input",
    "kmeans_sites",
]

logger = logging.getLogger(__name__)

TSNE_METHODS = ("opentsne", "sklearn")
SOURCE_MEANS = ("store", "second_pass")
STORE_DTYPES = ("float16", "float32")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ClusteringSettings:
    """Every setting of an AIVA clustering round, in one frozen (immutable, hashable) object.

    Built once (from the bundle's ``cluster_options`` dict: ``ClusteringSettings.coerce``) and passed
    unchanged from ``AIVAClusteringHandler`` to ``embed_and_cluster`` and ``cluster_sketches``.
    ``settings.replace(name=value)`` returns a modified copy.

    Embedding pass (``aiva_monai.embedding``):
        batch_size: slices per network batch.
        encoder_only: run only the encoder up to the bottleneck (``aiva_monai.networks.encode``);
            False runs the full network (the decoder's output is discarded), as before issue 14.
        channels_last: run the encoder's activations in channels-last memory format (faster
            convolutions on CPU and with AMP; features equal up to float rounding).
        precision: "auto" (the trainer's AMP setting, as before), "float32", "bfloat16" or "float16"
            (autocast for the embedding pass only; bfloat16 halves the CPU cost on CPUs with
            bfloat16 instructions at about 1 % relative error in the features).
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
        seed: seeds the projection, PCA, t-SNE and k-means: a fixed seed gives identical results.
        n_jobs: threads for t-SNE (-1: all cores).

    Scheduling (``AIVAClusteringHandler``):
        overlap: compute each round's PCA, t-SNE, k-means and matching in a background process while
            training continues with the previous round's clusters (one epoch stale; see the handler).
        log_every_s: at most this many seconds between two progress lines of a round in the log.
    """

    batch_size: int = 32
    encoder_only: bool = True
    channels_last: bool = True
    precision: str = "auto"
    source_means: str = "store"
    store_dtype: str = "float16"
    store_memory_mb: float = 1024.0
    store_dir: str | None = None
    sketch_dim: int = 1024
    pca_components: int = 20
    pca_device: str | None = None
    tsne_method: str = "opentsne"
    perplexity: float = 30.0
    tsne_exaggeration_iter: int = 250
    tsne_iter: int = 250
    tsne_warm_start: bool = False
    tsne_warm_iter: int = 150
    kmeans_n_init: int = 10
    target_init_from_source: bool = False
    slice_position: float = 0.0
    seed: int = 0
    n_jobs: int = -1
    overlap: bool = False
    log_every_s: float = 10.0

    def __post_init__(self) -> None:
        choices = {
            "tsne_method": TSNE_METHODS,
            "source_means": SOURCE_MEANS,
            "store_dtype": STORE_DTYPES,
            "precision": PRECISIONS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {allowed}.")
        for name in ("batch_size", "sketch_dim", "pca_components", "kmeans_n_init"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        for name in ("tsne_exaggeration_iter", "tsne_iter", "tsne_warm_iter"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}.")
        if self.tsne_iter + self.tsne_exaggeration_iter < 1:
            raise ValueError("tsne_exaggeration_iter + tsne_iter must be at least 1.")
        if not self.perplexity > 0:
            raise ValueError(f"perplexity must be positive, got {self.perplexity}.")
        if self.slice_position < 0 or not np.isfinite(self.slice_position):
            raise ValueError(f"slice_position (a weight) must be a finite number >= 0, got {self.slice_position}.")
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
        source_labels: (n_s,) source cluster id of every source sample.
        target_labels: (n_t,) target cluster id of every target sample.
        embedding: (n_s + n_t, 2) joint t-SNE embedding, source rows first.
        source_centers: (k, 2) k-means centres of the source points in the embedding.
        target_centers: (k, 2) k-means centres of the target points in the embedding.
        match: (k,) ``match[i]`` is the source cluster matched to target cluster ``i``.
        matched_cost: sum of squared centre distances of the matched pairs.
        source_means: (k, D) float32 mean full-dimensional source feature of each source cluster,
            or None before it has been computed.
        perplexity: the t-SNE perplexity actually used (lowered for very small sets).
        timings: seconds spent in each stage.
        warm_started: whether t-SNE started from the previous round's embedding.
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

    @property
    def n_clusters(self) -> int:
        return int(self.source_centers.shape[0])

    @property
    def source_sizes(self) -> np.ndarray:
        return np.bincount(self.source_labels, minlength=self.n_clusters)

    @property
    def target_sizes(self) -> np.ndarray:
        return np.bincount(self.target_labels, minlength=self.n_clusters)


class FeatureProjector:
    """Seeded very sparse random projection of flattened features to ``sketch_dim`` values.

    Args:
        n_features: D, the flattened size of one feature map.
        sketch_dim: output size m. When ``n_features <= sketch_dim`` the projector is the identity.
        seed: seed of the projection matrix; the same seed gives the same matrix everywhere.

    Calling it on a (B, ...) tensor returns a (B, m) float32 tensor on the input's device.
    """

    def __init__(self, n_features: int, sketch_dim: int = 1024, seed: int = 0) -> None:
        if n_features < 1 or sketch_dim < 1:
            raise ValueError(f"n_features ({n_features}) and sketch_dim ({sketch_dim}) must be positive.")
        self.n_features = int(n_features)
        self.output_dim = min(self.n_features, int(sketch_dim))
        self._matrix: torch.Tensor | None = None
        self._by_device: dict[str, torch.Tensor] = {}
        if self.n_features > sketch_dim:
            shape_only = scipy.sparse.csr_matrix((1, self.n_features), dtype=np.float32)
            projection = SparseRandomProjection(n_components=int(sketch_dim), density="auto", random_state=seed)
            components = projection.fit(shape_only).components_.tocsr().astype(np.float32)  # (m, D)
            with warnings.catch_warnings():  # torch flags sparse CSR as beta; mm with it is stable
                warnings.simplefilter("ignore", UserWarning)
                self._matrix = torch.sparse_csr_tensor(
                    torch.from_numpy(components.indptr.astype(np.int64)),
                    torch.from_numpy(components.indices.astype(np.int64)),
                    torch.from_numpy(components.data),
                    size=components.shape,
                )

    @property
    def is_identity(self) -> bool:
        return self._matrix is None

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        flat = features.reshape(features.shape[0], -1).float()
        if flat.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per sample, got {flat.shape[1]}.")
        if self._matrix is None:
            return flat
        key = str(flat.device)
        if key not in self._by_device:
            self._by_device[key] = self._matrix.to(flat.device)
        return torch.sparse.mm(self._by_device[key], flat.t()).t()


class ClusterMeanAccumulator:
    """Streaming per-cluster mean of full-dimensional features.

    Args:
        n_clusters: k.
        n_features: D, flattened size of one feature map.
        device: where the (k, D) float64 sums live (the network's device in the handler).
    """

    def __init__(self, n_clusters: int, n_features: int, device: str | torch.device = "cpu") -> None:
        self.sums = torch.zeros(n_clusters, n_features, dtype=torch.float64, device=device)
        self.counts = torch.zeros(n_clusters, dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor, labels) -> None:
        """Add a (B, ...) batch whose samples belong to clusters ``labels`` (B,)."""
        flat = features.reshape(features.shape[0], -1).to(self.sums.device, torch.float64)
        index = torch.as_tensor(np.asarray(labels), device=self.sums.device).long()
        self.sums.index_add_(0, index, flat)
        self.counts.index_add_(0, index, torch.ones_like(index, dtype=torch.float64))

    def means(self) -> torch.Tensor:
        """(k, D) float32 means. Raises ValueError when a cluster received no sample."""
        empty = torch.nonzero(self.counts == 0).reshape(-1).tolist()
        if empty:
            raise ValueError(f"source clusters {empty} received no sample: cannot compute their mean feature.")
        return (self.sums / self.counts[:, None]).float()


class FeatureStore:
    """Full-dimensional features of ``n_rows`` slices, written during the embedding pass and summed per
    cluster once the clusters are known, so the source means need no second pass through the network.

    Rows are kept in host memory up to ``memory_mb``; the rest go to an anonymous temporary file
    (written and read with ``pwrite``/``pread``: file pages live in the OS page cache, not in this
    process's memory). With ``dtype="float16"`` each row is divided by its largest absolute value (kept
    in float32) before rounding, so no value overflows and each keeps ~11 significant bits (relative
    error <= 2^-11, unbiased round-to-nearest); ``"float32"`` stores the values exactly.

    Args:
        n_rows: number of slices (rows are addressed by dataset position).
        n_features: D, flattened feature size.
        dtype: "float16" (default) or "float32".
        memory_mb: host memory for rows; 0 puts every row in the file.
        directory: folder of the temporary file (default: the system's temporary folder).

    Under ``torch.distributed`` each rank writes its own rows; ``cluster_sums`` sums only the rows
    written here, so all-reducing the sums and counts gives the means over all ranks.
    """

    def __init__(
        self, n_rows: int, n_features: int, dtype: str = "float16", memory_mb: float = 1024.0, directory=None
    ) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"unknown store dtype {dtype!r}; choose one of {STORE_DTYPES}.")
        self.n_rows, self.n_features = int(n_rows), int(n_features)
        self.dtype = np.dtype(dtype)
        self.row_bytes = self.n_features * self.dtype.itemsize
        self.rows_in_memory = min(self.n_rows, int(float(memory_mb) * 2**20) // self.row_bytes)
        # np.empty maps untouched pages lazily: memory grows with the rows actually written
        self._memory = np.empty((self.rows_in_memory, self.n_features), self.dtype)
        self._scales = np.ones(self.n_rows, np.float32)
        self._written = np.zeros(self.n_rows, bool)
        self._file = tempfile.TemporaryFile(dir=directory) if self.rows_in_memory < self.n_rows else None

    @property
    def rows_on_disk(self) -> int:
        return self.n_rows - self.rows_in_memory

    def write(self, position: int, features) -> None:
        """Store a (B, ...) batch of features as rows ``position .. position + B - 1``."""
        flat = torch.as_tensor(features).detach().reshape(len(features), -1).float().cpu().numpy()
        if flat.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features per row, got {flat.shape[1]}.")
        end = position + len(flat)
        if position < 0 or end > self.n_rows:
            raise IndexError(f"rows {position}..{end - 1} outside the store's {self.n_rows} rows.")
        if self.dtype == np.float16:
            scales = np.abs(flat).max(axis=1)
            scales[scales == 0] = 1.0
            self._scales[position:end] = scales
            flat = flat / scales[:, None]
        values = flat.astype(self.dtype)
        split = min(max(self.rows_in_memory - position, 0), len(values))
        if split:
            self._memory[position : position + split] = values[:split]
        if split < len(values):
            offset = (position + split - self.rows_in_memory) * self.row_bytes
            os.pwrite(self._file.fileno(), np.ascontiguousarray(values[split:]).tobytes(), offset)
        self._written[position:end] = True

    def read(self, begin: int, end: int) -> np.ndarray:
        """Rows ``begin .. end - 1`` as a float32 (rows, D) array (every row must have been written)."""
        if not self._written[begin:end].all():
            raise ValueError(f"rows {begin}..{end - 1} were not all written.")
        parts = []
        if begin < self.rows_in_memory:
            parts.append(self._memory[begin : min(end, self.rows_in_memory)])
        if end > self.rows_in_memory:
            first = max(begin, self.rows_in_memory)
            raw = os.pread(
                self._file.fileno(), (end - first) * self.row_bytes, (first - self.rows_in_memory) * self.row_bytes
            )
            parts.append(np.frombuffer(raw, self.dtype).reshape(end - first, self.n_features))
        rows = np.concatenate(parts).astype(np.float32)
        if self.dtype == np.float16:
            rows *= self._scales[begin:end, None]
        return rows

    def cluster_sums(
        self,
        labels,
        n_clusters: int,
        device="cpu",
        chunk_rows: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> ClusterMeanAccumulator:
        """A ``ClusterMeanAccumulator`` holding the per-cluster sums and counts of the written rows
        (``labels``: (n_rows,) cluster ids). ``progress(rows done)`` is called after every chunk."""
        labels = np.asarray(labels)
        if labels.shape != (self.n_rows,):
            raise ValueError(f"labels must be ({self.n_rows},), got {labels.shape}.")
        accumulator = ClusterMeanAccumulator(n_clusters, self.n_features, device)
        written = np.flatnonzero(self._written)
        # contiguous runs of written rows (a rank writes whole batches), read in chunks
        runs = np.split(written, np.flatnonzero(np.diff(written) != 1) + 1) if len(written) else []
        done = 0
        for run in runs:
            for begin in range(int(run[0]), int(run[-1]) + 1, chunk_rows):
                end = min(begin + chunk_rows, int(run[-1]) + 1)
                accumulator.update(torch.from_numpy(self.read(begin, end)), labels[begin:end])
                done += end - begin
                if progress is not None:
                    progress(done)
        return accumulator

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memory = np.empty((0, self.n_features), self.dtype)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def slice_positions(dataset) -> np.ndarray:
    """(n,) float64 normalised position of every slice of a ``SliceDataset`` in its volume: 0 for the
    first slice along the slicing axis, 1 for the last (0 for a one-slice volume).

    Raises:
        ValueError: for a dataset without ``slice_counts``.
    """
    counts = getattr(dataset, "slice_counts", None)
    if counts is None:
        raise ValueError(
            f"slice_position needs each slice's position in its volume: a dataset with slice_counts "
            f"(aiva_monai.data.SliceDataset), got {type(dataset).__name__}."
        )
    counts = np.asarray(counts, dtype=np.int64)
    positions = [np.arange(count) / max(count - 1, 1) for count in counts]
    return np.concatenate(positions) if positions else np.zeros(0)


def _check_sizes(n_source: int, n_target: int, n_clusters: int) -> None:
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}.")
    for site, n in (("source", n_source), ("target", n_target)):
        if n < n_clusters:
            raise ValueError(
                f"the {site} site has {n} samples, fewer than n_clusters={n_clusters}: "
                f"lower n_clusters or add {site} data."
            )


Progress = Callable[[str, int, int], None]  # (stage, done, total)


class _TSNEProgress:
    """openTSNE callback: reports iterations done over both optimisation phases (every 25 iterations)."""

    every = 25

    def __init__(self, progress: Progress, phases: list[int]) -> None:
        self.progress, self.phases, self.phase, self.total = progress, phases, -1, sum(phases)

    def optimization_about_to_start(self) -> None:
        self.phase += 1

    def __call__(self, iteration, error, embedding) -> bool:
        self.progress("tsne", sum(self.phases[: max(self.phase, 0)]) + int(iteration), self.total)
        return False  # never stop the optimisation


def _tsne(
    points: np.ndarray,
    settings: ClusteringSettings,
    perplexity: float,
    init_embedding=None,
    progress: Progress | None = None,
) -> np.ndarray:
    if settings.tsne_method == "opentsne":
        from openTSNE import TSNE

        warm = init_embedding is not None
        phases = [settings.tsne_warm_iter] if warm else [settings.tsne_exaggeration_iter, settings.tsne_iter]
        callback = _TSNEProgress(progress, phases) if progress is not None else None
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            negative_gradient_method="fft",
            early_exaggeration_iter=settings.tsne_exaggeration_iter,
            n_iter=settings.tsne_iter,
            random_state=settings.seed,
            n_jobs=settings.n_jobs,
            callbacks=[callback] if callback else None,
            callbacks_every_iters=_TSNEProgress.every,
            verbose=False,
        )
        # openTSNE logs routine notes at INFO (and, for a warm start, that a spread-out initialisation is
        # unusual, which is intended here): only its errors reach the round's log
        quiet, level = logging.getLogger("openTSNE"), logging.getLogger("openTSNE").level
        quiet.setLevel(logging.ERROR)
        try:
            if not warm:
                return np.asarray(tsne.fit(points), dtype=np.float64)
            # warm start: the previous round's layout, new affinities, no early exaggeration (the layout is
            # already organised; exaggeration would collapse it); openTSNE's "optimise further" usage
            embedding = tsne.prepare_initial(
                points, initialization=np.ascontiguousarray(init_embedding, dtype=np.float64)
            )
            if settings.tsne_warm_iter:
                embedding = embedding.optimize(
                    n_iter=settings.tsne_warm_iter, momentum=tsne.final_momentum, inplace=True, propagate_exception=True
                )
            return np.asarray(embedding, dtype=np.float64)
        finally:
            quiet.setLevel(level)
    if settings.tsne_method == "sklearn":
        from sklearn.manifold import TSNE

        # scikit-learn's early exaggeration is fixed at 250 iterations, counted in max_iter
        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            init="pca",
            random_state=settings.seed,
            n_jobs=settings.n_jobs,
            max_iter=250 + settings.tsne_iter,
        )
        return np.asarray(tsne.fit_transform(points), dtype=np.float64)
    raise ValueError(f"unknown tsne_method {settings.tsne_method!r}; choose one of {TSNE_METHODS}.")


def tsne_input(reduced: np.ndarray, positions=None, weight: float = 0.0) -> np.ndarray:
    """The t-SNE input: PCA scores (n, c), plus, when ``weight`` > 0, the column
    ``weight * sqrt(total variance of the scores) * positions`` (each slice's position in its volume)."""
    if not weight:
        return reduced
    if positions is None:
        raise ValueError(
            "slice_position > 0 needs each slice's position in its volume (source_positions, target_positions)."
        )
    positions = np.asarray(positions, dtype=np.float64).reshape(-1)
    if len(positions) != len(reduced):
        raise ValueError(f"got {len(positions)} slice positions for {len(reduced)} slices.")
    if not np.all(np.isfinite(positions)):
        raise ValueError("slice positions hold non-finite values.")
    scale = float(np.sqrt(np.asarray(reduced, dtype=np.float64).var(axis=0).sum())) or 1.0
    return np.column_stack([reduced, weight * scale * positions]).astype(reduced.dtype)


def kmeans_sites(source_points: np.ndarray, target_points: np.ndarray, n_clusters: int, settings: ClusteringSettings):
    """k-means on the source and on the target points (step 3): two fitted scikit-learn ``KMeans``.
    With ``settings.target_init_from_source`` the target's starts from the source centres (one run)."""
    source = KMeans(n_clusters=n_clusters, n_init=settings.kmeans_n_init, random_state=settings.seed).fit(source_points)
    if settings.target_init_from_source:
        target = KMeans(n_clusters=n_clusters, init=source.cluster_centers_, n_init=1, random_state=settings.seed)
    else:
        target = KMeans(n_clusters=n_clusters, n_init=settings.kmeans_n_init, random_state=settings.seed)
    return source, target.fit(target_points)


def torch_pca(points, n_components: int, device=None) -> np.ndarray:
    """PCA scores (n, n_components) computed with torch (on ``device``, e.g. a GPU), as float32 numpy.

    Exact (SVD of the centred (n, m) matrix, via the m x m covariance when n >= m), so the result equals
    scikit-learn's ``PCA(n_components).fit_transform`` up to the sign of each component and float
    rounding. Signs follow scikit-learn's convention (``svd_flip``: the largest-magnitude loading of each
    component is positive).
    """
    x = torch.as_tensor(points)
    x = x.to(
        device if device is not None else x.device,
        torch.float64 if x.device.type == "cpu" and device is None else torch.float32,
    )
    x = x - x.mean(dim=0, keepdim=True)
    n, m = x.shape
    k = max(1, min(int(n_components), n, m))
    if n >= m:
        values, vectors = torch.linalg.eigh(x.T @ x)  # ascending
        components = vectors[:, torch.argsort(values, descending=True)[:k]]  # (m, k)
    else:
        _, _, vh = torch.linalg.svd(x, full_matrices=False)
        components = vh[:k].T
    largest = components.abs().argmax(dim=0)
    signs = torch.sign(components[largest, torch.arange(k, device=components.device)])
    signs[signs == 0] = 1
    components = components * signs
    return (x @ components).float().cpu().numpy()


def cluster_sketches(
    source_sketch,
    target_sketch,
    n_clusters: int = 12,
    settings: ClusteringSettings | dict | None = None,
    *,
    source_positions=None,
    target_positions=None,
    init_embedding=None,
    progress: Progress | None = None,
    **options,
) -> SiteClustering:
    """Steps 2-4 on (projected) features: joint PCA, joint t-SNE, per-site k-means, matching.

    Args:
        source_sketch: (n_s, m) source features (already projected, or small enough to use as is).
        target_sketch: (n_t, m) target features, same m.
        n_clusters: k, clusters per site.
        settings: a ``ClusteringSettings`` (or a dict of settings; None: the defaults). Used here:
            ``pca_components``, ``pca_device``, ``tsne_*``, ``perplexity``, ``kmeans_n_init``,
            ``target_init_from_source``, ``slice_position``, ``seed``, ``n_jobs``. Sketches given as
            CUDA tensors run the PCA on their device.
        source_positions, target_positions: (n_s,), (n_t,) position of each slice in its volume in
            [0, 1] (``slice_positions``); needed only when ``settings.slice_position`` > 0.
        init_embedding: (n_s + n_t, 2) previous round's embedding; used, with ``settings.tsne_warm_start``
            and openTSNE, as the starting layout (ignored when its shape differs).
        progress: called as ``progress(stage, done, total)`` at each stage and during t-SNE.
        options: the same settings as keywords (``pca_components=..., tsne_method=...``): applied on top
            of ``settings``, for callers of the former signature.

    Returns:
        SiteClustering with ``source_means`` left as None.
    """
    settings = ClusteringSettings.coerce(settings, **options)
    pca_device = settings.pca_device
    if pca_device is None and torch.is_tensor(source_sketch) and source_sketch.is_cuda:
        pca_device = source_sketch.device
    if torch.is_tensor(source_sketch):
        source_sketch = source_sketch.detach().cpu().numpy()
    if torch.is_tensor(target_sketch):
        target_sketch = target_sketch.detach().cpu().numpy()
    source = np.asarray(source_sketch, dtype=np.float32)
    target = np.asarray(target_sketch, dtype=np.float32)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(
            f"source and target sketches must be (n, m) with the same m, got {source.shape} and {target.shape}."
        )
    _check_sizes(len(source), len(target), n_clusters)
    for site, values in (("source", source), ("target", target)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"the {site} features hold non-finite values (NaN or Inf).")
    positions = None
    if settings.slice_position:
        if source_positions is None or target_positions is None:
            raise ValueError(
                "slice_position > 0 needs source_positions and target_positions (slice_positions(dataset))."
            )
        positions = np.concatenate(
            [np.asarray(source_positions, np.float64).reshape(-1), np.asarray(target_positions, np.float64).reshape(-1)]
        )
    joint = np.concatenate([source, target])
    n_total, n_source = len(joint), len(source)
    report = progress or (lambda stage, done, total: None)
    timings = {}

    start = time.perf_counter()
    report("pca", 0, 1)
    n_components = max(1, min(settings.pca_components, n_total, joint.shape[1]))
    if pca_device is not None and torch.device(pca_device).type != "cpu":
        reduced = torch_pca(joint, n_components, device=pca_device)
    else:
        reduced = PCA(n_components=n_components, random_state=settings.seed).fit_transform(joint)
    points = tsne_input(reduced, positions, settings.slice_position)
    timings["pca"] = time.perf_counter() - start

    start = time.perf_counter()
    used_perplexity = float(min(settings.perplexity, max((n_total - 1) / 3.0, 1.0)))
    warm = (
        settings.tsne_warm_start
        and settings.tsne_method == "opentsne"
        and init_embedding is not None
        and np.shape(init_embedding) == (n_total, 2)
    )
    report("tsne", 0, settings.tsne_warm_iter if warm else settings.tsne_exaggeration_iter + settings.tsne_iter)
    embedding = _tsne(points, settings, used_perplexity, init_embedding if warm else None, progress)
    timings["tsne"] = time.perf_counter() - start

    start = time.perf_counter()
    report("kmeans", 0, 2)
    source_fit, target_fit = kmeans_sites(embedding[:n_source], embedding[n_source:], n_clusters, settings)
    timings["kmeans"] = time.perf_counter() - start

    start = time.perf_counter()
    source_centers, target_centers = source_fit.cluster_centers_, target_fit.cluster_centers_
    match = match_clusters(source_centers, target_centers)
    cost = matched_cost(source_centers, target_centers, match)
    timings["match"] = time.perf_counter() - start

    return SiteClustering(
        source_labels=source_fit.labels_.astype(np.int64),
        target_labels=target_fit.labels_.astype(np.int64),
        embedding=embedding,
        source_centers=source_centers,
        target_centers=target_centers,
        match=match,
        matched_cost=cost,
        perplexity=used_perplexity,
        timings=timings,
        warm_started=bool(warm),
    )


def _chunks(features, chunk_size: int):
    for begin in range(0, len(features), chunk_size):
        chunk = features[begin : begin + chunk_size]
        # np.array copies one chunk: memory-mapped inputs are read-only and stay on disk
        yield chunk if torch.is_tensor(chunk) else torch.from_numpy(np.array(chunk))


def cluster_sites(
    source_features,
    target_features,
    n_clusters: int = 12,
    settings: ClusteringSettings | dict | None = None,
    *,
    chunk_size: int = 256,
    source_positions=None,
    target_positions=None,
    **options,
) -> SiteClustering:
    """Cluster a source and a target site in bottleneck space and match their clusters.

    Args:
        source_features: (n_s, ...) source bottleneck features (numpy array, memmap or tensor);
            each sample is flattened to D values.
        target_features: (n_t, ...) target features with the same trailing shape.
        n_clusters: k, clusters per site (paper: 12).
        settings: a ``ClusteringSettings`` (or dict, or None for the defaults); ``sketch_dim`` and
            ``seed`` set the projection, the rest as in ``cluster_sketches``.
        chunk_size: samples projected at a time (bounds the extra memory).
        source_positions, target_positions: slice positions in [0, 1] for ``slice_position``.
        options: settings as keywords (``pca_components``, ``sketch_dim``, ``tsne_method``,
            ``perplexity``, ``seed``, ``n_jobs``, ``kmeans_n_init``, ...), applied on top of ``settings``.

    Returns:
        SiteClustering, with ``source_means`` (k, D) computed from the full features.

    Raises:
        ValueError: mismatched trailing shapes, a site with fewer samples than clusters,
            non-finite features, or an unknown setting.
    """
    settings = ClusteringSettings.coerce(settings, **options)
    source_shape, target_shape = tuple(source_features.shape), tuple(target_features.shape)
    if len(source_shape) < 2 or source_shape[1:] != target_shape[1:]:
        raise ValueError(
            f"source features {source_shape} and target features {target_shape} must be (n, ...) "
            "with the same trailing shape."
        )
    _check_sizes(source_shape[0], target_shape[0], n_clusters)
    n_features = int(np.prod(source_shape[1:]))

    start = time.perf_counter()
    projector = FeatureProjector(n_features, sketch_dim=settings.sketch_dim, seed=settings.seed)
    sketches = [
        torch.cat([projector(chunk) for chunk in _chunks(site, chunk_size)]).numpy()
        for site in (source_features, target_features)
    ]
    project_time = time.perf_counter() - start

    result = cluster_sketches(
        sketches[0],
        sketches[1],
        n_clusters,
        settings,
        source_positions=source_positions,
        target_positions=target_positions,
    )

    start = time.perf_counter()
    accumulator = ClusterMeanAccumulator(n_clusters, n_features)
    for begin, chunk in zip(range(0, source_shape[0], chunk_size), _chunks(source_features, chunk_size)):
        accumulator.update(chunk, result.source_labels[begin : begin + len(chunk)])
    result.source_means = accumulator.means()
    result.timings = {"project": project_time, **result.timings, "means": time.perf_counter() - start}
    return result
