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
