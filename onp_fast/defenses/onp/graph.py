"""Builds the policy's input graph: one node per output row of every prunable conv/linear layer.

Edges come from the C++ connectivity op (cosine of connection-strength vectors within a layer, optional
cross-layer top-k edges). Node features: the op's weight features ++ the exposure features of the node's
group ++ the layer's relative depth, standardised per layer.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ...groups import NeuronGroups
from ...ops import neuron_graphs


@dataclass
class PolicyGraph:
    """x [N, F] float32, edge_index [2, E] int64, edge_weight [E] float32, node_group [N] int64 (-1: no group),
    node_layer [N] int64, group_features [G, Fg] float32 (standardised over groups), num_groups G."""

    x: torch.Tensor
    edge_index: torch.Tensor
    edge_weight: torch.Tensor
    node_group: torch.Tensor
    node_layer: torch.Tensor
    group_features: torch.Tensor
    num_groups: int


def tame(x: torch.Tensor) -> torch.Tensor:
    """sign(x) log(1 + |x|): heavy tails tamed before standardising."""
    return torch.log1p(x.abs()) * x.sign()


def standardise(x: torch.Tensor, segment: torch.Tensor, n_seg: int) -> torch.Tensor:
    """x [N, F], segment [N] int64 -> per-segment zero mean, unit std (std 0 -> 1)."""
    ones = torch.ones(len(x), 1)
    cnt = torch.zeros(n_seg, 1).index_add_(0, segment, ones).clamp(min=1)
    mean = torch.zeros(n_seg, x.shape[1]).index_add_(0, segment, x) / cnt
    var = torch.zeros(n_seg, x.shape[1]).index_add_(0, segment, (x - mean[segment]) ** 2) / cnt
    std = var.sqrt()
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    return (x - mean[segment]) / std[segment]


@torch.no_grad()
def build_policy_graph(model: nn.Module, groups: NeuronGroups, group_features: torch.Tensor, *, eps: float = 0.9,
                       dormant_quantile: float = 0.05, cross_layer_topk: int = 2) -> PolicyGraph:
    """group_features: [G, Fg] float32 exposure features (features.py) -> the batched graph of every layer in
    `groups.layers` (nodes: their output rows, in layer order), on the CPU whatever the model's device (the
    policy trains there; its masks go to the reward engine, which moves them)."""
    modules = dict(model.named_modules())
    weights = [modules[name].weight.detach().float().cpu() for name in groups.layers]  # the policy runs on the CPU
    ng = neuron_graphs(weights, eps=eps, dormant_quantile=dormant_quantile, cross_layer_topk=cross_layer_topk)
    node_group = torch.cat([torch.as_tensor(groups.layer_groups[name]) for name in groups.layers])
    n_layers = len(groups.layers)
    depth = (ng.node_layer.float() / max(1, n_layers - 1)).unsqueeze(1)
    gf = tame(group_features)
    node_gf = torch.where((node_group >= 0).unsqueeze(1), gf[node_group.clamp(min=0)], torch.zeros(1, gf.shape[1]))
    feats = torch.cat([torch.log1p(ng.node_features), node_gf], dim=1)
    x = torch.cat([standardise(feats, ng.node_layer, n_layers), depth], dim=1)
    gstd = standardise(gf, torch.zeros(len(gf), dtype=torch.long), 1)
    return PolicyGraph(x=x, edge_index=ng.edge_index, edge_weight=ng.edge_weight, node_group=node_group,
                       node_layer=ng.node_layer, group_features=gstd, num_groups=groups.num_groups)
