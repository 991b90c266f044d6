import numpy as np
import pytest
import torch

from aiva_monai.losses import AIVALoss


def constant_seg_loss(pred, label):
    return pred.sum() * 0.0 + 0.5


def call(loss_fn, align_value, clustered=True):
    """One AIVALoss call whose alignment loss equals align_value (one sample, source mean zero)."""
    features = torch.full((1, 1), float(np.sqrt(align_value)), requires_grad=True)
    clusters = torch.tensor([0 if clustered else -1])
    return loss_fn(
        torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), features, clusters, torch.zeros(1, 1), np.array([0])
    )


def test_lambda_is_one_over_mean_of_first_n_alignment_losses():
    loss_fn = AIVALoss(seg_loss=constant_seg_loss, calibration_iterations=4)
    values = [2.0, 4.0, 8.0, 6.0]
    for value in values:
        parts = call(loss_fn, value)
        # while calibrating the alignment term is recorded but not applied
        assert parts["lambda"] == 0.0 and parts["loss"].item() == pytest.approx(0.5)
        assert parts["align_loss"].item() == pytest.approx(value)
    assert loss_fn.calibrated and loss_fn.lambda_value == pytest.approx(1 / np.mean(values))
    parts = call(loss_fn, 10.0)
    assert parts["lambda"] == pytest.approx(0.2)
    assert parts["loss"].item() == pytest.approx(0.5 + 0.2 * 10.0)


def test_batches_without_clusters_do_not_count_towards_calibration():
    loss_fn = AIVALoss(seg_loss=constant_seg_loss, calibration_iterations=2)
    call(loss_fn, 3.0)
    call(loss_fn, 0.0, clustered=False)
    assert not loss_fn.calibrated
    call(loss_fn, 1.0)
    assert loss_fn.lambda_value == pytest.approx(0.5)


def test_multiplier_and_fixed_lambda():
    scaled = AIVALoss(seg_loss=constant_seg_loss, calibration_iterations=1, lambda_multiplier=3.0)
    call(scaled, 4.0)
    assert scaled.lambda_value == pytest.approx(0.75)
    fixed = AIVALoss(seg_loss=constant_seg_loss, fixed_lambda=0.1)
    parts = call(fixed, 4.0)
    assert parts["lambda"] == pytest.approx(0.1) and parts["loss"].item() == pytest.approx(0.5 + 0.4)


def test_calibration_state_survives_state_dict(tmp_path):
    loss_fn = AIVALoss(seg_loss=constant_seg_loss, calibration_iterations=3)
    call(loss_fn, 2.0)
    call(loss_fn, 4.0)
    torch.save(loss_fn.state_dict(), tmp_path / "loss.pt")
    restored = AIVALoss(seg_loss=constant_seg_loss, calibration_iterations=3)
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    call(restored, 6.0)  # third calibration call, continuing the restored two
    assert restored.lambda_value == pytest.approx(1 / 4.0)


def test_default_seg_loss_is_cross_entropy():
    pred = torch.randn(3, 2, 5, 5)
    label = torch.randint(0, 2, (3, 1, 5, 5)).float()
    parts = AIVALoss(fixed_lambda=0.0)(
        pred, label, torch.zeros(3, 4), torch.full((3,), -1), torch.zeros(2, 4), np.arange(2)
    )
    expected = torch.nn.functional.cross_entropy(pred, label[:, 0].long())
    torch.testing.assert_close(parts["seg_loss"], expected)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="calibration_iterations"):
        AIVALoss(calibration_iterations=0)
    with pytest.raises(ValueError, match="fixed_lambda"):
        AIVALoss(fixed_lambda=float("nan"))


def test_lambda_calibrated_against_the_segmentation_loss():
    loss_fn = AIVALoss(
        seg_loss=constant_seg_loss, calibration_iterations=2, lambda_reference="segmentation", lambda_multiplier=0.5
    )
    call(loss_fn, 2.0)
    call(loss_fn, 6.0)
    # lambda = 0.5 * mean(L_seg) / mean(L_align) = 0.5 * 0.5 / 4
    assert loss_fn.lambda_value == pytest.approx(0.0625)
    parts = call(loss_fn, 8.0)
    assert parts["loss"].item() == pytest.approx(0.5 + 0.0625 * 8.0)  # weighted term = 2 x 0.5 x L_seg here


def _features_batch(rows):
    return torch.tensor(rows, dtype=torch.float32, requires_grad=True)


def test_running_cluster_means_by_hand():
    loss_fn = AIVALoss(seg_loss=constant_seg_loss, fixed_lambda=1.0, target_means="running", target_means_momentum=0.5)
    source_means, match = torch.zeros(2, 1), np.array([0, 1])
    # batch 1: cluster 0 holds 2 and 4 -> mean 3, effective count 2; cluster 1 absent
    first = loss_fn(
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 1, 2, 2),
        _features_batch([[2.0], [4.0]]),
        torch.tensor([0, 0]),
        source_means,
        match,
        round_id=1,
    )
    assert first["align_loss"].item() == pytest.approx(9.0)
    # batch 2: cluster 0 holds 6 -> (0.5 * 2 * 3 + 6) / (0.5 * 2 + 1) = 4.5; cluster 1 holds 1 -> 1
    features = _features_batch([[6.0], [1.0]])
    second = loss_fn(
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 1, 2, 2),
        features,
        torch.tensor([0, 1]),
        source_means,
        match,
        round_id=1,
    )
    assert second["align_loss"].item() == pytest.approx(4.5**2 + 1.0)
    second["loss"].backward()
    # d/dx of (mean_0)^2 through the current sample only: 2 * 4.5 / 2 (its share of the effective count)
    torch.testing.assert_close(features.grad, torch.tensor([[4.5], [2.0]]))
    # a new clustering round starts the estimate again: the plain batch mean
    third = loss_fn(
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 1, 2, 2),
        _features_batch([[6.0], [1.0]]),
        torch.tensor([0, 0]),
        source_means,
        match,
        round_id=2,
    )
    assert third["align_loss"].item() == pytest.approx(3.5**2)


def test_running_means_survive_state_dict(tmp_path):
    def make():
        return AIVALoss(seg_loss=constant_seg_loss, fixed_lambda=1.0, target_means="running", target_means_momentum=0.5)

    loss_fn = make()
    loss_fn(
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 1, 2, 2),
        _features_batch([[2.0], [4.0]]),
        torch.tensor([0, 0]),
        torch.zeros(2, 1),
        np.array([0, 1]),
        round_id=1,
    )
    torch.save(loss_fn.state_dict(), tmp_path / "loss.pt")
    restored = make()
    restored.load_state_dict(torch.load(tmp_path / "loss.pt", weights_only=True))
    parts = restored(
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 1, 2, 2),
        _features_batch([[6.0]]),
        torch.tensor([0]),
        torch.zeros(2, 1),
        np.array([0, 1]),
        round_id=1,
    )
    assert parts["align_loss"].item() == pytest.approx(4.5**2)


def test_cluster_size_weighting_by_hand():
    loss_fn = AIVALoss(seg_loss=constant_seg_loss, fixed_lambda=1.0, cluster_weighting="size")
    # cluster 0: samples 1, 3 (mean 2, weight 2/3); cluster 1: sample 5 (weight 1/3); source means 0
    parts = loss_fn(
        torch.zeros(1, 2, 2, 2),
        torch.zeros(1, 1, 2, 2),
        _features_batch([[1.0], [3.0], [5.0], [9.0]]),
        torch.tensor([0, 0, 1, -1]),
        torch.zeros(2, 1),
        np.array([0, 1]),
    )
    assert parts["align_loss"].item() == pytest.approx(2 / 3 * 4.0 + 1 / 3 * 25.0)


def test_rejects_unknown_options():
    with pytest.raises(ValueError, match="lambda_reference"):
        AIVALoss(lambda_reference="dice")
    with pytest.raises(ValueError, match="target_means"):
        AIVALoss(target_means="ema")
    with pytest.raises(ValueError, match="target_means_momentum"):
        AIVALoss(target_means="running", target_means_momentum=1.0)
