"""Label-free model selection: the rules that pick one checkpoint of an adaptation run.

Pure functions on scores; no Ignite. A *record* is one kept checkpoint's scores (a dict), e.g.
``{"epoch": 3, "iteration": 300, "source_dice": 0.981, "target_entropy": 0.021, ...}``. A *rule* names the
score it reads and whether larger is better; ``choose`` returns the record a rule picks. Every rule reads
source labels (source validation Dice) or target *images* only: none reads a target label.

Target-only scores are computed on held-out, unlabelled target slices from the network's softmax output
``probs`` (N, C, H, W):

- ``prediction_entropy``: mean per-pixel entropy (lower = more confident);
- ``information_maximization``: entropy of the mean prediction minus the mean entropy (Gomes et al. 2010;
  SHOT, Liang et al. 2020): confident *and* not collapsed to one class; higher is better;
- ``agreement_dice``: foreground Dice between the prediction of an image and of a perturbed copy
  (intensity changes a new scanner could make); higher = more stable.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "SelectionRule",
    "SELECTION_RULES",
    "choose",
    "choices",
    "prediction_entropy",
    "information_maximization",
    "agreement_dice",
    "intensity_perturbations",
]


@dataclass(frozen=True)
class SelectionRule:
    """A label-free rule: pick the record with the best ``score`` (``None``: the last record)."""

    name: str
    score: str | None
    larger_is_better: bool
    description: str


SELECTION_RULES: dict[str, SelectionRule] = {
    rule.name: rule
    for rule in (
        SelectionRule("source_best", "source_dice", True, "highest Dice on the labelled source validation subjects"),
        SelectionRule(
            "source_lowest",
            "source_dice",
            False,
            "lowest Dice on the labelled source validation subjects (the AIVA authors' low_source_model)",
        ),
        SelectionRule("last", None, True, "the last checkpoint of the run"),
        SelectionRule(
            "target_entropy",
            "target_entropy",
            False,
            "lowest mean prediction entropy on held-out unlabelled target slices",
        ),
        SelectionRule(
            "target_im",
            "target_im",
            True,
            "highest information maximisation (entropy of the mean prediction - mean entropy) on held-out "
            "unlabelled target slices",
        ),
        SelectionRule(
            "target_agreement",
            "target_agreement",
            True,
            "highest Dice between predictions of held-out unlabelled target slices and of their "
            "intensity-perturbed copies",
        ),
    )
}


def _rule(rule: str | SelectionRule) -> SelectionRule:
    if isinstance(rule, SelectionRule):
        return rule
    if rule not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {rule!r}; choose one of {sorted(SELECTION_RULES)}.")
    return SELECTION_RULES[rule]


def choose(records: Sequence[dict], rule: str | SelectionRule) -> dict:
    """The record ``rule`` picks among ``records`` (in run order). Ties go to the earliest record.

    Raises:
        ValueError: no record, an unknown rule, or a record without the rule's score (or a NaN score).
    """
    rule = _rule(rule)
    if not records:
        raise ValueError(f"selection rule {rule.name!r}: no checkpoint to choose from.")
    if rule.score is None:
        return records[-1]
    best, best_value = None, None
    for record in records:
        value = record.get(rule.score)
        if value is None or value != value:  # missing or NaN
            raise ValueError(f"selection rule {rule.name!r} needs '{rule.score}', missing in record {record}.")
        better = best is None or (value > best_value if rule.larger_is_better else value < best_value)
        if better:
            best, best_value = record, value
    return best


def choices(records: Sequence[dict], rules: Sequence[str] | None = None) -> dict[str, dict]:
    """{rule name: chosen record} for every rule in ``rules`` (default: all) that the records can answer
    (a rule whose score no record carries is left out)."""
    found = {}
    for name in rules or SELECTION_RULES:
        rule = _rule(name)
        if rule.score is None or (records and all(rule.score in r for r in records)):
            found[name] = choose(records, rule)
    return found


# ----------------------------------------------------------------------------------------------------
# label-free target scores


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)


def prediction_entropy(probs: torch.Tensor) -> float:
    """Mean per-pixel entropy (nats) of softmax outputs ``probs`` (N, C, *spatial)."""
    return float(_entropy(probs.double()).mean())


def information_maximization(probs: torch.Tensor) -> float:
    """H(mean prediction) - mean H(prediction) of ``probs`` (N, C, *spatial), in nats.

    The mean prediction is the class marginal over every pixel of every slice. High when each pixel is
    confident while the classes stay balanced as a whole; a model that predicts one class everywhere
    with certainty scores 0."""
    probs = probs.double()
    marginal = probs.transpose(0, 1).reshape(probs.shape[1], -1).mean(dim=1)
    marginal_entropy = -(marginal * marginal.clamp_min(1e-12).log()).sum()
    return float(marginal_entropy - _entropy(probs).mean())


def agreement_dice(labels: torch.Tensor, other_labels: torch.Tensor) -> float:
    """Foreground Dice (all classes > 0 pooled) between two label maps (N, *spatial) of the same images.
    Two empty maps agree perfectly (1.0)."""
    a, b = labels > 0, other_labels > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def intensity_perturbations(gammas: Sequence[float] = (0.7, 1.5), noise: float = 0.03, seed: int = 0) -> list[Callable]:
    """Perturbations of (N, C, H, W) images a new scanner could make: contrast curves ``x ** gamma``
    (on the image's own [min, max] range) and additive Gaussian noise of ``noise`` x that range (seeded)."""

    def gamma_curve(gamma):
        def apply(images: torch.Tensor) -> torch.Tensor:
            low = images.amin(dim=tuple(range(1, images.ndim)), keepdim=True)
            span = (images.amax(dim=tuple(range(1, images.ndim)), keepdim=True) - low).clamp_min(1e-8)
            return low + span * ((images - low) / span) ** gamma

        return apply

    def gaussian(images: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        span = images.amax(dim=tuple(range(1, images.ndim)), keepdim=True) - images.amin(
            dim=tuple(range(1, images.ndim)), keepdim=True
        )
        return images + noise * span * torch.randn(images.shape, generator=generator).to(images.device, images.dtype)

    found = [gamma_curve(g) for g in gammas]
    if noise > 0:
        found.append(gaussian)
    return found
