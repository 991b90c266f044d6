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
    return loss_fn(torch.zeros(1, 2, 4, 4), torch.zeros(1, 1, 4, 4), features, clusters, torch.zeros(1, 1), np.array([0]))


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
    parts = AIVALoss(fixed_lambda=0.0)(pred, label, torch.zeros(3, 4), torch.full((3,), -1), torch.zeros(2, 4), np.arange(2))
    expected = torch.nn.functional.cross_entropy(pred, label[:, 0].long())
    torch.testing.assert_close(parts["seg_loss"], expected)


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="calibration_iterations"):
        AIVALoss(calibration_iterations=0)
    with pytest.raises(ValueError, match="fixed_lambda"):
        AIVALoss(fixed_lambda=float("nan"))
