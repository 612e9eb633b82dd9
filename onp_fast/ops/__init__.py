"""Thin Python wrappers of the C++/CUDA ops (torch.ops.onp_fast.*); pure-PyTorch references beside them."""
from __future__ import annotations

from .neuron_graphs import NeuronGraphs, neuron_graphs

__all__ = ["NeuronGraphs", "neuron_graphs"]
