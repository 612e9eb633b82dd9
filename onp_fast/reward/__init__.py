"""The reward of pruning masks (onp.md section 5) and the batched masked-forward engine that scores them.

MaskScorer(groups, model, x, y, weights, ...)(prune [K, G] bool) -> rewards [K]: the reward every defense's depth
rule and ONP's policy use (RewardWeights: its terms' weights).

RewardEngine(models, neurons, max_memory=..., strategy=...).score(masks [K, N], images, labels, perturbations)
-> RewardResult (correct, CE sum, per-class prediction counts per (model, setting, mask)).
References (per-mask loop with hooks, naive K*B batch): onp_fast.reward.reference.
"""
from __future__ import annotations

from .engine import STRATEGIES, RewardEngine
from .memory import format_bytes, parse_memory
from .neurons import NeuronSet, NeuronUnit, bn_neurons, expand_groups
from .result import Perturbations, RewardResult
from .scorer import TERMS, MaskScorer, RewardWeights

__all__ = ["MaskScorer", "RewardWeights", "TERMS", "RewardEngine", "RewardResult", "Perturbations", "NeuronSet", "NeuronUnit", "bn_neurons",
           "expand_groups", "parse_memory", "format_bytes", "STRATEGIES"]
