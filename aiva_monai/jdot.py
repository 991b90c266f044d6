"""Joint distribution optimal transport (DeepJDOT, Damodaran et al. 2018; Seg-JDOT, Ackaoui et al. 2020): the
transport plan between a source and a target mini-batch on the joint (feature, label) cost, and its loss.

Pure maths on tensors (POT's exact solver ``ot.emd``); ``aiva_monai.engines.segjdot`` is the trainer.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from monai.networks.utils import one_hot

__all__ = ["jdot_plan", "segjdot_loss", "onehot_at_prediction"]


def _squared_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # (n, D), (m, D) -> (n, m); the expansion keeps memory O((n + m) D) instead of O(n m D)
    return (x.pow(2).sum(1)[:, None] + y.pow(2).sum(1)[None, :] - 2.0 * x @ y.T).clamp_min(0.0)


def jdot_plan(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    source_labels_onehot: torch.Tensor,
    target_probs: torch.Tensor,
    alpha: float = 0.001,
    beta: float = 0.0001,
    label_cost: str = "sqeuclidean",
    eps: float = 1e-7,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Optimal transport plan between a source and a target mini-batch on the JDOT joint cost.

    ``C[i, j] = alpha * ||f_s[i] - f_t[j]||^2 + beta * ||y_s[i] - p_t[j]||^2``, each sample flattened
    (the bottleneck feature map with its channels and spatial dimensions; the one-hot label and the
    softmax at the prediction's resolution, every pixel counted: sums, not means). The plan solves the
    exact (unregularised) problem ``min <plan, C>`` with uniform marginals (1/n_s per source sample,
    1/n_t per target sample) with POT's network-simplex solver ``ot.emd``, on the detached cost.

    Same cost for the plan and for the loss, as in the DeepJDOT paper's eq. 5 (the authors' code uses
    ``alpha * C_feat + C_label`` for the plan but ``lambda_t`` times a cross-entropy in the loss).
    ``label_cost="cross_entropy"`` replaces the label term by ``-sum(y_s[i] * log p_t[j])`` (DeepJDOT's
    classification loss).

    Args:
        source_features: (n_s, ...) e.g. bottleneck maps (n_s, C, h, w).
        target_features: (n_t, ...) same trailing shape.
        source_labels_onehot: (n_s, K, *spatial) one-hot (or soft) source labels.
        target_probs: (n_t, K, *spatial) target class probabilities (softmax), same trailing shape.
        alpha: feature-distance weight (DeepJDOT: 0.001).
        beta: label-distance weight (DeepJDOT's lambda_t: 0.0001).
        label_cost: "sqeuclidean" or "cross_entropy".
        eps: floor of the probabilities inside the log (cross_entropy only).

    Returns:
        plan: (n_s, n_t) tensor on the cost's device, constant (no gradient).
        cost: (n_s, n_t) tensor, differentiable with respect to the four inputs.
    """
    n_s, n_t = source_features.shape[0], target_features.shape[0]
    if source_labels_onehot.shape[0] != n_s or target_probs.shape[0] != n_t:
        raise ValueError(
            f"batch sizes differ: {n_s} source features vs {source_labels_onehot.shape[0]} source labels, "
            f"{n_t} target features vs {target_probs.shape[0]} target predictions."
        )
    if source_features.shape[1:] != target_features.shape[1:]:
        raise ValueError(f"feature shapes differ: {tuple(source_features.shape)} vs {tuple(target_features.shape)}.")
    if source_labels_onehot.shape[1:] != target_probs.shape[1:]:
        raise ValueError(
            f"label shape {tuple(source_labels_onehot.shape)} differs from prediction shape "
            f"{tuple(target_probs.shape)}: "
            "one-hot encode the labels and bring them to the prediction's resolution."
        )
    if label_cost not in ("sqeuclidean", "cross_entropy"):
        raise ValueError(f"label_cost must be 'sqeuclidean' or 'cross_entropy', got {label_cost!r}.")
    if n_s == 0 or n_t == 0:
        raise ValueError("jdot_plan needs at least one source and one target sample.")

    feature_cost = _squared_distances(source_features.flatten(1), target_features.flatten(1))
    labels, probs = source_labels_onehot.flatten(1).to(target_probs.dtype), target_probs.flatten(1)
    if label_cost == "sqeuclidean":
        label_term = _squared_distances(labels, probs)
    else:
        label_term = -(labels @ probs.clamp_min(eps).log().T)
    cost = alpha * feature_cost + beta * label_term

    import ot  # noqa: PLC0415  (only SegJDoT needs POT: a 33 MB wheel the other methods go without)

    # exact OT in float64 on the CPU; the plan is a constant of the loss (DeepJDOT's alternating scheme)
    plan = ot.emd(ot.unif(n_s), ot.unif(n_t), cost.detach().double().cpu().numpy())
    plan = torch.as_tensor(np.asarray(plan), dtype=cost.dtype, device=cost.device)
    return plan, cost


def segjdot_loss(
    source_features: torch.Tensor,
    target_features: torch.Tensor,
    source_labels_onehot: torch.Tensor,
    target_probs: torch.Tensor,
    alpha: float = 0.001,
    beta: float = 0.0001,
    label_cost: str = "sqeuclidean",
) -> torch.Tensor:
    """JDOT alignment loss ``sum_ij plan[i, j] * C[i, j]`` (scalar), the plan from ``jdot_plan`` held
    constant: gradients flow through the cost only (into both sites' features and the target softmax).
    Shapes and arguments as ``jdot_plan``."""
    plan, cost = jdot_plan(
        source_features, target_features, source_labels_onehot, target_probs, alpha, beta, label_cost
    )
    return (plan * cost).sum()


def onehot_at_prediction(label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """(B, 1, *S) class-index label -> (B, K, *pred spatial) one-hot, K = pred's channels.

    Labels are compared at the prediction's resolution (the input resolution for our U-Nets, so normally
    nothing is resampled); if the prediction is coarser, each one-hot channel is area-averaged down to
    it (class fractions per output pixel), which keeps ``||y - p||^2`` meaningful."""
    label = torch.as_tensor(label)
    onehot = one_hot(label.long(), num_classes=pred.shape[1], dim=1) if label.shape[1] == 1 else label
    onehot = onehot.to(torch.float32)
    if onehot.shape[2:] != pred.shape[2:]:
        onehot = F.interpolate(onehot, size=tuple(pred.shape[2:]), mode="area")
    return onehot
