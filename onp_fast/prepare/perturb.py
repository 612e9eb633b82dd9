"""Adversarial neuron perturbations (ANP's inner maximisation), found once on the given model."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups
from ..memory import fit_batch
from ..progress import bar
from ..torchutil import frozen


def adversarial_perturbations(model: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *,
                              count: int = 2, eps: float = 0.4, steps: int = 10, seed: int = 0,
                              progress: bool = False, max_memory: int | str | None = None) -> torch.Tensor:
    """-> [count, G] float32 multiplicative factors 1 + delta on the CPU, |delta| <= eps, each a signed-gradient
    ascent (from a seeded random start, drawn on the CPU) of the clean cross-entropy on (x [N, C, H, W]
    normalised, y [N], on the model's device). The gradient is of the mean over all N images; where
    `max_memory` (bytes or "512MB"; None: no budget) cannot hold them at once, it is summed over chunks
    (`memory.fit_batch`). progress: a bar of the count x steps ascent steps on stderr (onp_fast.progress.bar)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    chunk = fit_batch(model, x, max_memory, len(x))
    with frozen(model), bar(count * steps, "perturbations", progress) as shown:
        for _ in range(count):
            delta = ((torch.rand(groups.num_groups, generator=g) * 2 - 1) * eps).requires_grad_(True)
            for _ in range(steps):
                grad = torch.zeros_like(delta)
                for i in range(0, len(x), chunk):  # one chunk at the default budget: the mean as it was
                    xc, yc = x[i:i + chunk], y[i:i + chunk]
                    with groups.masked(model, 1 + delta):
                        loss = F.cross_entropy(model(xc), yc) * (len(xc) / len(x))
                    grad += torch.autograd.grad(loss, delta)[0]
                with torch.no_grad():
                    delta += (eps / 4) * grad.sign()
                    delta.clamp_(-eps, eps)
                shown.update(1)
            out.append(1 + delta.detach())
    return torch.stack(out)
