"""Neuron units and coupling groups, found by tracing the model (torch.fx), not by module names.

A *mask point* is a place where a channel's activation is multiplied by its mask: the output channel of a
BatchNorm/LayerNorm, of a conv/linear that no norm follows, or (site "in") an input slice of an attention
projection (one head). A *group* is a set of mask points that must share one decision: channels tied by a
residual add or a concat (found by channel-space union-find, see channels.py), one MLP hidden unit, one head.
Zeroing every point of a group makes that channel exactly zero wherever it flows.

    groups = find_groups(model, input_shape=(3, 32, 32))
    groups.num_groups, groups.groups[g].points, groups.layers   # prunable conv/linear layers (graph nodes)
    with groups.masked(model, keep):                             # keep [G] float in [0, 1]
        logits = model(x)
    groups.prune_(model, keep_bool)                              # the same, in the weights (hard masks)
"""
from .compact import compact
from .find import Group, MaskPoint, NeuronGroups, find_groups
from .pairs import norm_after
from .trace import Tracer, trace

__all__ = ["Group", "MaskPoint", "NeuronGroups", "Tracer", "compact", "find_groups", "norm_after", "trace"]
