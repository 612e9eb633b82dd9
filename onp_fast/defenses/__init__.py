"""Pruning defenses that rank neuron groups: RNP-style (unlearn, then recover masks). ONP lives in repair/."""
from .rnp import rnp_scores

__all__ = ["rnp_scores"]
