"""Pruning defenses behind one interface (prepare -> scores over neuron groups -> the shared depth rule):
ONP (ours), FP, ANP, RNP and CLP, registered in METHODS; run_defense() runs one, compare() runs them all on
the same data and seed.

    result = run_defense("anp", model, x, y, num_classes)           # a RepairResult
    table = compare(model, x, y, num_classes, test_x=..., test_y=..., mean=..., std=..., attack=..., target=0)
"""
from . import anp, clp, fp, onp, rnp  # noqa: F401  (register the methods)
from .anp import ANPConfig
from .base import METHODS, Defense, apply_defense, apply_params, get, run_defense
from .clp import CLPConfig
from .compare import compare, format_table
from .fp import FPConfig
from .rnp import RNPConfig, rnp_scores

__all__ = ["METHODS", "ANPConfig", "CLPConfig", "Defense", "FPConfig", "RNPConfig", "apply_defense", "apply_params",
           "compare", "format_table", "get", "rnp_scores", "run_defense"]
