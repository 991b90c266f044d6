"""The AIVA objective: L = L_seg + lambda * L_align, with lambda calibrated without labels."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from monai.losses import DiceCELoss
from torch import nn

from aiva_monai.alignment import alignment_loss, global_alignment_loss

__all__ = ["AIVALoss"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class AIVALoss(nn.Module):
    """L = L_seg(source prediction, source label) + lambda * L_align(target features).

    lambda is calibrated without labels: over the first ``calibration_iterations`` calls whose target
    batch holds at least one clustered sample, the alignment term is recorded but not applied
    (weight 0); then ``lambda = lambda_multiplier / mean(recorded L_align)``, so the weighted term
    starts near ``lambda_multiplier`` (paper: near 1, like L_seg). A ``fixed_lambda`` skips calibration.

    Args:
        seg_loss: callable (pred, label) -> scalar; default cross-entropy on one-hot-encoded
            (B, 1, ...) labels (MONAI ``DiceCELoss`` with the Dice part off).
        calibration_iterations: N, number of calls used to calibrate lambda (default 10).
        fixed_lambda: use this lambda from the first call and never calibrate.
        lambda_multiplier: factor applied to the calibrated lambda.
        sync_alignment: under torch.distributed (initialised, more than one process), compute L_align on
            the union of all ranks' target batches (``global_alignment_loss``): every rank then has the same
            L_align and the same calibrated lambda, and DDP gradients equal a single process's with the
            ranks' batches concatenated. False: each rank aligns its own target batch only (lambda is
            still calibrated on the ranks' mean L_align, so all ranks use one lambda).

    The calibration state (recorded losses, lambda) is part of ``state_dict()``, so a checkpoint
    restores it and a resumed run neither recalibrates nor changes lambda.
    """

    def __init__(
        self,
        seg_loss: Callable | None = None,
        calibration_iterations: int = 10,
        fixed_lambda: float | None = None,
        lambda_multiplier: float = 1.0,
        sync_alignment: bool = True,
    ) -> None:
        super().__init__()
        if calibration_iterations < 1:
            raise ValueError(f"calibration_iterations must be at least 1, got {calibration_iterations}.")
        if fixed_lambda is not None and not (math.isfinite(fixed_lambda) and fixed_lambda >= 0):
            raise ValueError(f"fixed_lambda must be a finite value >= 0, got {fixed_lambda}.")
        self.seg_loss = (
            DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0) if seg_loss is None else seg_loss
        )
        self.calibration_iterations = int(calibration_iterations)
        self.lambda_multiplier = float(lambda_multiplier)
        self.lambda_value: float | None = None if fixed_lambda is None else float(fixed_lambda)
        self.calibration_losses: list[float] = []
        self.sync_alignment = bool(sync_alignment)

    @property
    def calibrated(self) -> bool:
        return self.lambda_value is not None

    def _weight(self, align: torch.Tensor, has_clusters: bool) -> float:
        if self.lambda_value is not None:
            return self.lambda_value
        if has_clusters:
            self.calibration_losses.append(float(align.detach()))
            if len(self.calibration_losses) >= self.calibration_iterations:
                mean = sum(self.calibration_losses) / len(self.calibration_losses)
                if not (math.isfinite(mean) and mean > 0):
                    raise ValueError(f"cannot calibrate lambda: mean alignment loss over the first batches is {mean}.")
                self.lambda_value = self.lambda_multiplier / mean
        return 0.0

    def forward(
        self,
        source_pred: torch.Tensor,
        source_label: torch.Tensor,
        target_features: torch.Tensor,
        target_clusters: torch.Tensor,
        source_means: torch.Tensor,
        match,
    ) -> dict:
        """Returns a dict: ``loss`` (the total, differentiable), ``seg_loss`` and ``align_loss`` (detached
        tensors) and ``lambda`` (float, the weight applied to L_align in this call: 0 while calibrating)."""
        seg = self.seg_loss(source_pred, source_label)
        group_size = _world_size()
        if group_size > 1 and self.sync_alignment:
            align, has_clusters = global_alignment_loss(target_features, target_clusters, source_means, match)
            weight = self._weight(align, has_clusters)
        else:
            align = alignment_loss(target_features, target_clusters, source_means, match)
            has_clusters = bool((torch.as_tensor(target_clusters) >= 0).any())
            if group_size > 1 and not self.calibrated:  # one lambda for all ranks: calibrate on their mean
                import torch.distributed as dist

                reduced = torch.tensor([float(align.detach()) if has_clusters else 0.0, float(has_clusters)], dtype=torch.float64,
                                       device=align.device)
                dist.all_reduce(reduced)
                has_clusters = bool(reduced[1] > 0)
                weight = self._weight(reduced[0] / reduced[1].clamp(min=1), has_clusters)
            else:
                weight = self._weight(align, has_clusters)
        total = seg + weight * align if weight else seg + 0.0 * align
        return {"loss": total, "seg_loss": seg.detach(), "align_loss": align.detach(), "lambda": weight}

    def get_extra_state(self) -> dict:
        return {"lambda_value": self.lambda_value, "calibration_losses": list(self.calibration_losses)}

    def set_extra_state(self, state: dict) -> None:
        self.lambda_value = state["lambda_value"]
        self.calibration_losses = list(state["calibration_losses"])
