"""CA, ASR, RA and DER as design/evaluation.md defines them."""
import pytest
import torch

from onp_fast import metrics
from onp_fast.errors import UserError


def test_clean_accuracy():
    assert metrics.clean_accuracy(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 3])) == 0.75


def test_asr_and_ra_leave_out_target_class_images():
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    pred = torch.tensor([0, 0, 0, 0, 3, 1])  # target-class images predicted 0 must not count
    assert metrics.attack_success_rate(pred, labels, target=0) == pytest.approx(2 / 4)
    assert metrics.robust_accuracy(pred, labels, target=0) == pytest.approx(1 / 4)
    # target-class images predicted wrongly change nothing either
    pred2 = torch.tensor([5, 5, 0, 0, 3, 1])
    assert metrics.attack_success_rate(pred2, labels, 0) == pytest.approx(2 / 4)
    assert metrics.robust_accuracy(pred2, labels, 0) == pytest.approx(1 / 4)
    assert metrics.attack_success_rate(pred, labels, target=3) == pytest.approx(0 / 5)


def test_asr_of_only_target_images_is_an_error():
    with pytest.raises(UserError, match="target class"):
        metrics.attack_success_rate(torch.tensor([0, 0]), torch.tensor([0, 0]), 0)


@pytest.mark.parametrize("asr_b,asr_a,ca_b,ca_a,expected", [
    (1.0, 0.0, 0.9, 0.9, 1.0),            # perfect repair
    (0.9503, 0.0148, 0.9132, 0.8996, (0.9355 - 0.0136 + 1) / 2),  # BackdoorBench FT on BadNets
    (0.95, 0.95, 0.90, 0.90, 0.5),        # no change
    (0.10, 0.50, 0.80, 0.90, 0.5),        # ASR and CA both rise: both terms clipped to 0
    (0.10, 0.50, 0.90, 0.80, 0.45),       # ASR rise clipped, CA drop counts
    (0.90, 0.10, 0.80, 0.95, 0.9),        # CA rise clipped, ASR drop counts
    (0.0, 0.0, 1.0, 0.0, 0.0),            # worst case
])
def test_der_hand_computed_including_clipped_cases(asr_b, asr_a, ca_b, ca_a, expected):
    assert metrics.defense_effectiveness_rating(asr_b, asr_a, ca_b, ca_a) == pytest.approx(expected, abs=1e-12)
    assert metrics.defense_effectiveness_rating(asr_b, asr_a, ca_b, ca_a) == pytest.approx(expected, abs=1e-12)


def test_der_rejects_percentages():
    with pytest.raises(UserError, match="fractions"):
        metrics.defense_effectiveness_rating(95.0, 1.0, 0.9, 0.9)
