"""The reward of pruning masks (onp.md section 5) and the batched masked-forward engine that scores them.

MaskScorer(groups, model, x, y, weights, ...)(prune [K, G] bool) -> rewards [K]: the reward every defense's depth
rule and ONP's policy use (RewardWeights: its terms' weights).

RewardEngine(models, neurons, max_memory=..., strategy=...).score(masks [K, N], images, labels, perturbations)
-> RewardResult (correct, CE sum, per-class prediction counts, true-label probability sum per (model, setting,
mask)); neurons: a NeuronSet (BN channels) or GroupPoints(groups) (every mask point of the neuron groups, masks
[K, G]). MaskScorer's backend "engine" runs on it, "hooks" is the per-mask reference.
References (per-mask loop with hooks, naive K*B batch): onp_fast.reward.reference.
"""
from __future__ import annotations

from .engine import STRATEGIES, RewardEngine
from .memory import format_bytes, parse_memory
from .neurons import GroupPoints, MaskSite, NeuronSet, NeuronUnit, bn_neurons, expand_groups
from .result import Perturbations, RewardResult
from .scorer import BACKENDS, TERMS, MaskScorer, RewardWeights, check_backend

__all__ = ["MaskScorer", "RewardWeights", "TERMS", "BACKENDS", "check_backend", "RewardEngine", "RewardResult",
           "Perturbations", "NeuronSet", "NeuronUnit", "GroupPoints", "MaskSite", "bn_neurons", "expand_groups",
           "parse_memory", "format_bytes", "STRATEGIES"]
