"""ONP repair: groups -> exposure features -> graphs -> GNN policy trained by RL -> depth rule -> pruned model."""
from .pipeline import RepairConfig, RepairResult, repair
from .reward import RewardWeights

__all__ = ["RepairConfig", "RepairResult", "RewardWeights", "repair"]
