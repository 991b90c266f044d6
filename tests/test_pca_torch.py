"""The torch PCA used on a GPU equals scikit-learn's PCA (checked on the CPU here), up to component signs."""

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA

from aiva_monai.clustering import cluster_sketches, torch_pca


@pytest.mark.parametrize("n, m", [(2000, 64), (30, 64), (600, 1024), (3000, 1024)])
def test_torch_pca_equals_sklearn_up_to_sign(n, m):
    rng = np.random.default_rng(n + m)
    latent = rng.normal(size=(n, 25)) * (0.8 ** np.arange(25)) * 10  # a clear spectrum, as bottleneck sketches have
    points = (latent @ rng.normal(size=(25, m)) + 0.01 * rng.normal(size=(n, m))).astype(np.float32)
    reference = PCA(n_components=20, random_state=0).fit_transform(points)
    mine = torch_pca(points, 20)
    assert mine.shape == reference.shape and mine.dtype == np.float32
    signs = np.sign((reference * mine).sum(axis=0))
    np.testing.assert_allclose(mine, reference * signs, atol=1e-5 * np.abs(reference).max())


def test_torch_pca_caps_components_and_takes_tensors():
    points = torch.randn(5, 3)
    assert torch_pca(points, 20).shape == (5, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cluster_sketches_pca_on_the_gpu_gives_the_cpu_clustering():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 64)) * 5
    source = np.concatenate([c + rng.normal(size=(40, 64)) for c in centres]).astype(np.float32)
    target = np.concatenate([c + 0.5 + rng.normal(size=(40, 64)) for c in centres]).astype(np.float32)
    cpu = cluster_sketches(source, target, 3, tsne_method="sklearn")
    gpu = cluster_sketches(torch.from_numpy(source).cuda(), torch.from_numpy(target).cuda(), 3, tsne_method="sklearn")
    from sklearn.metrics import adjusted_rand_score

    assert adjusted_rand_score(cpu.source_labels, gpu.source_labels) == 1.0
