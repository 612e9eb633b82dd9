"""Adversarial neuron perturbations (ANP's inner maximisation), found once on the given model."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups
from ..progress import bar
from ..torchutil import frozen


def adversarial_perturbations(model: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *,
                              count: int = 2, eps: float = 0.4, steps: int = 10, seed: int = 0,
                              progress: bool = False) -> torch.Tensor:
    """-> [count, G] float32 multiplicative factors 1 + delta, |delta| <= eps, each a signed-gradient ascent
    (from a seeded random start) of the clean cross-entropy on (x [N, C, H, W] normalised, y [N]).
    progress: a bar of the count x steps ascent steps on stderr (onp_fast.progress.bar)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    with frozen(model), bar(count * steps, "perturbations", progress) as shown:
        for _ in range(count):
            delta = ((torch.rand(groups.num_groups, generator=g) * 2 - 1) * eps).requires_grad_(True)
            for _ in range(steps):
                with groups.masked(model, 1 + delta):
                    loss = F.cross_entropy(model(x), y)
                (grad,) = torch.autograd.grad(loss, delta)
                with torch.no_grad():
                    delta += (eps / 4) * grad.sign()
                    delta.clamp_(-eps, eps)
                shown.update(1)
            out.append(1 + delta.detach())
    return torch.stack(out)
