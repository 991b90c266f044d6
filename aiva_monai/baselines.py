"""The baselines of the AIVA paper's comparison (issue 5): AdaBN, AdaptSegNet, Seg-JDOT and the oracle.

Each method is small pure maths plus thin MONAI / Ignite glue, sharing the data, network and evaluation
code of AIVA:

- ``source``: the pretrained source model, no adaptation (nothing here: evaluate the source checkpoint).
- ``adabn``: ``adapt_batchnorm`` re-estimates every BatchNorm's running statistics on unlabelled target
  images (Li et al. 2016, "Revisiting batch normalization for practical domain adaptation").
- ``adaptsegnet``: ``OutputDiscriminator`` + ``AdaptSegNetTrainer``, adversarial alignment of the softmax
  output (Tsai et al. 2018, "Learning to adapt structured output space for semantic segmentation").
- ``segjdot``: ``jdot_plan`` / ``segjdot_loss`` + ``SegJDOTTrainer``, optimal transport of the joint
  (bottleneck feature, label) distribution between a source and a target mini-batch (Damodaran et al.
  2018, DeepJDOT; its segmentation form Seg-JDOT, Ackaoui et al. 2020), solved exactly by POT's
  ``ot.emd``.
- ``aiva``: ``aiva_monai.engines.AIVATrainer``.
- ``oracle``: ``OracleTrainer``, plain supervised training on the *target* site's labelled data (upper
  bound): the only method that reads target labels.

``METHODS`` / ``reads_target_labels(method)`` say which method reads target labels, so that every
output (results file, table) can mark it. The adaptation trainers read only the image of a target batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import ot
import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.losses import DiceCELoss
from monai.networks.layers import Conv
from monai.networks.utils import one_hot
from monai.utils import CommonKeys as Keys
from torch import nn

from aiva_monai.batchnorm import adapt_batchnorm, batchnorm_layers
from aiva_monai.engines import TargetBatchMixin
from aiva_monai.networks import BottleneckTap

__all__ = [
    "METHODS",
    "MethodInfo",
    "reads_target_labels",
    "batchnorm_layers",
    "adapt_batchnorm",
    "OutputDiscriminator",
    "AdaptSegNetTrainer",
    "jdot_plan",
    "segjdot_loss",
    "SegJDOTTrainer",
    "OracleTrainer",
]


@dataclass(frozen=True)
class MethodInfo:
    """One method of the comparison: its name, whether it reads target labels, where it comes from."""

    name: str
    reads_target_labels: bool
    summary: str
    reference: str


METHODS: dict[str, MethodInfo] = {
    info.name: info
    for info in (
        MethodInfo("source", False, "source model, no adaptation (lower bound)", "-"),
        MethodInfo(
            "adabn",
            False,
            "BatchNorm statistics re-estimated on unlabelled target images",
            "Li et al. 2016, arXiv:1603.04779",
        ),
        MethodInfo(
            "adaptsegnet",
            False,
            "adversarial alignment of the softmax output space",
            "Tsai et al. 2018, CVPR, arXiv:1802.10349",
        ),
        MethodInfo(
            "segjdot",
            False,
            "optimal transport of joint bottleneck-feature / label distributions",
            "Damodaran et al. 2018, ECCV, arXiv:1803.10081; Ackaoui et al. 2020 (Seg-JDOT)",
        ),
        MethodInfo("aiva", False, "intra-site variability alignment (this project)", "AIVA paper, Algorithm 1"),
        MethodInfo(
            "aiva+adabn",
            False,
            "AIVA, then AdaBN re-estimation of every kept checkpoint's BatchNorm statistics "
            "on the unlabelled target training slices",
            "AIVA paper + Li et al. 2016",
        ),
        MethodInfo(
            "aiva_v1",
            False,
            "AIVA with this project's first defaults (shared BatchNorm statistics, lambda = "
            "1 / mean L_align, per-batch cluster means, all layers trained)",
            "AIVA paper, Algorithm 1; commit 00061b4",
        ),
        MethodInfo(
            "oracle",
            True,
            "supervised training on the target site's labelled data (upper bound; READS TARGET LABELS)",
            "-",
        ),
    )
}


def reads_target_labels(method: str) -> bool:
    """True only for ``oracle``: the method that trains on target labels (mark it in every output)."""
    try:
        return METHODS[method].reads_target_labels
    except KeyError:
        raise ValueError(f"unknown method {method!r}; known: {sorted(METHODS)}.") from None


def _default_seg_loss() -> Callable:
    # the same source objective as AIVALoss: cross-entropy on one-hot (B, 1, ...) labels
    return DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0, lambda_ce=1.0)


def _check_plain_iterations(name: str, kwargs: dict) -> None:
    if kwargs.get("accumulation_steps", 1) != 1 or kwargs.get("compile", False):
        raise ValueError(f"{name} supports neither gradient accumulation nor torch.compile.")


def _full_precision(engine) -> contextlib.AbstractContextManager:
    # the adversarial / transport terms are computed in float32 even under AMP: BCE logits of a small
    # discriminator and squared distances of 10^5-dimensional features overflow or lose precision in fp16
    return torch.autocast("cuda", enabled=False) if engine.amp else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------
# AdaBN


# ----------------------------------------------------------------------------------------------------
# AdaptSegNet


class OutputDiscriminator(nn.Module):
    """Fully convolutional discriminator of AdaptSegNet (Tsai et al. 2018, Sec. 4.1).

    Paper: 5 convolutions with 4 x 4 kernels and stride 2, channels {64, 128, 256, 512, 1}, each but the
    last followed by a leaky ReLU of slope 0.2 (padding 1, as in the authors' code). The paper's final
    up-sampling to the input size is left out: with constant domain labels, BCE on the coarse map is the
    same objective up to the interpolation (the authors' code leaves it out too).

    Args:
        in_channels: number of classes (the discriminator sees the (B, classes, *spatial) softmax).
        channels: widths of the hidden convolutions (the last, 1-channel, layer is added); fewer or
            narrower layers for tiny tests. The input's spatial size must be at least
            ``2 ** (len(channels) + 1)``.
        spatial_dims: 2 for slices, 3 for volumes.
        kernel_size, stride, padding: of every convolution.
        negative_slope: of the leaky ReLUs.

    ``forward``: (B, in_channels, *spatial) probabilities -> (B, 1, *spatial / 2 ** (len(channels) + 1))
    logits (source vs target; the trainer's domain labels say which is which).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int] = (64, 128, 256, 512),
        spatial_dims: int = 2,
        kernel_size: int = 4,
        stride: int = 2,
        padding: int = 1,
        negative_slope: float = 0.2,
    ) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        layers: list[nn.Module] = []
        c_in = in_channels
        for c_out in channels:
            layers += [conv(c_in, c_out, kernel_size, stride, padding), nn.LeakyReLU(negative_slope, inplace=True)]
            c_in = c_out
        layers.append(conv(c_in, 1, kernel_size, stride, padding))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class AdaptSegNetTrainer(TargetBatchMixin, SupervisedTrainer):
    """AdaptSegNet (Tsai et al. 2018), single-level output-space adversarial adaptation, as a MONAI trainer.

    Per iteration: one labelled source batch (the usual ``train_data_loader``) and one unlabelled target
    batch (``target_data_loader``, cycled; only ``target_image_key`` is read, target labels never).

    1. Segmenter update (``optimizer``), with the discriminator frozen (its parameters do not require
       grad, so the segmenter's loss leaves no gradient on it):
       ``loss = seg_loss(pred_s, y_s) + lambda_adv * BCE(D(softmax(pred_t)), source_domain_label)``,
       i.e. the target prediction is pushed to look like a source one to D.
    2. Discriminator update (``discriminator_optimizer``, then ``discriminator_lr_scheduler`` if given,
       once per iteration) on the detached softmaxes of the same forward passes:
       ``disc_loss = (BCE(D(softmax(pred_s)), source_domain_label) + BCE(D(softmax(pred_t)), target_domain_label)) / 2``
       (the authors' code halves each term). No gradient reaches the segmenter.

    The two updates are equivalent to the authors' code, which accumulates both gradients and steps
    both optimisers at the end of the iteration. Source and target go through the network in separate
    forward passes, so BatchNorm batch statistics are per site (as for AIVA).

    ``engine.state.output``: ``image``, ``label``, ``pred`` (source), ``loss`` (segmenter total),
    ``seg_loss``, ``adv_loss``, ``disc_loss`` (detached). The standard iteration events fire in order:
    FORWARD_COMPLETED, LOSS_COMPLETED, BACKWARD_COMPLETED (segmenter), then the discriminator update, then
    MODEL_COMPLETED. Under AMP the segmenter's forward passes are autocast and the discriminator runs in
    float32 (no second grad scaler needed).

    Checkpointing: put ``trainer.checkpoint_dict()`` (discriminator, its optimiser, its scheduler) next to
    the network and its optimiser in a ``CheckpointSaver`` / ``CheckpointLoader`` ``save_dict``.

    Args:
        target_data_loader: iterable of dicts with the target images.
        network, optimizer: the segmenter and its optimiser (its parameters only).
        discriminator: e.g. ``OutputDiscriminator(out_channels)``; moved to ``device``.
        loss_function: source segmentation loss (pred logits, (B, 1, ...) label) -> scalar; default
            cross-entropy (as ``AIVALoss``).
        discriminator_optimizer: default Adam, lr 1e-4, betas (0.9, 0.99) (the paper's Sec. 4.1).
        discriminator_lr_scheduler: stepped after every discriminator step (the paper decays both
            learning rates polynomially with power 0.9: ``torch.optim.lr_scheduler.PolynomialLR``).
        lambda_adv: weight of the adversarial term; 0.001 is the paper's single-level value.
        source_domain_label, target_domain_label: the discriminator's targets (authors' code: 0 and 1).
        target_image_key: key of the target image in a target batch.
        other args: as ``monai.engines.SupervisedTrainer``.
    """

    reads_target_labels = False

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        target_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        discriminator: nn.Module,
        loss_function: Callable | None = None,
        discriminator_optimizer: torch.optim.Optimizer | None = None,
        discriminator_lr_scheduler=None,
        lambda_adv: float = 0.001,
        source_domain_label: float = 0.0,
        target_domain_label: float = 1.0,
        target_image_key: str = Keys.IMAGE,
        **kwargs,
    ) -> None:
        _check_plain_iterations("AdaptSegNetTrainer", kwargs)
        if not (math.isfinite(lambda_adv) and lambda_adv >= 0):
            raise ValueError(f"lambda_adv must be a finite value >= 0, got {lambda_adv}.")
        discriminator = discriminator.to(device)  # keeps the Parameter objects an optimiser may hold
        if discriminator_optimizer is None:
            discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-4, betas=(0.9, 0.99))
        _check_disjoint_optimisers(network, optimizer, discriminator, discriminator_optimizer)
        self.discriminator = discriminator
        self.discriminator_optimizer = discriminator_optimizer
        self.discriminator_lr_scheduler = discriminator_lr_scheduler
        self.lambda_adv = float(lambda_adv)
        self.source_domain_label = float(source_domain_label)
        self.target_domain_label = float(target_domain_label)
        self.target_data_loader = target_data_loader
        self.target_image_key = target_image_key
        self._target_iterator = None
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=_default_seg_loss() if loss_function is None else loss_function,
            **kwargs,
        )
        self.state.reads_target_labels = self.reads_target_labels

    def checkpoint_dict(self) -> dict:
        """The discriminator's state objects, for a ``CheckpointSaver`` / ``CheckpointLoader`` ``save_dict``."""
        objects = {"discriminator": self.discriminator, "discriminator_optimizer": self.discriminator_optimizer}
        if self.discriminator_lr_scheduler is not None:
            objects["discriminator_lr_scheduler"] = self.discriminator_lr_scheduler
        return objects

    def _domain_bce(self, logits: torch.Tensor, label: float) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, label))

    def discriminator_step(self, source_pred: torch.Tensor, target_pred: torch.Tensor) -> torch.Tensor:
        """One discriminator update on (B, classes, *spatial) source / target logits (detached here);
        returns the detached discriminator loss."""
        self.discriminator.train()
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        with _full_precision(self):
            source_prob = torch.softmax(source_pred.detach().float(), dim=1)
            target_prob = torch.softmax(target_pred.detach().float(), dim=1)
            loss = 0.5 * (
                self._domain_bce(self.discriminator(source_prob), self.source_domain_label)
                + self._domain_bce(self.discriminator(target_prob), self.target_domain_label)
            )
        loss.backward()
        self.discriminator_optimizer.step()
        if self.discriminator_lr_scheduler is not None:
            self.discriminator_lr_scheduler.step()
        return loss.detach()

    def _iteration(self, engine: AdaptSegNetTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        target_inputs = engine.target_inputs(engine.next_target_batch())

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.discriminator.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        engine.discriminator.zero_grad(set_to_none=True)  # no stale D gradient during the segmenter's update
        target_pred = None

        def _forward_and_loss():
            nonlocal target_pred
            engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            target_pred = engine.network(target_inputs)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            seg = engine.loss_function(engine.state.output[Keys.PRED], targets).mean()
            with _full_precision(engine):
                target_prob = torch.softmax(target_pred.float(), dim=1)
                adv = engine._domain_bce(engine.discriminator(target_prob), engine.source_domain_label)
            engine.state.output[Keys.LOSS] = seg + engine.lambda_adv * adv
            engine.state.output["seg_loss"] = seg.detach()
            engine.state.output["adv_loss"] = adv.detach()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        # freeze D for the segmenter's update: its loss must leave no gradient on D's parameters
        requires_grad = [(p, p.requires_grad) for p in engine.discriminator.parameters()]
        for p, _ in requires_grad:
            p.requires_grad_(False)
        try:
            engine.backward_and_step(_forward_and_loss)
        finally:
            for p, flag in requires_grad:
                p.requires_grad_(flag)

        engine.state.output["disc_loss"] = engine.discriminator_step(engine.state.output[Keys.PRED], target_pred)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def _check_disjoint_optimisers(network, optimizer, discriminator, discriminator_optimizer) -> None:
    # each network must be updated by its own optimiser only
    def ids(params):
        return {id(p) for p in params}

    segmenter, critic = ids(network.parameters()), ids(discriminator.parameters())
    seg_opt = ids(p for group in optimizer.param_groups for p in group["params"])
    disc_opt = ids(p for group in discriminator_optimizer.param_groups for p in group["params"])
    if segmenter & critic:
        raise ValueError("the segmenter and the discriminator share parameters.")
    if seg_opt & critic:
        raise ValueError("the segmenter's optimizer holds discriminator parameters.")
    if not disc_opt <= critic:
        raise ValueError("the discriminator_optimizer holds parameters that are not the discriminator's.")


# ----------------------------------------------------------------------------------------------------
# Seg-JDOT


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


def _onehot_at_prediction(label: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
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


class SegJDOTTrainer(TargetBatchMixin, SupervisedTrainer):
    """Seg-JDOT / DeepJDOT as a MONAI trainer: source segmentation loss + JDOT transport loss.

    Per iteration: one labelled source batch and one unlabelled target batch (cycled; only
    ``target_image_key`` is read). Source and target go through the network in separate forward passes
    (per-site BatchNorm statistics); a ``BottleneckTap`` records each pass's bottleneck features.
    ``loss = seg_loss(pred_s, y_s) + segjdot_loss(f_s, f_t, onehot(y_s), softmax(pred_t), alpha, beta)``:
    the plan between the two mini-batches is solved exactly (``ot.emd``) on the current cost and held
    constant, and one optimiser step is taken on the loss (DeepJDOT's alternating scheme, one plan per
    mini-batch). The transport term is computed in float32 even under AMP.

    Defaults alpha = 0.001, beta = 0.0001 are DeepJDOT's (Damodaran et al. 2018, Sec. 4, and its
    reference code's ``jdot_alpha=0.001, tloss=0.0001``). They were set for classification features;
    Seg-JDOT's own values for segmentation were not at hand here, and with sums over
    10^5-dimensional bottleneck maps and every pixel of the label, the scale of both terms depends on the
    network and the slice size: check the logged ``jdot_loss`` against ``seg_loss``.

    ``engine.state.output``: ``image``, ``label``, ``pred`` (source), ``loss``, ``seg_loss``, ``jdot_loss``.

    Args:
        target_data_loader: iterable of dicts with the target images.
        loss_function: source segmentation loss; default cross-entropy (as ``AIVALoss``).
        alpha, beta, label_cost: of ``jdot_plan``.
        bottleneck: module name of the bottleneck (see ``aiva_monai.networks.find_bottleneck``).
        target_image_key: key of the target image in a target batch.
        other args: as ``monai.engines.SupervisedTrainer`` (the inferer must call the network once on
            the whole batch, e.g. ``SimpleInferer``, for the tap to see the batch's features).
    """

    reads_target_labels = False

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        target_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        alpha: float = 0.001,
        beta: float = 0.0001,
        label_cost: str = "sqeuclidean",
        bottleneck: str | None = None,
        target_image_key: str = Keys.IMAGE,
        **kwargs,
    ) -> None:
        _check_plain_iterations("SegJDOTTrainer", kwargs)
        for name, value in (("alpha", alpha), ("beta", beta)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite value >= 0, got {value}.")
        if label_cost not in ("sqeuclidean", "cross_entropy"):
            raise ValueError(f"label_cost must be 'sqeuclidean' or 'cross_entropy', got {label_cost!r}.")
        self.bottleneck_tap = BottleneckTap(network, bottleneck)
        self.alpha, self.beta, self.label_cost = float(alpha), float(beta), label_cost
        self.target_data_loader = target_data_loader
        self.target_image_key = target_image_key
        self._target_iterator = None
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=_default_seg_loss() if loss_function is None else loss_function,
            **kwargs,
        )
        self.state.reads_target_labels = self.reads_target_labels

    def _iteration(self, engine: SegJDOTTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        inputs, targets = batch[0], batch[1]
        args, kwargs = (batch[2], batch[3]) if len(batch) == 4 else ((), {})
        target_inputs = engine.target_inputs(engine.next_target_batch())

        engine.state.output = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)

        def _forward_and_loss():
            pred = engine.state.output[Keys.PRED] = engine.inferer(inputs, engine.network, *args, **kwargs)
            source_features = engine.bottleneck_tap.features
            target_pred = engine.network(target_inputs)
            target_features = engine.bottleneck_tap.features
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            seg = engine.loss_function(pred, targets).mean()
            with _full_precision(engine):
                jdot = segjdot_loss(
                    source_features.float(),
                    target_features.float(),
                    _onehot_at_prediction(targets, pred),
                    torch.softmax(target_pred.float(), dim=1),
                    engine.alpha,
                    engine.beta,
                    engine.label_cost,
                )
            engine.state.output[Keys.LOSS] = seg + jdot
            engine.state.output["seg_loss"] = seg.detach()
            engine.state.output["jdot_loss"] = jdot.detach()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)

        return engine.step_with(_forward_and_loss)


# ----------------------------------------------------------------------------------------------------
# Oracle


class OracleTrainer(SupervisedTrainer):
    """The target-supervised upper bound: a plain ``SupervisedTrainer`` whose ``train_data_loader`` yields
    the TARGET site's labelled training slices (same network, loss, optimiser and budget as pretraining;
    in a bundle: the pretraining config with the target site as its source).

    It is the only method of the comparison that reads target labels: ``OracleTrainer.reads_target_labels``
    and ``engine.state.reads_target_labels`` are True, as is ``reads_target_labels("oracle")``; write that
    flag next to every number it produces.
    """

    reads_target_labels = True

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable,
        network: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_function: Callable | None = None,
        **kwargs,
    ) -> None:
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            train_data_loader=train_data_loader,
            network=network,
            optimizer=optimizer,
            loss_function=_default_seg_loss() if loss_function is None else loss_function,
            **kwargs,
        )
        self.state.reads_target_labels = self.reads_target_labels
