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


def test_within_tolerance_allows_a_drop_of_exactly_the_tolerance_in_float32_and_float64():
    """Held-out accuracies reach the depth rule as float32 count ratios (91/100 is 0.9100000262): a drop of
    exactly 2 of 100 images is within a 0.02 tolerance, 3 images are not, in float32, float64, or mixed (the
    purification guard compares a float64 epoch accuracy with the depth rule's float32 one)."""
    from onp_fast.metrics import within_tolerance

    f32 = lambda k: float(torch.tensor(k / 100, dtype=torch.float32))  # noqa: E731
    for before in (0.91, f32(91)):
        for two in (0.89, f32(89)):
            assert within_tolerance(two, before, 0.02)
        for three in (0.88, f32(88)):
            assert not within_tolerance(three, before, 0.02)
    assert within_tolerance(0.5, 0.5, 0.0) and not within_tolerance(0.49, 0.5, 0.0)
    assert not within_tolerance(f32(89), f32(91), 0.02 - 1e-3)


def test_the_depth_rule_keeps_a_depth_whose_held_out_accuracy_drops_by_exactly_the_tolerance():
    """Planted: depth 1 costs exactly 2 of 100 held-out images (float32 terms, as MaskScorer gives them) and has
    the best allowed reward; depth 2 costs 3 and would score higher. The rule must take depth 1 (with the
    float32 rounding of 0.91 and 0.89 it used to drop depth 1 and keep the model as given)."""
    from onp_fast.repair import RewardWeights, choose_depth

    class Scorer:
        weights = RewardWeights()
        table = {0: (91, 0.0), 1: (89, 0.5), 2: (88, 0.6)}  # depth -> (correct of 100, CA_T)

        def terms(self, masks):
            rows = [self.table[int(m.sum())] for m in masks]
            f = lambda v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
            return {"ca_b": f([c / 100 for c, _ in rows]), "ca_t": f([t for _, t in rows]),
                    "ca_u": f([0.0] * len(rows)), "ca_p": f([0.0] * len(rows)), "sparsity": f([0.0] * len(rows))}

    choice = choose_depth(torch.tensor([3.0, 2.0]), Scorer(), tolerance=0.02, slack=0.0, max_depth=2)
    assert [r["depth"] for r in choice["table"]] == [0, 1, 2]
    assert choice["depth"] == 1 and choice["prune"].tolist() == [True, False]
