"""The AIVA objective: L = L_seg + lambda * L_align, with lambda calibrated without labels."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch import nn

from aiva_monai.alignment import all_reduce_cluster_sums, cluster_sums, matched_alignment

__all__ = ["AIVALoss", "RunningClusterMeans", "LAMBDA_REFERENCES", "TARGET_MEANS", "CLUSTER_WEIGHTINGS"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


LAMBDA_REFERENCES = ("alignment", "segmentation")
TARGET_MEANS = ("batch", "running")
CLUSTER_WEIGHTINGS = ("none", "size")


class RunningClusterMeans:
    """Running estimate of each target cluster's mean feature over the batches of one clustering round.

    With 8 target slices per batch spread over 12 clusters, a batch's "cluster mean" is one or two slices,
    and ``||mean - source mean||^2`` then mostly measures how each slice differs from its cluster, not how
    the cluster differs from its source twin. This keeps, per cluster, a decayed sum of earlier batches'
    (detached) features and counts and blends the current batch in:

        mean_i = (momentum * n_i * m_i + sum of the batch's features in i) / (momentum * n_i + batch count_i)

    where (m_i, n_i) is the previous estimate and its effective count. The gradient flows through the
    current batch's features only; the estimate restarts at every new clustering round (the cluster ids
    change). ``momentum`` 0 gives the paper's per-batch means.
    """

    def __init__(self, momentum: float = 0.9) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"target_means_momentum must be in [0, 1), got {momentum}.")
        self.momentum = float(momentum)
        self.round = None
        self.means: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def __call__(self, sums: torch.Tensor, counts: torch.Tensor, round_id=None) -> torch.Tensor:
        """(k, D) means from a batch's (k, D) ``sums`` and (k,) ``counts``; rows of absent clusters keep the
        previous estimate (zero if none)."""
        if self.means is None or round_id != self.round or self.means.shape != sums.shape:
            self.round = round_id
            self.means = torch.zeros_like(sums, dtype=sums.dtype).detach()
            self.counts = torch.zeros_like(counts)
        previous = self.momentum * self.counts.to(counts.device)
        total = previous + counts
        means = (previous[:, None] * self.means.to(sums.device) + sums) / total.clamp_min(1e-12)[:, None]
        present = counts > 0
        self.means = torch.where(present[:, None], means.detach(), self.means.to(sums.device))
        self.counts = torch.where(present, total, self.counts.to(counts.device))
        return means

    def state_dict(self) -> dict:
        return {
            "round": self.round,
            "means": None if self.means is None else self.means.detach().cpu(),
            "counts": None if self.counts is None else self.counts.cpu(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.round, self.means, self.counts = state["round"], state["means"], state["counts"]


class AIVALoss(nn.Module):
    """L = L_seg(source prediction, source label) + lambda * L_align(target features).

    lambda is calibrated without labels: over the first ``calibration_iterations`` calls whose target
    batch holds at least one clustered sample, the alignment term is recorded but not applied
    (weight 0); then lambda is set so that the weighted term starts at ``lambda_multiplier`` times a
    reference: ``lambda_reference="alignment"`` (paper): ``lambda = multiplier / mean(L_align)``, the
    weighted term starts near ``multiplier``; ``"segmentation"``: ``lambda = multiplier * mean(L_seg) /
    mean(L_align)``, the weighted term starts at ``multiplier`` times the segmentation loss. (A trained
    model's cross-entropy is about 0.01, so the paper's reading makes the alignment term ~100x L_seg.)
    A ``fixed_lambda`` skips calibration.

    Args:
        seg_loss: callable (pred, label) -> scalar; default cross-entropy on one-hot-encoded
            (B, 1, ...) labels (MONAI ``DiceCELoss`` with the Dice part off).
        calibration_iterations: N, number of calls used to calibrate lambda (default 10).
        fixed_lambda: use this lambda from the first call and never calibrate.
        lambda_multiplier: factor applied to the calibrated lambda.
        lambda_reference: "alignment" or "segmentation", see above.
        target_means: "batch" (paper: each cluster's mean over the current target batch) or "running"
            (``RunningClusterMeans``: a running estimate over the round's batches, gradient through the
            current batch).
        target_means_momentum: the running estimate's decay.
        cluster_weighting: "none" (paper: every cluster present in the batch counts once) or "size"
            (weighted by its share of the batch's clustered samples, as the authors' code).
        sync_alignment: under torch.distributed (initialised, more than one process), compute L_align on
            the union of all ranks' target batches (``all_reduce_cluster_sums``): every rank then has the same
            L_align and the same calibrated lambda, and DDP gradients equal a single process's with the
            ranks' batches concatenated. False: each rank aligns its own target batch only (lambda is
            still calibrated on the ranks' mean L_align, so all ranks use one lambda).

    The calibration state (recorded losses, lambda) and the running means are part of ``state_dict()``,
    so a checkpoint restores them and a resumed run neither recalibrates nor changes lambda.
    """

    def __init__(
        self,
        seg_loss: Callable | None = None,
        calibration_iterations: int = 10,
        fixed_lambda: float | None = None,
        lambda_multiplier: float = 1.0,
        lambda_reference: str = "alignment",
        target_means: str = "batch",
        target_means_momentum: float = 0.9,
        cluster_weighting: str = "none",
        sync_alignment: bool = True,
    ) -> None:
        super().__init__()
        if calibration_iterations < 1:
            raise ValueError(f"calibration_iterations must be at least 1, got {calibration_iterations}.")
        if fixed_lambda is not None and not (math.isfinite(fixed_lambda) and fixed_lambda >= 0):
            raise ValueError(f"fixed_lambda must be a finite value >= 0, got {fixed_lambda}.")
        for name, value, allowed in (
            ("lambda_reference", lambda_reference, LAMBDA_REFERENCES),
            ("target_means", target_means, TARGET_MEANS),
            ("cluster_weighting", cluster_weighting, CLUSTER_WEIGHTINGS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")
        self.seg_loss = (
            DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0) if seg_loss is None else seg_loss
        )
        self.calibration_iterations = int(calibration_iterations)
        self.lambda_multiplier = float(lambda_multiplier)
        self.lambda_reference = lambda_reference
        self.cluster_weighting = cluster_weighting
        self.running_means = RunningClusterMeans(target_means_momentum) if target_means == "running" else None
        self.lambda_value: float | None = None if fixed_lambda is None else float(fixed_lambda)
        self.calibration_losses: list[float] = []
        self.calibration_seg_losses: list[float] = []
        self.sync_alignment = bool(sync_alignment)

    @property
    def calibrated(self) -> bool:
        return self.lambda_value is not None

    def _weight(self, align: float, seg: float, has_clusters: bool) -> float:
        if self.lambda_value is not None:
            return self.lambda_value
        if has_clusters:
            self.calibration_losses.append(float(align))
            self.calibration_seg_losses.append(float(seg))
            if len(self.calibration_losses) >= self.calibration_iterations:
                mean = sum(self.calibration_losses) / len(self.calibration_losses)
                if not (math.isfinite(mean) and mean > 0):
                    raise ValueError(f"cannot calibrate lambda: mean alignment loss over the first batches is {mean}.")
                reference = 1.0
                if self.lambda_reference == "segmentation":
                    reference = sum(self.calibration_seg_losses) / len(self.calibration_seg_losses)
                self.lambda_value = self.lambda_multiplier * reference / mean
        return 0.0

    def alignment(self, target_features, target_clusters, source_means, match, round_id=None, synchronise=False):
        """(L_align, whether any sample carries a cluster) for one target batch (of all ranks if ``synchronise``)."""
        k = int(np.asarray(match).size)
        if source_means.ndim != 2 or source_means.shape[0] != k:
            raise ValueError(
                f"source_means must be ({k}, D) for {k} matched clusters, got {tuple(source_means.shape)}."
            )
        sums, counts = cluster_sums(target_features, target_clusters, k)
        if synchronise:
            sums, counts = all_reduce_cluster_sums(sums, counts)
        present = torch.nonzero(counts > 0).reshape(-1)
        if self.running_means is not None:
            means = self.running_means(sums, counts, round_id)
        else:
            means = sums / counts.clamp_min(1)[:, None]
        weights = counts / counts.sum().clamp_min(1) if self.cluster_weighting == "size" else None
        return matched_alignment(means, present, source_means, match, weights), bool(present.numel())

    def forward(
        self,
        source_pred: torch.Tensor,
        source_label: torch.Tensor,
        target_features: torch.Tensor,
        target_clusters: torch.Tensor,
        source_means: torch.Tensor,
        match,
        round_id=None,
    ) -> dict:
        """Returns a dict: ``loss`` (the total, differentiable), ``seg_loss`` and ``align_loss`` (detached
        tensors) and ``lambda`` (float, the weight applied to L_align in this call: 0 while calibrating).
        ``round_id`` identifies the clustering round (the running means restart when it changes)."""
        seg = self.seg_loss(source_pred, source_label)
        group_size = _world_size()
        synchronise = group_size > 1 and self.sync_alignment
        align, has_clusters = self.alignment(
            target_features, target_clusters, source_means, match, round_id, synchronise
        )
        if group_size > 1 and not self.calibrated:  # one lambda for all ranks: calibrate on their means
            import torch.distributed as dist

            reduced = torch.tensor(
                [float(align.detach()) if has_clusters else 0.0, float(seg.detach()), float(has_clusters)],
                dtype=torch.float64,
                device=align.device,
            )
            dist.all_reduce(reduced)
            weight = self._weight(
                float(reduced[0] / reduced[2].clamp(min=1)), float(reduced[1] / group_size), bool(reduced[2] > 0)
            )
        else:
            weight = self._weight(float(align.detach()), float(seg.detach()), has_clusters)
        total = seg + weight * align if weight else seg + 0.0 * align
        return {"loss": total, "seg_loss": seg.detach(), "align_loss": align.detach(), "lambda": weight}

    def get_extra_state(self) -> dict:
        return {
            "lambda_value": self.lambda_value,
            "calibration_losses": list(self.calibration_losses),
            "calibration_seg_losses": list(self.calibration_seg_losses),
            "running_means": None if self.running_means is None else self.running_means.state_dict(),
        }

    def set_extra_state(self, state: dict) -> None:
        self.lambda_value = state["lambda_value"]
        self.calibration_losses = list(state["calibration_losses"])
        self.calibration_seg_losses = list(state.get("calibration_seg_losses", []))
        if self.running_means is not None and state.get("running_means") is not None:
            self.running_means.load_state_dict(state["running_means"])
