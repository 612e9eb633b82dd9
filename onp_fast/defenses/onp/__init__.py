"""ONP, our method (onp.md sections 2-4): exposure features of every neuron group (features.py), one graph per
layer from weight connectivity (graph.py, the C++ neuron_graphs op), a GNN policy over the graphs (policy.py)
trained by PPO on the batched reward (ppo.py); the Defense and its Config (defense.py)."""
from .defense import ONP, ONPConfig, onp_scores
from .features import FEATURE_NAMES, exposure_features
from .graph import PolicyGraph, build_policy_graph
from .policy import PrunePolicy
from .ppo import PPOConfig, train_policy

__all__ = ["FEATURE_NAMES", "ONP", "ONPConfig", "PPOConfig", "PolicyGraph", "PrunePolicy", "build_policy_graph",
           "exposure_features", "onp_scores", "train_policy"]
