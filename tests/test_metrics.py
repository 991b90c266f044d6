import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from scipy import ndimage

from aiva_monai.handlers import SurfaceDiceHandler
from aiva_monai.metrics import VolumeSurfaceDiceMetric, voxel_spacing


def one_hot(mask):
    mask = torch.as_tensor(mask, dtype=torch.float32)
    return torch.stack([1 - mask, mask])[None]


def brute_force_surface_dice(pred, truth, spacing, tolerance):
    """Boundary voxels (mask minus its erosion) and all pairwise physical distances."""

    def boundary(mask):
        return np.argwhere(mask & ~ndimage.binary_erosion(mask)) * np.asarray(spacing)

    a, b = boundary(pred), boundary(truth)
    distances = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    within = (distances.min(1) <= tolerance).sum() + (distances.min(0) <= tolerance).sum()
    return within / (len(a) + len(b))


def blob(shape, center, radii):
    grid = np.indices(shape)
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 1.2, 3.0), (3.0, 0.7, 1.0)])
def test_voxel_surface_dice_equals_brute_force(spacing):
    truth = blob((24, 22, 20), (11, 10, 9), (7, 6, 5))
    pred = blob((24, 22, 20), (12, 10, 10), (6, 7, 5))
    affine = torch.diag(torch.tensor([*spacing, 1.0]))
    metric = VolumeSurfaceDiceMetric(tolerance_mm=1.5, use_subvoxels=False)
    score = metric(MetaTensor(one_hot(pred), affine=affine), MetaTensor(one_hot(truth), affine=affine))
    assert score.item() == pytest.approx(brute_force_surface_dice(pred, truth, spacing, 1.5), abs=1e-6)


@pytest.mark.parametrize("use_subvoxels", [True, False])
def test_spacing_is_applied_along_the_right_axis(use_subvoxels):
    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    shifted = np.roll(truth, 1, axis=0)  # one voxel along array axis 0
    metric = VolumeSurfaceDiceMetric(tolerance_mm=1.0, use_subvoxels=use_subvoxels)
    fine_axis0 = torch.diag(torch.tensor([0.5, 1.0, 3.0, 1.0]))  # the shift is 0.5 mm
    coarse_axis0 = torch.diag(torch.tensor([3.0, 1.0, 0.5, 1.0]))  # the shift is 3 mm
    assert (
        metric(MetaTensor(one_hot(shifted), affine=fine_axis0), MetaTensor(one_hot(truth), affine=fine_axis0)).item()
        == 1.0
    )
    assert (
        metric(
            MetaTensor(one_hot(shifted), affine=coarse_axis0), MetaTensor(one_hot(truth), affine=coarse_axis0)
        ).item()
        < 0.95
    )


def test_spacing_from_an_oblique_affine():
    rotation = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = torch.eye(4)
    affine[:3, :3] = rotation @ torch.diag(torch.tensor([0.8, 1.5, 2.5]))
    (spacing,) = voxel_spacing(MetaTensor(torch.zeros(1, 1, 4, 4, 4), affine=affine))
    np.testing.assert_allclose(spacing, [0.8, 1.5, 2.5], rtol=1e-6)


def test_plain_tensors_are_rejected():
    mask = one_hot(np.ones((4, 4, 4), bool))
    with pytest.raises(ValueError, match="voxel spacing"):
        VolumeSurfaceDiceMetric()(mask, mask)


def test_handler_scores_each_volume_with_its_own_spacing():
    truth = np.zeros((20, 20, 20), bool)
    truth[5:15, 5:15, 5:15] = True
    shifted = np.roll(truth, 1, axis=0)
    volumes = [torch.diag(torch.tensor([s, 1.0, 1.0, 1.0])) for s in (0.5, 3.0)]

    def step(engine, affine):
        return {
            "pred": [MetaTensor(one_hot(shifted)[0], affine=affine)],
            "label": [MetaTensor(one_hot(truth)[0], affine=affine)],
        }

    evaluator = Engine(step)
    SurfaceDiceHandler(tolerance_mm=1.0, output_transform=lambda out: (out["pred"], out["label"])).attach(
        evaluator, "sdice"
    )
    evaluator.run(volumes)
    details = evaluator.state.metric_details["sdice"].reshape(-1).tolist()
    assert details[0] == 1.0 and details[1] < 0.95
    assert evaluator.state.metrics["sdice"] == pytest.approx(np.mean(details))
