"""Exposure features of neuron groups (onp.md section 2) and RNP-style unlearning."""
from .exposure import FEATURE_NAMES, exposure_features
from .unlearn import accuracy_of, unlearn

__all__ = ["FEATURE_NAMES", "exposure_features", "accuracy_of", "unlearn"]
