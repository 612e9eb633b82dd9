"""Per-layer neuron graphs of a model, batched for PyTorch Geometric (onp.md section 3)."""
from .build import PolicyGraph, build_policy_graph

__all__ = ["PolicyGraph", "build_policy_graph"]
