"""Clean fine-tuning of a pruned model with the pruned channels held at zero (also the re-activation check)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups


def finetune_pruned(model: nn.Module, groups: NeuronGroups, prune: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    *, epochs: int, lr: float = 0.01, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Fine-tunes `model` in place on (x [N, C, H, W] normalised, y [N]) with SGD; after every step the pruned
    groups (prune [G] bool) are zeroed again, so they stay exactly zero. Standard fine-tuning: BatchNorm in
    training mode (batch statistics, running statistics updated; why: docs/design.md). Batches of one image are
    skipped. Returns the model in eval mode, its parameters not requiring grad."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    keep = ~prune
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm in training mode needs two images
                continue
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            groups.prune_(model, keep)
    for p in params:
        p.requires_grad_(False)
    return model.eval()
