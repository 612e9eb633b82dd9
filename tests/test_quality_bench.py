"""experiments/quality.py's reward ablation: one shared preparation, the same result as a standalone repair."""
import sys
from pathlib import Path

import torch

from onp_fast import attacks, models
from onp_fast.data import defense_subset, load_dataset, normalize
from onp_fast.defenses import ONPConfig
from onp_fast.repair import RepairConfig, RewardWeights, repair

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import quality  # noqa: E402


def test_ablation_settings_switch_each_term_both_ways():
    labels = [label for label, _ in quality.ablation_weights(RewardWeights())]
    assert labels == ["without ca_b", "without ca_t", "with ca_u=1", "with ca_p=1", "without sparsity"]


def test_ablation_on_a_shared_preparation_equals_a_standalone_repair():
    splits = load_dataset("digits")
    torch.manual_seed(0)
    model = models.build("preactresnet18", num_classes=10, in_channels=1, width=0.125, input_size=16).eval()
    attack = attacks.build("badnets", (1, 16, 16), seed=0)
    x, y = defense_subset(splits, 40, seed=0)
    xn = normalize(x, splits.mean, splits.std)
    cfg, onp = RepairConfig(reward_batch=32, perturbations=1), ONPConfig(iterations=2, samples=4)
    before = quality.ev(model, splits, attack)
    out = quality.ablation(model, xn, y, splits, attack, before, cfg, onp)
    assert list(out) == ["default"] + [label for label, _ in quality.ablation_weights(cfg.weights)]
    for row in out.values():
        assert 0 <= row["ca"] <= 1 and 0 <= row["asr"] <= 1 and row["pruned"] >= 0
    alone = RepairConfig(reward_batch=32, perturbations=1, weights=RewardWeights(ca_t=0.0))
    res = repair(model, xn, y, 10, "onp", alone, onp, progress=False)
    after = quality.ev(res.model, splits, attack)
    assert out["without ca_t"]["pruned"] == int(res.prune.sum())
    assert (out["without ca_t"]["ca"], out["without ca_t"]["asr"]) == (after["ca"], after["asr"])
