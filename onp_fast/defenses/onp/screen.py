"""The policy's action space on a large model: the groups the exposure features single out.

With G groups the policy draws a product of G Bernoulli decisions; K samples per iteration carry K rewards, so
the credit each decision gets shrinks as G grows (11k-38k groups on resnet50 / vit_b_16 at 224 px). Above
`ONPConfig.actions` groups the policy decides over the M = `actions` groups picked here and never prunes the
others (score -inf), so its sample needs stop growing with the model.

The pick is a union of rankings. For every suspicion feature f (each one the signal of a published pruning
defense: CLP's channel Lipschitz bound, ANP's noise sensitivity, RNP's unlearning change, and the trigger
shift when a proxy is flagged), z_f is the feature after the graph's sign-log taming, standardised within the
group's home layer (the first layer one of its rows belongs to; groups with no rows, such as attention heads,
form one segment). A group's key is its best rank over the features, min_f rank(z_f); the M groups with the
smallest keys are the actions, ties broken by the sum of ranks, then by index. So every feature contributes
its top groups in turn (a round robin), and a group that any one of them ranks high is a candidate.
"""
from __future__ import annotations

import torch

from .features import FEATURE_NAMES
from .graph import PolicyGraph, standardise, tame

SUSPICION = ("clp", "noise_sensitivity", "unlearn_change", "trigger_shift")


def home_layers(graph: PolicyGraph) -> torch.Tensor:
    """-> [G] int64: each group's home layer, the smallest layer index among its rows (layers count), groups
    without rows in one extra segment (n_layers)."""
    n_layers = int(graph.node_layer.max()) + 1 if len(graph.node_layer) else 0
    home = torch.full((graph.num_groups,), n_layers, dtype=torch.long)
    sel = graph.node_group >= 0
    return home.scatter_reduce(0, graph.node_group[sel], graph.node_layer[sel], reduce="amin")


def screen_actions(features: torch.Tensor, graph: PolicyGraph, m: int) -> torch.Tensor:
    """features [G, len(FEATURE_NAMES)] (features.exposure_features), graph (its node_group, node_layer), m >= 1
    -> the M = min(m, G) action groups [M] int64, ascending. A feature constant over every group (the trigger
    shift without a proxy) takes no part."""
    g = features.shape[0]
    if m >= g:
        return torch.arange(g)
    home = home_layers(graph)
    cols = [FEATURE_NAMES.index(n) for n in SUSPICION]
    cols = [c for c in cols if not bool((features[:, c] == features[0, c]).all())]
    if not cols:
        return torch.arange(m)
    z = standardise(tame(features[:, cols].float()), home, int(home.max()) + 1)  # [G, F']
    order = torch.sort(-z, dim=0, stable=True).indices  # [G, F']
    ranks = [torch.empty(g, dtype=torch.long).scatter_(0, order[:, j], torch.arange(g)) for j in range(len(cols))]
    r = torch.stack(ranks)  # [F, G]
    order = torch.sort(r.sum(0), stable=True).indices  # by the sum of ranks, then by index
    order = order[torch.sort(r.min(0).values[order], stable=True).indices]  # the best rank first
    return torch.sort(order[:m]).values
