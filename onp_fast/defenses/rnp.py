"""RNP (Li et al., ICML 2023): unlearn the model, then learn neuron masks that recover the unlearned model's
clean accuracy; neurons whose masks fall are backdoor-related. Here over neuron groups (onp_fast.groups)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups


def rnp_scores(unlearned: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *, lr: float = 0.2,
               epochs: int = 20, alpha: float = 0.2, batch_size: int = 128, seed: int = 0) -> torch.Tensor:
    """RNP's recovery step over groups: masks m in [0, 1]^G, initialised at 1, trained by SGD (momentum 0.9,
    clipped to [0, 1]) to minimise alpha * CE of U with m on (x [N, C, H, W] normalised, y [N]).
    Returns prune scores [G] float32 = 1 - m: higher = prune first."""
    g = torch.Generator().manual_seed(seed)
    params = list(unlearned.parameters())
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    m = torch.ones(groups.num_groups, requires_grad=True)
    opt = torch.optim.SGD([m], lr=lr, momentum=0.9)
    try:
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                with groups.masked(unlearned, m):
                    loss = alpha * F.cross_entropy(unlearned(x[idx]), y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    m.clamp_(0, 1)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    return (1 - m.detach()).float()
