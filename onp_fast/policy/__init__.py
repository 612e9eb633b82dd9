"""The pruning policy: a GNN over the neuron graphs, a prune head, Bernoulli decisions per group, PPO."""
from .gnn import PrunePolicy
from .ppo import PPOConfig, train_policy

__all__ = ["PrunePolicy", "PPOConfig", "train_policy"]
