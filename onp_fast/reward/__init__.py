"""Batched masked-forward reward: score K pruning masks on several models and perturbations in one pass.

RewardEngine(models, neurons, max_memory=..., strategy=...).score(masks [K, N], images, labels, perturbations)
-> RewardResult (correct, CE sum, per-class prediction counts per (model, setting, mask)).
References (per-mask loop with hooks, naive K*B batch): onp_fast.ops.reference_reward.
"""
from __future__ import annotations

from .engine import STRATEGIES, RewardEngine
from .memory import format_bytes, parse_memory
from .neurons import NeuronSet, NeuronUnit, bn_neurons, expand_groups
from .result import Perturbations, RewardResult

__all__ = ["RewardEngine", "RewardResult", "Perturbations", "NeuronSet", "NeuronUnit", "bn_neurons",
           "expand_groups", "parse_memory", "format_bytes", "STRATEGIES"]
