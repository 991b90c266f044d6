"""Label-free selection rules and scores: planted checkpoint sequences and hand-computed values."""

import math

import pytest
import torch

from aiva_monai.selection import (
    SELECTION_RULES,
    agreement_dice,
    choices,
    choose,
    information_maximization,
    intensity_perturbations,
    prediction_entropy,
)

# a planted run: every rule has a different, known answer
RECORDS = [
    {"epoch": 1, "source_dice": 0.980, "target_entropy": 0.050, "target_im": 0.30, "target_agreement": 0.90},
    {"epoch": 2, "source_dice": 0.985, "target_entropy": 0.020, "target_im": 0.31, "target_agreement": 0.93},
    {"epoch": 3, "source_dice": 0.970, "target_entropy": 0.030, "target_im": 0.36, "target_agreement": 0.92},
    {"epoch": 4, "source_dice": 0.975, "target_entropy": 0.040, "target_im": 0.33, "target_agreement": 0.97},
    {"epoch": 5, "source_dice": 0.978, "target_entropy": 0.045, "target_im": 0.32, "target_agreement": 0.91},
]


@pytest.mark.parametrize(
    "rule, epoch",
    [
        ("source_best", 2),
        ("source_lowest", 3),
        ("last", 5),
        ("target_entropy", 2),
        ("target_im", 3),
        ("target_agreement", 4),
    ],
)
def test_each_rule_picks_its_planted_checkpoint(rule, epoch):
    assert choose(RECORDS, rule)["epoch"] == epoch


def test_choices_answers_every_rule_and_leaves_out_missing_scores():
    picked = choices(RECORDS)
    assert set(picked) == set(SELECTION_RULES)
    source_only = [{"epoch": r["epoch"], "source_dice": r["source_dice"]} for r in RECORDS]
    assert set(choices(source_only)) == {"source_best", "source_lowest", "last"}


def test_ties_go_to_the_earliest_checkpoint():
    records = [{"epoch": e, "source_dice": 0.9} for e in (1, 2, 3)]
    assert choose(records, "source_best")["epoch"] == 1
    assert choose(records, "source_lowest")["epoch"] == 1


def test_errors_are_clear():
    with pytest.raises(ValueError, match="unknown selection rule"):
        choose(RECORDS, "target_dice")
    with pytest.raises(ValueError, match="no checkpoint"):
        choose([], "last")
    with pytest.raises(ValueError, match="needs 'target_im'"):
        choose([{"epoch": 1, "target_im": float("nan")}], "target_im")


def test_entropy_and_information_maximization_by_hand():
    # two pixels of one slice: (0.5, 0.5) and (1, 0)
    probs = torch.tensor([[[[0.5, 1.0]], [[0.5, 0.0]]]])  # (N=1, C=2, H=1, W=2)
    assert prediction_entropy(probs) == pytest.approx(math.log(2) / 2)
    # marginal (0.75, 0.25): H = -(0.75 ln 0.75 + 0.25 ln 0.25)
    marginal_entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert information_maximization(probs) == pytest.approx(marginal_entropy - math.log(2) / 2)
    # a model certain of one class everywhere: IM 0; certain and balanced: IM ln 2
    collapsed = torch.zeros(3, 2, 4, 4)
    collapsed[:, 0] = 1
    assert information_maximization(collapsed) == pytest.approx(0.0)
    balanced = torch.zeros(2, 2, 4, 4)
    balanced[0, 0] = 1
    balanced[1, 1] = 1
    assert information_maximization(balanced) == pytest.approx(math.log(2))


def test_agreement_dice_by_hand():
    a = torch.tensor([[[0, 1, 1, 0]]])
    b = torch.tensor([[[0, 1, 0, 1]]])
    assert agreement_dice(a, b) == pytest.approx(2 * 1 / 4)
    assert agreement_dice(a, a) == 1.0
    assert agreement_dice(torch.zeros(1, 3), torch.zeros(1, 3)) == 1.0


def test_intensity_perturbations_keep_range_and_are_seeded():
    images = torch.linspace(0, 1, 64).reshape(1, 1, 8, 8)
    gamma_low, gamma_high, noise = intensity_perturbations((0.5, 2.0), noise=0.05, seed=3)
    assert torch.allclose(gamma_low(images), images.sqrt(), atol=1e-6)
    assert torch.allclose(gamma_high(images), images**2, atol=1e-6)
    first, second = noise(images), intensity_perturbations((), noise=0.05, seed=3)[0](images)
    assert torch.equal(first, second) and not torch.equal(first, images)
    assert float((first - images).std()) == pytest.approx(0.05, rel=0.3)
