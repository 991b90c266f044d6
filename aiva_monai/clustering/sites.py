"""Steps 2-4 of a round on arrays: joint PCA, joint t-SNE, per-site k-means and matching (``cluster_sketches``),
and all five steps on features held in memory (``cluster_sites``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from aiva_monai.alignment import match_clusters, matched_cost
from aiva_monai.clustering.features import ClusterMeanAccumulator, FeatureProjector
from aiva_monai.clustering.settings import TSNE_METHODS, ClusteringSettings, SiteClustering

logger = logging.getLogger(__name__)


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
            neighbors=settings.tsne_neighbors,
            ints_in_interval=float(settings.tsne_fft_cell),
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
            ``target_init_from_source``, ``slice_position``, ``match_space``, ``seed``, ``n_jobs``. Sketches given as
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
    centers_by_space = {
        "tsne": (source_centers, target_centers),
        "pca": (
            _member_means(points[:n_source], source_fit.labels_, n_clusters),
            _member_means(points[n_source:], target_fit.labels_, n_clusters),
        ),
    }
    matches = {space: match_clusters(*centers) for space, centers in centers_by_space.items()}
    match = matches[settings.match_space]
    cost = matched_cost(*centers_by_space[settings.match_space], match)
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
        match_space=settings.match_space,
        matches=matches,
    )


def _member_means(points: np.ndarray, labels: np.ndarray, n_clusters: int) -> np.ndarray:
    """(k, d) mean of the (n, d) points of each k-means cluster (k-means leaves no cluster empty)."""
    sums = ClusterMeanAccumulator(n_clusters, points.shape[1])
    sums.update(torch.from_numpy(np.ascontiguousarray(points)), labels)
    return sums.means().double().numpy()


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
