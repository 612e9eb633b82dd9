"""The one entry point of every defense: repair(model, x, y, num_classes, method=..., config=...) prepares the
shared context (onp_fast.prepare), ranks the neuron groups with the method (onp_fast.defenses), picks the depth
on held-out defense images (select.py), applies it, runs the method's last step, the optional clean fine-tune
and compaction, and returns the repaired model with one report (pipeline.py); output.py writes the masks, the
report and the plot."""
from ..prepare import RepairConfig
from ..reward import RewardWeights
from .pipeline import RepairResult, compacted, repair, run
from .select import choose_depth

__all__ = ["RepairConfig", "RepairResult", "RewardWeights", "choose_depth", "compacted", "repair", "run"]
