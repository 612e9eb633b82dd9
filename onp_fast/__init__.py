"""onp-fast: repair backdoored neural networks by optimized neuron pruning.

Data path: models/ -> groups/ (neuron units, coupled groups) -> graph/ (per-layer neuron graphs)
-> policy/ (GNN + RL) -> masks -> repaired model. C++/CUDA ops live in onp_fast.ops.
"""
__version__ = "0.1.0"
