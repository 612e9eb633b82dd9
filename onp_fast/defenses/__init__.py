"""Defenses behind one interface (base.py): each ranks the neuron groups of a prepared context; ONP (ours,
onp/), FP, ANP, RNP, CLP and FT-SAM (fine-tuning only), each with its own Config, registered in METHODS.

    defense = get("anp")                       # or get("onp", ONPConfig(iterations=30)), ANP(ANPConfig(...))
    scores, part = defense.scores(ctx)         # ctx = onp_fast.prepare.prepare(...); scores [G]
The depth rule and the repaired model: onp_fast.repair.repair(..., method=defense).
"""
from . import anp, clp, fp, ftsam, onp, rnp  # noqa: F401  (register the methods)
from .anp import ANPConfig
from .base import METHODS, Defense, apply_params, get, register
from .clp import CLPConfig
from .fp import FPConfig
from .ftsam import FTSAMConfig
from .onp import ONPConfig
from .rnp import RNPConfig, rnp_scores

__all__ = ["METHODS", "ANPConfig", "CLPConfig", "Defense", "FPConfig", "FTSAMConfig", "ONPConfig", "RNPConfig",
           "apply_params", "get", "register", "rnp_scores"]
