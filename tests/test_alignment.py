import itertools

import numpy as np
import pytest
import torch

from aiva_monai.alignment import alignment_loss, match_clusters, matched_cost


def brute_force_match(source, target):
    k = len(source)
    best_cost, best_perm = np.inf, None
    for perm in itertools.permutations(range(k)):
        cost = sum(((target[i] - source[perm[i]]) ** 2).sum() for i in range(k))
        if cost < best_cost:
            best_cost, best_perm = cost, np.array(perm)
    return best_perm, best_cost


@pytest.mark.parametrize("k", range(1, 8))
def test_match_clusters_equals_brute_force(k):
    rng = np.random.default_rng(k)
    for _ in range(5):
        d = int(rng.integers(1, 5))
        source, target = rng.normal(size=(k, d)), rng.normal(size=(k, d))
        perm = match_clusters(source, target)
        expected_perm, expected_cost = brute_force_match(source, target)
        np.testing.assert_array_equal(perm, expected_perm)
        assert matched_cost(source, target, perm) == pytest.approx(expected_cost)
        assert perm.dtype == np.int64 and sorted(perm) == list(range(k))


def test_match_clusters_recovers_a_permutation():
    rng = np.random.default_rng(0)
    source = rng.normal(size=(9, 2)) * 10
    true_perm = rng.permutation(9)
    target = source[true_perm] + rng.normal(size=(9, 2)) * 0.01
    np.testing.assert_array_equal(match_clusters(source, target), true_perm)


@pytest.mark.parametrize(
    "source, target, message",
    [
        (np.zeros((3, 2)), np.zeros((4, 2)), "same"),
        (np.zeros((3, 2)), np.zeros((3, 3)), "same"),
        (np.zeros((0, 2)), np.zeros((0, 2)), "empty"),
        (np.array([[0.0, np.nan]]), np.zeros((1, 2)), "non-finite"),
        (np.zeros((2, 2)), np.array([[np.inf, 0.0], [0.0, 0.0]]), "non-finite"),
        (np.zeros(3), np.zeros(3), r"\(k, d\)"),
    ],
)
def test_match_clusters_rejects_bad_input(source, target, message):
    with pytest.raises(ValueError, match=message):
        match_clusters(source, target)


def _example():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    clusters = torch.tensor([0, 0, 1])
    source_means = torch.tensor([[0.0, 0.0], [1.0, 1.0]], requires_grad=True)
    match = np.array([1, 0])
    return features, clusters, source_means, match


def test_alignment_loss_hand_computed():
    features, clusters, source_means, match = _example()
    # cluster 0: mean (2, 3) vs source_means[1] = (1, 1) -> 1 + 4 = 5
    # cluster 1: mean (5, 6) vs source_means[0] = (0, 0) -> 25 + 36 = 61
    loss = alignment_loss(features, clusters, source_means, match)
    assert loss.item() == pytest.approx(66.0)
    loss.backward()
    # d/dx of ||mean - mu||^2 for each of n members: 2 (mean - mu) / n
    expected = torch.tensor([[1.0, 2.0], [1.0, 2.0], [10.0, 12.0]])
    torch.testing.assert_close(features.grad, expected)
    assert source_means.grad is None or torch.count_nonzero(source_means.grad) == 0


def test_alignment_loss_flattens_trailing_dims_and_matches_loop():
    rng = torch.Generator().manual_seed(0)
    features = torch.randn(10, 3, 4, 5, generator=rng)
    clusters = torch.tensor([2, 0, 2, -1, 3, 3, 0, -1, 2, 0])
    source_means = torch.randn(5, 60, generator=rng)
    match = np.array([4, 0, 1, 3, 2])
    expected = 0.0
    flat = features.reshape(10, -1)
    for cluster in (0, 2, 3):
        mean = flat[clusters == cluster].mean(0)
        expected += ((mean - source_means[match[cluster]]) ** 2).sum()
    torch.testing.assert_close(alignment_loss(features, clusters, source_means, match), expected)


def test_alignment_loss_ignores_absent_clusters():
    features, clusters, source_means, match = _example()
    extra = torch.cat([source_means.detach(), torch.full((3, 2), 1e6)])  # clusters 2-4 never appear
    loss = alignment_loss(features, clusters, extra, np.array([1, 0, 2, 3, 4]))
    assert loss.item() == pytest.approx(66.0)


def test_alignment_loss_without_clustered_samples_is_zero_and_differentiable():
    features = torch.randn(4, 8, requires_grad=True)
    loss = alignment_loss(features, torch.full((4,), -1), torch.randn(3, 8), np.arange(3))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.count_nonzero(features.grad) == 0


def test_alignment_loss_half_precision_features():
    features, clusters, source_means, match = _example()
    loss = alignment_loss(features.detach().half(), clusters, source_means, match)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(66.0)


def test_alignment_loss_rejects_bad_input():
    features, clusters, source_means, match = _example()
    with pytest.raises(ValueError, match="entries for a batch"):
        alignment_loss(features, clusters[:2], source_means, match)
    with pytest.raises(ValueError, match=r"source_means must be \(k, 2\)"):
        alignment_loss(features, clusters, torch.zeros(2, 3), match)
    with pytest.raises(ValueError, match="out of range"):
        alignment_loss(features, torch.tensor([0, 5, 1]), source_means, match)
