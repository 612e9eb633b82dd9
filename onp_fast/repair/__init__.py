"""ONP repair: groups -> exposure features -> graphs -> GNN policy trained by RL -> depth rule -> pruned model."""
from .pipeline import DefenseContext, RepairConfig, RepairResult, finish, onp_scores, prepare, repair
from .reward import RewardWeights

__all__ = ["DefenseContext", "RepairConfig", "RepairResult", "RewardWeights", "finish", "onp_scores", "prepare",
           "repair"]
