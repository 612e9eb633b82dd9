"""PrunePolicy: GraphSAGE/GAT encoder (PyG) shared by all layers -> per-node prune logit -> group logits."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch_geometric.nn import GATv2Conv, SAGEConv

from .graph import PolicyGraph


class PrunePolicy(nn.Module):
    """Group prune logits [G] from a PolicyGraph.

    A group's logit is the mean of its member nodes' logits plus an MLP of its own exposure features (groups
    without weight rows, e.g. attention heads, get the MLP term alone). `init_prune_prob` sets the bias so
    the untrained policy prunes that fraction."""

    def __init__(self, node_dim: int, group_dim: int, hidden: int = 64, layers: int = 2, conv: str = "sage",
                 init_prune_prob: float = 0.05):
        super().__init__()
        if conv not in ("sage", "gat"):
            raise ValueError(f"conv must be 'sage' or 'gat', got {conv!r}")
        dims = [node_dim] + [hidden] * layers
        self.convs = nn.ModuleList(
            SAGEConv(a, b) if conv == "sage" else GATv2Conv(a, b, heads=1, edge_dim=1) for a, b in zip(dims, dims[1:])
        )
        self.conv_kind = conv
        self.node_head = nn.Linear(hidden + node_dim, 1)
        self.group_head = nn.Sequential(nn.Linear(group_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.bias = nn.Parameter(torch.tensor(float(torch.logit(torch.tensor(init_prune_prob)))))
        nn.init.zeros_(self.node_head.weight)
        nn.init.zeros_(self.node_head.bias)
        nn.init.zeros_(self.group_head[-1].weight)
        nn.init.zeros_(self.group_head[-1].bias)

    def forward(self, g: PolicyGraph) -> torch.Tensor:
        """-> group logits [G] float32 (sigmoid = probability of pruning the group)."""
        h = g.x
        for conv in self.convs:
            if self.conv_kind == "sage":
                h = torch.relu(conv(h, g.edge_index))
            else:
                h = torch.relu(conv(h, g.edge_index, g.edge_weight.unsqueeze(1)))
        node_logit = self.node_head(torch.cat([h, g.x], dim=1)).squeeze(1)
        sel = g.node_group >= 0
        idx = g.node_group[sel]
        summed = torch.zeros(g.num_groups).index_add(0, idx, node_logit[sel])
        cnt = torch.zeros(g.num_groups).index_add(0, idx, torch.ones_like(node_logit[sel]))
        row_term = summed / cnt.clamp(min=1)
        return row_term + self.group_head(g.group_features).squeeze(1) + self.bias
