"""Joint embedding and per-site clustering of bottleneck features (paper, Algorithm 1, steps 2-5).

Pipeline, once per adaptation epoch:

1. ``FeatureProjector``: each flattened bottleneck vector (D values, 131,072 for a 128 x 32 x 32 map)
   is reduced on the fly to ``sketch_dim`` values by a seeded, very sparse random projection
   (Li, Hastie & Church 2006; scikit-learn's ``SparseRandomProjection``). Distances and inner
   products are preserved up to a small relative error (Johnson-Lindenstrauss), so the joint PCA
   that follows sees the same geometry, while the embedding pass never holds the full (n, D)
   matrix: 25,000 slices need 100 MB instead of 13 GB. When D <= sketch_dim the projection is the
   identity and the PCA is exact.
2. Joint PCA (scikit-learn) of source + target sketches, then one joint 2D t-SNE (openTSNE's FFT
   method by default, scikit-learn's Barnes-Hut as an option).
3. k-means separately on the source and on the target points of the 2D embedding.
4. Hungarian matching of target centres to source centres.
5. ``source_means``: mean *full-dimensional* source feature of each source cluster, accumulated
   by ``ClusterMeanAccumulator`` in a second streaming pass (or directly, for in-memory arrays).

``cluster_sites`` runs all five steps on arrays held in memory; the Ignite handler streams steps 1
and 5 through the network and calls ``cluster_sketches`` for steps 2-4.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.random_projection import SparseRandomProjection

from aiva_monai.alignment import match_clusters, matched_cost

__all__ = [
    "SiteClustering",
    "FeatureProjector",
    "ClusterMeanAccumulator",
    "cluster_sketches",
    "cluster_sites",
    "TSNE_METHODS",
    "torch_pca",
]

logger = logging.getLogger(__name__)

TSNE_METHODS = ("opentsne", "sklearn")


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


def _check_sizes(n_source: int, n_target: int, n_clusters: int) -> None:
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be at least 1, got {n_clusters}.")
    for site, n in (("source", n_source), ("target", n_target)):
        if n < n_clusters:
            raise ValueError(
                f"the {site} site has {n} samples, fewer than n_clusters={n_clusters}: "
                f"lower n_clusters or add {site} data."
            )


def _tsne(points: np.ndarray, method: str, perplexity: float, seed: int, n_jobs: int) -> np.ndarray:
    if method == "opentsne":
        from openTSNE import TSNE

        tsne = TSNE(
            n_components=2,
            perplexity=perplexity,
            negative_gradient_method="fft",
            random_state=seed,
            n_jobs=n_jobs,
            verbose=False,
        )
        return np.asarray(tsne.fit(points), dtype=np.float64)
    if method == "sklearn":
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, n_jobs=n_jobs)
        return np.asarray(tsne.fit_transform(points), dtype=np.float64)
    raise ValueError(f"unknown tsne_method {method!r}; choose one of {TSNE_METHODS}.")


def torch_pca(points, n_components: int, device=None) -> np.ndarray:
    """PCA scores (n, n_components) computed with torch (on ``device``, e.g. a GPU), as float32 numpy.

    Exact (SVD of the centred (n, m) matrix, via the m x m covariance when n >= m), so the result equals
    scikit-learn's ``PCA(n_components).fit_transform`` up to the sign of each component and float
    rounding. Signs follow scikit-learn's convention (``svd_flip``: the largest-magnitude loading of each
    component is positive).
    """
    x = torch.as_tensor(points)
    x = x.to(device if device is not None else x.device, torch.float64 if x.device.type == "cpu" and device is None else torch.float32)
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
    *,
    pca_components: int = 20,
    tsne_method: str = "opentsne",
    perplexity: float = 30.0,
    seed: int = 0,
    n_jobs: int = -1,
    kmeans_n_init: int = 10,
    pca_device=None,
) -> SiteClustering:
    """Steps 2-4 on (projected) features: joint PCA, joint t-SNE, per-site k-means, matching.

    Args:
        source_sketch: (n_s, m) source features (already projected, or small enough to use as is).
        target_sketch: (n_t, m) target features, same m.
        n_clusters: k, clusters per site.
        pca_components: PCA size before t-SNE (capped at min(n_s + n_t, m)).
        tsne_method: "opentsne" (FFT-accelerated) or "sklearn" (Barnes-Hut).
        perplexity: t-SNE perplexity; lowered to (n - 1) / 3 for very small sets.
        seed: seeds PCA, t-SNE and k-means; a fixed seed gives identical results.
        n_jobs: threads for t-SNE (-1: all cores).
        kmeans_n_init: k-means restarts.
        pca_device: None (default) runs scikit-learn's PCA on the CPU; a torch device ("cuda", "cuda:1")
            runs the exact PCA with torch there (``torch_pca``). Sketches given as CUDA tensors use
            their device.

    Returns:
        SiteClustering with ``source_means`` left as None.
    """
    if pca_device is None and torch.is_tensor(source_sketch) and source_sketch.is_cuda:
        pca_device = source_sketch.device
    if torch.is_tensor(source_sketch):
        source_sketch = source_sketch.detach().cpu().numpy()
    if torch.is_tensor(target_sketch):
        target_sketch = target_sketch.detach().cpu().numpy()
    source = np.asarray(source_sketch, dtype=np.float32)
    target = np.asarray(target_sketch, dtype=np.float32)
    if source.ndim != 2 or target.ndim != 2 or source.shape[1] != target.shape[1]:
        raise ValueError(f"source and target sketches must be (n, m) with the same m, got {source.shape} and {target.shape}.")
    _check_sizes(len(source), len(target), n_clusters)
    if tsne_method not in TSNE_METHODS:
        raise ValueError(f"unknown tsne_method {tsne_method!r}; choose one of {TSNE_METHODS}.")
    for site, values in (("source", source), ("target", target)):
        if not np.all(np.isfinite(values)):
            raise ValueError(f"the {site} features hold non-finite values (NaN or Inf).")
    joint = np.concatenate([source, target])
    n_total, n_source = len(joint), len(source)
    timings = {}

    start = time.perf_counter()
    n_components = max(1, min(pca_components, n_total, joint.shape[1]))
    if pca_device is not None and torch.device(pca_device).type != "cpu":
        reduced = torch_pca(joint, n_components, device=pca_device)
    else:
        reduced = PCA(n_components=n_components, random_state=seed).fit_transform(joint)
    timings["pca"] = time.perf_counter() - start

    start = time.perf_counter()
    used_perplexity = float(min(perplexity, max((n_total - 1) / 3.0, 1.0)))
    embedding = _tsne(reduced, tsne_method, used_perplexity, seed, n_jobs)
    timings["tsne"] = time.perf_counter() - start

    start = time.perf_counter()
    fits = [
        KMeans(n_clusters=n_clusters, n_init=kmeans_n_init, random_state=seed).fit(points)
        for points in (embedding[:n_source], embedding[n_source:])
    ]
    timings["kmeans"] = time.perf_counter() - start

    start = time.perf_counter()
    source_centers, target_centers = fits[0].cluster_centers_, fits[1].cluster_centers_
    match = match_clusters(source_centers, target_centers)
    cost = matched_cost(source_centers, target_centers, match)
    timings["match"] = time.perf_counter() - start

    return SiteClustering(
        source_labels=fits[0].labels_.astype(np.int64),
        target_labels=fits[1].labels_.astype(np.int64),
        embedding=embedding,
        source_centers=source_centers,
        target_centers=target_centers,
        match=match,
        matched_cost=cost,
        perplexity=used_perplexity,
        timings=timings,
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
    *,
    pca_components: int = 20,
    sketch_dim: int = 1024,
    tsne_method: str = "opentsne",
    perplexity: float = 30.0,
    seed: int = 0,
    n_jobs: int = -1,
    kmeans_n_init: int = 10,
    chunk_size: int = 256,
) -> SiteClustering:
    """Cluster a source and a target site in bottleneck space and match their clusters.

    Args:
        source_features: (n_s, ...) source bottleneck features (numpy array, memmap or tensor);
            each sample is flattened to D values.
        target_features: (n_t, ...) target features with the same trailing shape.
        n_clusters: k, clusters per site (paper: 12).
        pca_components: PCA size before t-SNE (reference: 20).
        sketch_dim: size of the random projection applied before PCA when D is larger.
        tsne_method: "opentsne" (default) or "sklearn".
        perplexity: t-SNE perplexity (reference: 30).
        seed: seeds the projection, PCA, t-SNE and k-means.
        n_jobs: t-SNE threads (-1: all cores).
        kmeans_n_init: k-means restarts.
        chunk_size: samples projected at a time (bounds the extra memory).

    Returns:
        SiteClustering, with ``source_means`` (k, D) computed from the full features.

    Raises:
        ValueError: mismatched trailing shapes, a site with fewer samples than clusters,
            non-finite features, or an unknown t-SNE method.
    """
    source_shape, target_shape = tuple(source_features.shape), tuple(target_features.shape)
    if len(source_shape) < 2 or source_shape[1:] != target_shape[1:]:
        raise ValueError(
            f"source features {source_shape} and target features {target_shape} must be (n, ...) with the same trailing shape."
        )
    _check_sizes(source_shape[0], target_shape[0], n_clusters)
    n_features = int(np.prod(source_shape[1:]))

    start = time.perf_counter()
    projector = FeatureProjector(n_features, sketch_dim=sketch_dim, seed=seed)
    sketches = [
        torch.cat([projector(chunk) for chunk in _chunks(site, chunk_size)]).numpy()
        for site in (source_features, target_features)
    ]
    project_time = time.perf_counter() - start

    result = cluster_sketches(
        sketches[0],
        sketches[1],
        n_clusters,
        pca_components=pca_components,
        tsne_method=tsne_method,
        perplexity=perplexity,
        seed=seed,
        n_jobs=n_jobs,
        kmeans_n_init=kmeans_n_init,
    )

    start = time.perf_counter()
    accumulator = ClusterMeanAccumulator(n_clusters, n_features)
    for begin, chunk in zip(range(0, source_shape[0], chunk_size), _chunks(source_features, chunk_size)):
        accumulator.update(chunk, result.source_labels[begin : begin + len(chunk)])
    result.source_means = accumulator.means()
    result.timings = {"project": project_time, **result.timings, "means": time.perf_counter() - start}
    return result
