import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression
from sklearn.metrics import adjusted_rand_score

from aiva_monai.clustering import ClusterMeanAccumulator, FeatureProjector, cluster_sites


def planted_sites(k=5, per_mode=40, n_features=4096, seed=0):
    """Two sites sharing the same k modes; the target is rescaled and shifted (a 'scanner change')."""
    rng = np.random.default_rng(seed)
    modes = rng.normal(size=(k, n_features))
    source_modes = np.repeat(np.arange(k), per_mode)
    target_modes = rng.permutation(source_modes)
    source = modes[source_modes] + rng.normal(size=(len(source_modes), n_features))
    shift = rng.normal(size=n_features) * 0.3
    target = 1.3 * (modes[target_modes] + rng.normal(size=(len(target_modes), n_features))) + shift
    # trailing (C, H, W) shape, like a bottleneck map
    shape = (16, 16, n_features // 256)
    return (
        source.reshape(-1, *shape).astype(np.float32),
        target.reshape(-1, *shape).astype(np.float32),
        source_modes,
        target_modes,
    )


def majority(labels, truth, k):
    return np.array([np.bincount(truth[labels == c], minlength=k).argmax() for c in range(k)])


@pytest.mark.parametrize("tsne_method", ["opentsne", "sklearn"])
def test_cluster_sites_recovers_planted_modes_and_pairs_them(tsne_method):
    k = 5
    source, target, source_modes, target_modes = planted_sites(k)
    result = cluster_sites(source, target, n_clusters=k, seed=0, tsne_method=tsne_method)
    assert result.source_labels.shape == (len(source),) and result.target_labels.shape == (len(target),)
    assert result.embedding.shape == (len(source) + len(target), 2)
    assert result.source_centers.shape == result.target_centers.shape == (k, 2)
    assert result.source_means.shape == (k, source[0].size)
    assert adjusted_rand_score(source_modes, result.source_labels) == pytest.approx(1.0)
    assert adjusted_rand_score(target_modes, result.target_labels) == pytest.approx(1.0)
    source_mode_of = majority(result.source_labels, source_modes, k)
    target_mode_of = majority(result.target_labels, target_modes, k)
    for target_cluster in range(k):
        assert target_mode_of[target_cluster] == source_mode_of[result.match[target_cluster]]


def test_source_means_are_full_dimensional_cluster_means():
    source, target, _, _ = planted_sites(k=3, per_mode=15, n_features=2048)
    result = cluster_sites(source, target, n_clusters=3, seed=0, chunk_size=7)
    flat = source.reshape(len(source), -1).astype(np.float64)
    for cluster in range(3):
        expected = flat[result.source_labels == cluster].mean(axis=0)
        np.testing.assert_allclose(result.source_means[cluster].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_cluster_sites_is_deterministic_for_a_seed():
    source, target, _, _ = planted_sites(k=3, per_mode=20, n_features=2048, seed=3)
    first = cluster_sites(source, target, n_clusters=3, seed=7)
    second = cluster_sites(torch.from_numpy(source), torch.from_numpy(target), n_clusters=3, seed=7)
    np.testing.assert_array_equal(first.embedding, second.embedding)
    np.testing.assert_array_equal(first.target_labels, second.target_labels)
    np.testing.assert_array_equal(first.match, second.match)
    other = cluster_sites(source, target, n_clusters=3, seed=8)
    assert not np.array_equal(first.embedding, other.embedding)


def test_cluster_sites_reads_memory_mapped_features(tmp_path):
    source, target, _, _ = planted_sites(k=3, per_mode=15, n_features=2048)
    mapped = np.lib.format.open_memmap(tmp_path / "source.npy", mode="w+", dtype=np.float32, shape=source.shape)
    mapped[:] = source
    mapped.flush()
    from_disk = cluster_sites(np.load(tmp_path / "source.npy", mmap_mode="r"), target, n_clusters=3, seed=0)
    in_memory = cluster_sites(source, target, n_clusters=3, seed=0)
    np.testing.assert_array_equal(from_disk.source_labels, in_memory.source_labels)


def test_cluster_sites_errors():
    source, target, _, _ = planted_sites(k=3, per_mode=4, n_features=1024)
    with pytest.raises(ValueError, match="the target site has 3 samples, fewer than n_clusters=5"):
        cluster_sites(source, target[:3], n_clusters=5)
    with pytest.raises(ValueError, match="same trailing shape"):
        cluster_sites(source, target.reshape(len(target), -1), n_clusters=3)
    bad = target.copy()
    bad[2, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        cluster_sites(source, bad, n_clusters=3)
    with pytest.raises(ValueError, match="unknown tsne_method"):
        cluster_sites(source, target, n_clusters=3, tsne_method="umap")


def test_projection_preserves_distances():
    rng = np.random.default_rng(1)
    features = torch.from_numpy(rng.normal(size=(40, 65536)).astype(np.float32))
    projector = FeatureProjector(65536, sketch_dim=1024, seed=0)
    sketch = projector(features)
    assert sketch.shape == (40, 1024)
    original = torch.pdist(features)
    projected = torch.pdist(sketch)
    ratio = projected / original
    assert float(ratio.min()) > 0.85 and float(ratio.max()) < 1.15  # JL: ~sqrt(2 / 1024) relative spread
    # the same seed gives the same matrix, so chunks projected separately agree
    torch.testing.assert_close(FeatureProjector(65536, 1024, seed=0)(features[:5]), sketch[:5])


def test_pca_of_the_sketch_spans_the_exact_principal_subspace():
    rng = np.random.default_rng(2)
    n, d, rank = 300, 16384, 5
    signal = rng.normal(size=(n, rank)) * np.array([20, 15, 12, 9, 7]) @ rng.normal(size=(rank, d)) / np.sqrt(d)
    features = (signal + rng.normal(size=(n, d)) * 0.05).astype(np.float32)
    exact = PCA(rank).fit_transform(features)
    sketch = FeatureProjector(d, 1024, seed=0)(torch.from_numpy(features)).numpy()
    approximate = PCA(rank).fit_transform(sketch)
    r2 = LinearRegression().fit(approximate, exact).score(approximate, exact)
    assert r2 > 0.99


def test_identity_projection_for_small_features():
    projector = FeatureProjector(100, sketch_dim=1024)
    features = torch.randn(3, 4, 25)
    assert projector.is_identity
    torch.testing.assert_close(projector(features), features.reshape(3, -1))


def test_cluster_mean_accumulator():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(30, 6)), rng.integers(0, 3, 30)
    accumulator = ClusterMeanAccumulator(3, 6)
    for begin in range(0, 30, 4):
        accumulator.update(torch.from_numpy(features[begin : begin + 4]), labels[begin : begin + 4])
    for cluster in range(3):
        np.testing.assert_allclose(accumulator.means()[cluster].numpy(), features[labels == cluster].mean(0), rtol=1e-6)
    empty = ClusterMeanAccumulator(4, 6)
    empty.update(torch.from_numpy(features), labels)
    with pytest.raises(ValueError, match=r"source clusters \[3\] received no sample"):
        empty.means()


# -- settings ---------------------------------------------------------------------------------------------


def test_settings_are_one_frozen_object_built_from_a_bundle_dict():
    import dataclasses

    from aiva_monai.clustering import ClusteringSettings

    options = {"pca_components": 20, "sketch_dim": 1024, "tsne_method": "sklearn", "perplexity": 30.0, "batch_size": 16}
    settings = ClusteringSettings.coerce(options, seed=3, n_jobs=None)  # None: not given
    assert (settings.tsne_method, settings.batch_size, settings.seed, settings.n_jobs) == ("sklearn", 16, 3, -1)
    assert ClusteringSettings.coerce(settings) is settings and ClusteringSettings.coerce(None) == ClusteringSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.seed = 4
    assert settings.replace(seed=4).seed == 4 and settings.seed == 3
    assert hash(settings) == hash(ClusteringSettings.coerce(options, seed=3))
    with pytest.raises(ValueError, match=r"unknown clustering setting\(s\) \['tsne_iterations'\]"):
        ClusteringSettings.coerce({"tsne_iterations": 3})
    with pytest.raises(ValueError, match="unknown tsne_method 'umap'"):
        ClusteringSettings(tsne_method="umap")
    with pytest.raises(ValueError, match="slice_position"):
        ClusteringSettings(slice_position=-1)
    with pytest.raises(ValueError, match="unknown tsne_neighbors 'hnsw'"):
        ClusteringSettings(tsne_neighbors="hnsw")
    with pytest.raises(ValueError, match="overlap_embedding .* set overlap too"):
        ClusteringSettings(overlap_embedding=True)
    assert ClusteringSettings(overlap=True, overlap_embedding=True).overlap_embedding
    for lead in (-1, 2.5, True):
        with pytest.raises(ValueError, match="overlap_lead_steps"):
            ClusteringSettings(overlap=True, overlap_lead_steps=lead)
    with pytest.raises(ValueError, match="> 0 only with overlap"):
        ClusteringSettings(overlap_lead_steps=10)
    for cell in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="tsne_fft_cell must be a positive number"):
            ClusteringSettings(tsne_fft_cell=cell)
    with pytest.raises(TypeError):
        ClusteringSettings.coerce(3)


# -- the feature store (source means without a second pass) ---------------------------------------------


@pytest.mark.parametrize("memory_mb", [64.0, 0.0, 0.005])  # all in memory, all in the file, split
def test_feature_store_sums_equal_direct_means(memory_mb):
    from aiva_monai.clustering import FeatureStore

    rng = np.random.default_rng(0)
    features = rng.normal(size=(37, 4, 5, 6)).astype(np.float32) * rng.uniform(0.1, 1e5, size=(37, 1, 1, 1)).astype(
        np.float32
    )
    labels = rng.integers(0, 3, 37)
    exact = FeatureStore(37, 120, "float32", memory_mb)
    half = FeatureStore(37, 120, "float16", memory_mb)
    assert (exact.rows_on_disk > 0) == (half.rows_on_disk > 0) == (memory_mb < 64)
    for begin in range(0, 37, 8):
        exact.write(begin, torch.from_numpy(features[begin : begin + 8]))
        half.write(begin, torch.from_numpy(features[begin : begin + 8]))
    direct = ClusterMeanAccumulator(3, 120)
    direct.update(torch.from_numpy(features), labels)
    assert torch.equal(exact.cluster_sums(labels, 3).means(), direct.means())  # float32: exact, same order
    flat = features.reshape(37, -1)
    np.testing.assert_array_equal(exact.read(5, 30), flat[5:30])
    # float16 with one scale per row: every value within 2^-11 of its row's largest value, no overflow
    # (values up to 1e5 exceed float16's 65504)
    error = np.abs(half.read(0, 37) - flat) / np.abs(flat).max(axis=1, keepdims=True)
    assert np.isfinite(half.read(0, 37)).all() and error.max() <= 2.0**-11
    torch.testing.assert_close(
        half.cluster_sums(labels, 3).means(), direct.means(), rtol=1e-3, atol=1e-3 * float(np.abs(flat).max())
    )
    exact.close(), half.close()


def test_feature_store_sums_only_the_rows_written_here():
    from aiva_monai.clustering import FeatureStore

    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(20, 6)).astype(np.float32), rng.integers(0, 2, 20)
    store = FeatureStore(20, 6, "float32", memory_mb=0.0)
    for begin in (0, 8, 16):  # one rank of two with batches of 4 writes batches 0, 2, 4
        store.write(begin, torch.from_numpy(features[begin : begin + 4]))
    sums = store.cluster_sums(labels, 2)
    rows = np.r_[0:4, 8:12, 16:20]
    for cluster in range(2):
        chosen = rows[labels[rows] == cluster]
        np.testing.assert_allclose(sums.sums[cluster].numpy(), features[chosen].astype(np.float64).sum(0), rtol=1e-12)
        assert float(sums.counts[cluster]) == len(chosen)
    with pytest.raises(ValueError, match="were not all written"):
        store.read(3, 6)
    with pytest.raises(IndexError):
        store.write(18, torch.from_numpy(features[:4]))


# -- slice position and the t-SNE input -------------------------------------------------------------------


def test_slice_positions_and_the_weighted_position_column():
    from aiva_monai.clustering import slice_positions, tsne_input

    class Volumes:
        slice_counts = np.array([3, 1, 5])

    np.testing.assert_allclose(slice_positions(Volumes()), [0, 0.5, 1, 0, 0, 0.25, 0.5, 0.75, 1])
    with pytest.raises(ValueError, match="slice_counts"):
        slice_positions([1, 2])
    scores = np.array([[1.0, 0.0], [-1.0, 2.0], [0.0, -2.0]])
    positions = np.array([0.0, 0.5, 1.0])
    assert tsne_input(scores, positions, 0.0) is scores
    total_std = np.sqrt(scores.var(axis=0).sum())  # sqrt(2/3 + 8/3)
    np.testing.assert_allclose(
        tsne_input(scores, positions, 2.0), np.column_stack([scores, 2.0 * total_std * positions])
    )
    with pytest.raises(ValueError, match="positions"):
        tsne_input(scores, None, 1.0)


def test_slice_position_makes_the_clusters_follow_the_position():
    # features: noise only; positions: two groups (top and bottom of the volumes). With a weight the
    # clusters split by position, without one they do not
    from aiva_monai.clustering import cluster_sketches

    rng = np.random.default_rng(0)
    source, target = rng.normal(size=(60, 40)).astype(np.float32), rng.normal(size=(60, 40)).astype(np.float32)
    source_positions = np.r_[rng.uniform(0, 0.2, 30), rng.uniform(0.8, 1, 30)]
    target_positions = rng.permutation(source_positions)
    kwargs = dict(source_positions=source_positions, target_positions=target_positions, tsne_method="sklearn", seed=0)
    weighted = cluster_sketches(source, target, 2, slice_position=3.0, **kwargs)
    plain = cluster_sketches(source, target, 2, **kwargs)
    assert adjusted_rand_score(source_positions > 0.5, weighted.source_labels) == pytest.approx(1.0)
    assert adjusted_rand_score(target_positions > 0.5, weighted.target_labels) == pytest.approx(1.0)
    # matched clusters hold the same end of the volumes
    for cluster in range(2):
        source_side = source_positions[weighted.source_labels == weighted.match[cluster]].mean() > 0.5
        assert source_side == (target_positions[weighted.target_labels == cluster].mean() > 0.5)
    assert adjusted_rand_score(source_positions > 0.5, plain.source_labels) < 0.3
    with pytest.raises(ValueError, match="source_positions and target_positions"):
        cluster_sketches(source, target, 2, slice_position=1.0, tsne_method="sklearn")


# -- target k-means initialised from the source centres ---------------------------------------------------


def test_target_kmeans_initialised_from_the_source_centres():
    from sklearn.cluster import KMeans

    from aiva_monai.clustering import ClusteringSettings, kmeans_sites

    rng = np.random.default_rng(0)
    centres = rng.uniform(-20, 20, size=(6, 2))
    source = np.repeat(centres, 30, axis=0) + rng.normal(size=(180, 2))
    target = np.repeat(centres + 1.5, 30, axis=0) + rng.normal(size=(180, 2))  # the same modes, moved a little
    target = target[rng.permutation(180)]  # in another order
    settings = ClusteringSettings(seed=0)
    source_fit, from_source = kmeans_sites(source, target, 6, settings.replace(target_init_from_source=True))
    reference = KMeans(6, init=source_fit.cluster_centers_, n_init=1, random_state=0).fit(target)
    np.testing.assert_array_equal(from_source.labels_, reference.labels_)
    assert from_source.n_iter_ >= 1 and not np.allclose(from_source.cluster_centers_, source_fit.cluster_centers_)
    # initialised from the source, target cluster i grows from source cluster i: the matching is the identity
    from aiva_monai.alignment import match_clusters

    np.testing.assert_array_equal(
        match_clusters(source_fit.cluster_centers_, from_source.cluster_centers_), np.arange(6)
    )
    _, plus_plus = kmeans_sites(source, target, 6, settings)  # k-means++ numbers the clusters its own way
    assert not np.array_equal(match_clusters(source_fit.cluster_centers_, plus_plus.cluster_centers_), np.arange(6))
    assert adjusted_rand_score(plus_plus.labels_, from_source.labels_) == pytest.approx(1.0)  # same partition here


# -- the cheaper t-SNE round ------------------------------------------------------------------------------


def test_shorter_tsne_gives_the_same_clusters_and_matches_as_opentsne_defaults_on_planted_modes():
    k = 6
    source, target, source_modes, target_modes = planted_sites(k, per_mode=40, n_features=2048, seed=4)
    default = cluster_sites(source, target, n_clusters=k, seed=0, tsne_iter=500)  # openTSNE's own schedule
    short = cluster_sites(source, target, n_clusters=k, seed=0)  # tsne_iter=250
    for result in (default, short):
        assert adjusted_rand_score(source_modes, result.source_labels) == pytest.approx(1.0)
        assert adjusted_rand_score(target_modes, result.target_labels) == pytest.approx(1.0)
    mode_match = []
    for result in (default, short):
        source_mode_of = majority(result.source_labels, source_modes, k)
        target_mode_of = majority(result.target_labels, target_modes, k)
        mode_match.append({int(target_mode_of[i]): int(source_mode_of[result.match[i]]) for i in range(k)})
    assert mode_match[0] == mode_match[1] == {m: m for m in range(k)}


def test_tsne_warm_start_starts_from_the_previous_embedding():
    from aiva_monai.clustering import cluster_sketches

    k = 4
    source, target, source_modes, target_modes = planted_sites(k, per_mode=30, n_features=512, seed=5)
    source, target = source.reshape(len(source), -1), target.reshape(len(target), -1)
    first = cluster_sketches(source, target, k, seed=0)
    previous = first.embedding + 1000.0  # a layout no fresh t-SNE would produce
    frozen = cluster_sketches(
        source, target, k, seed=0, tsne_warm_start=True, tsne_warm_iter=0, init_embedding=previous
    )
    assert frozen.warm_started
    np.testing.assert_allclose(frozen.embedding, previous)  # 0 iterations: exactly the initial layout
    moved = source + 0.05 * np.random.default_rng(0).normal(size=source.shape).astype(np.float32)
    warm = cluster_sketches(moved, target, k, seed=0, tsne_warm_start=True, init_embedding=first.embedding)
    assert warm.warm_started
    assert adjusted_rand_score(source_modes, warm.source_labels) == pytest.approx(1.0)
    assert adjusted_rand_score(target_modes, warm.target_labels) == pytest.approx(1.0)
    np.testing.assert_array_equal(warm.match, first.match)  # clusters keep their layout, so their numbering
    cold = cluster_sketches(source, target, k, seed=0, tsne_warm_start=True, init_embedding=previous[:-1])
    assert not cold.warm_started  # another set of slices: a full t-SNE


def test_cluster_sketches_reports_progress_of_every_stage():
    from aiva_monai.clustering import cluster_sketches

    source, target, _, _ = planted_sites(3, per_mode=20, n_features=256, seed=6)
    calls = []
    cluster_sketches(
        source.reshape(60, -1),
        target.reshape(60, -1),
        3,
        seed=0,
        tsne_exaggeration_iter=50,
        tsne_iter=100,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    assert [c[0] for c in calls if c[1] == 0] == ["pca", "tsne", "kmeans"]
    tsne = [done for stage, done, total in calls if stage == "tsne" and done > 0]
    assert tsne == list(range(25, 151, 25)) and all(total == 150 for stage, _, total in calls if stage == "tsne")


@pytest.mark.parametrize("neighbors", ["exact", "annoy"])
def test_exact_neighbours_give_the_same_tsne_map_on_any_number_of_threads(neighbors):
    """openTSNE's default search (Annoy, from 1,000 points) builds its trees in parallel, so the map (and on
    planted structure even the matching) changed with ``n_jobs``; the exact search does not."""
    from aiva_monai.clustering import cluster_sketches

    k = 4
    source, target, _, _ = planted_sites(k, per_mode=150, n_features=256, seed=6)
    source, target = source.reshape(len(source), -1), target.reshape(len(target), -1)
    maps = [
        cluster_sketches(
            source, target, k, seed=0, n_jobs=jobs, tsne_neighbors=neighbors, tsne_exaggeration_iter=50, tsne_iter=50
        ).embedding
        for jobs in (1, 2)
    ]
    if neighbors == "exact":
        np.testing.assert_array_equal(maps[0], maps[1])
    else:  # the check above can fail: Annoy's parallel build does move the map
        assert not np.array_equal(maps[0], maps[1])


@pytest.mark.parametrize("changes", [{}, {"tsne_neighbors": "annoy", "tsne_fft_cell": 1.0}])
def test_neighbour_search_and_fft_grid_cell_reach_opentsne(monkeypatch, changes):
    """The grid only matters once the map is wider than openTSNE's 50 minimum cells, which small test sets never
    are; so what reaches openTSNE is checked directly (the planted tests above run with the defaults)."""
    import openTSNE

    from aiva_monai.clustering import ClusteringSettings, cluster_sketches

    seen = {}

    class Recording(openTSNE.TSNE):
        def __init__(self, *args, **kwargs):
            seen.update(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(openTSNE, "TSNE", Recording)
    source, target, _, _ = planted_sites(3, per_mode=10, n_features=256, seed=8)
    source, target = source.reshape(len(source), -1), target.reshape(len(target), -1)
    settings = ClusteringSettings(tsne_exaggeration_iter=10, tsne_iter=10, **changes)
    cluster_sketches(source, target, 3, settings)
    assert seen["neighbors"] == settings.tsne_neighbors == changes.get("tsne_neighbors", "exact")
    assert seen["ints_in_interval"] == settings.tsne_fft_cell == changes.get("tsne_fft_cell", 2.0)


def test_feature_store_float16_rows_are_numpys_per_row_scaled_rounding_bit_for_bit():
    """The store converts with torch (10 x faster than numpy's float16 cast): same division, same rounding."""
    from aiva_monai.clustering import FeatureStore

    rng = np.random.default_rng(1)
    flat = (rng.normal(size=(9, 300)) * rng.uniform(1e-3, 1e4, size=(9, 1))).astype(np.float32)
    flat[4] = 0.0  # an all-zero row keeps scale 1
    flat[6, :5] = [6.1e-5, -6.1e-5, 1e-8, 65504.0, 0.5]  # subnormals and the float16 limit after scaling
    store = FeatureStore(9, 300, "float16")
    store.write(0, torch.from_numpy(flat).reshape(9, 3, 10, 10).to(memory_format=torch.channels_last))
    scales = np.abs(flat).max(axis=1)
    scales[scales == 0] = 1.0
    expected = (flat / scales[:, None]).astype(np.float16)
    np.testing.assert_array_equal(store._memory, expected)
    np.testing.assert_array_equal(store._scales, scales)
    np.testing.assert_array_equal(store.read(0, 9), expected.astype(np.float32) * scales[:, None])


def _islands_map(source_modes, target_modes, target_shift):
    """A stand-in for t-SNE that keeps every mode a tight island but puts target mode m where source mode
    m + target_shift lies: what a map that keeps neighbourhoods but not the distances between islands may do."""
    k = int(source_modes.max()) + 1
    corners = 50.0 * np.stack([np.cos(2 * np.pi * np.arange(k) / k), np.sin(2 * np.pi * np.arange(k) / k)], axis=1)

    def fake_tsne(points, settings, perplexity, init_embedding=None, progress=None):
        islands = np.concatenate([source_modes, (target_modes + target_shift) % k])
        return corners[islands] + np.random.default_rng(0).normal(scale=0.5, size=(len(islands), 2))

    return fake_tsne


@pytest.mark.parametrize("target_shift", [0, 2])
def test_match_space_pca_pairs_the_planted_modes_where_the_map_misplaces_the_islands(monkeypatch, target_shift):
    """Step 4 in the 2D map pairs the islands that lie together; in the PCA space, the clusters whose members
    are alike. With the target's islands rotated by ``target_shift`` the map pairs every cluster wrongly and the
    PCA space still pairs every one rightly (a common scaling and shift of the target leaves the Hungarian
    optimum of squared distances in a linear space unchanged)."""
    import aiva_monai.clustering.sites as sites

    k = 5
    source, target, source_modes, target_modes = planted_sites(k, per_mode=20, n_features=512, seed=2)
    monkeypatch.setattr(sites, "_tsne", _islands_map(source_modes, target_modes, target_shift))
    results = {space: cluster_sites(source, target, k, seed=0, match_space=space) for space in ("tsne", "pca")}
    for result in results.values():
        assert adjusted_rand_score(source_modes, result.source_labels) == pytest.approx(1.0)
        assert adjusted_rand_score(target_modes, result.target_labels) == pytest.approx(1.0)
    tsne, pca = results["tsne"], results["pca"]
    np.testing.assert_array_equal(tsne.target_labels, pca.target_labels)  # the space changes the pairs only
    source_mode_of = majority(pca.source_labels, source_modes, k)
    target_mode_of = majority(pca.target_labels, target_modes, k)
    right_in_map = sum(target_mode_of[i] == source_mode_of[tsne.match[i]] for i in range(k))
    right_in_pca = sum(target_mode_of[i] == source_mode_of[pca.match[i]] for i in range(k))
    assert right_in_pca == k
    assert right_in_map == (k if target_shift == 0 else 0)
    for result in results.values():
        assert result.match_space in ("tsne", "pca")
        np.testing.assert_array_equal(result.match, result.matches[result.match_space])
        np.testing.assert_array_equal(result.matches["tsne"], tsne.match)
        np.testing.assert_array_equal(result.matches["pca"], pca.match)
        assert result.pairs_unlike_other_space == (0 if target_shift == 0 else k)
    assert pca.match_space == "pca" and tsne.match_space == "tsne"
    assert tsne.matched_cost != pytest.approx(pca.matched_cost)  # each cost is in its own space


def test_match_space_is_checked():
    from aiva_monai.clustering import ClusteringSettings

    with pytest.raises(ValueError, match="match_space"):
        ClusteringSettings(match_space="umap")
