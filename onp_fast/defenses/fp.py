"""Fine-Pruning (Liu, Dolan-Gavitt, Garg, RAID 2018): prune the last conv layer's channels that clean data
activates least, then fine-tune on the clean data.

The channels are the groups of the last conv layer's output rows (execution order, so a residual stream's
coupled channels count once; in a transformer, the last linear layer's). Their activation is measured where
the classifier reads them: at the input of the first linear layer that reads every one of them (after pooling;
ResNet-style heads), else at the conv's output; mean over D_opt and positions. Every other group scores -inf:
FP never prunes it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from ..memory import fit_batch
from ..prepare import DefenseContext, finetune_pruned
from .base import Defense, register

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FPConfig:
    finetune_epochs: int = 10  # clean fine-tuning after pruning, pruned channels held at zero
    finetune_lr: float = 0.01
    batch_size: int = 64


def last_layer(ctx: DefenseContext) -> tuple[str, np.ndarray]:
    """(name of the last conv layer with prunable rows, in execution order; in a transformer (a model with
    attention blocks) or a conv-free model the last such linear layer instead (a ViT's last fc2: the residual
    stream the head reads); its candidate groups [K] int64, sorted)."""
    modules = dict(ctx.model.named_modules())
    layers = [n for n in ctx.groups.layers if (ctx.groups.layer_groups[n] >= 0).any()]
    transformer = any(hasattr(m, "num_heads") for m in modules.values())
    convs = [] if transformer else [n for n in layers if isinstance(modules[n], _CONVS)]
    if not layers:
        raise UserError("fp: the model has no layer with prunable channels")
    name = (convs or layers)[-1]
    idx = ctx.groups.layer_groups[name]
    return name, np.unique(idx[idx >= 0])


@torch.no_grad()
def mean_activation(ctx: DefenseContext, layer: str, candidates: np.ndarray, batch_size: int = 256) -> tuple[
        torch.Tensor, str]:
    """-> (mean activation of each candidate group [K] float32 (CPU) on D_opt, where it was measured); D_opt in
    batches of at most `batch_size`, fewer where the budget (RepairConfig.max_memory) cannot hold them."""
    groups, model = ctx.groups, ctx.model
    modules = dict(model.named_modules())
    where, index, dim, at_input = layer, groups.layer_groups[layer], 1, False
    for name in groups.layers[groups.layers.index(layer) + 1:]:
        gin = groups.module_channels.get(name, (None, None))[0]
        if isinstance(modules[name], nn.Linear) and gin is not None and np.isin(candidates, gin).all():
            where, index, dim, at_input = name, gin, -1, True
            break
    total = torch.zeros(len(index), dtype=torch.float64, device=ctx.x_opt.device)
    count = 0

    def record(t):
        nonlocal count
        t = t.movedim(dim, -1).reshape(-1, t.shape[dim]).double()
        total.add_(t.sum(0))
        count += t.shape[0]

    batch_size = fit_batch(model, ctx.x_opt, ctx.cfg.activation_memory, batch_size)  # before the hook: not recorded
    mod = modules[where]
    if at_input:
        handle = mod.register_forward_pre_hook(lambda m, inp: record(inp[0]))
    else:
        handle = mod.register_forward_hook(lambda m, inp, out: record(out))
    try:
        for i in range(0, len(ctx.x_opt), batch_size):
            model(ctx.x_opt[i:i + batch_size])
    finally:
        handle.remove()
    per_group = groups.reduce([(index, total / max(1, count))], "mean")
    return per_group[torch.as_tensor(candidates)], f"{'input' if at_input else 'output'} of {where}"


@register
class FP(Defense):
    name = "fp"
    title = "Fine-Pruning (Liu et al. 2018)"
    Config = FPConfig
    splits_training = True  # its fine-tune is finetune_pruned

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> [G]: the last layer's K channels get 1 - 0.49 * rank / (K - 1), rank 0 = least active (so all K
        lie above 0.5 and the depth rule's grid spans the whole layer); -inf elsewhere."""
        with ctx.phase("fp activations"):
            layer, cand = last_layer(ctx)
            act, site = mean_activation(ctx, layer, cand)
        order = torch.argsort(act, stable=True)  # least active first; ties by group index
        rank = torch.empty(len(cand))
        rank[order] = torch.arange(len(cand), dtype=torch.float32)
        scores = torch.full((ctx.groups.num_groups,), -float("inf"))
        scores[torch.as_tensor(cand)] = 1 - 0.49 * rank / max(1, len(cand) - 1)
        return scores, {"layer": layer, "channels": len(cand), "measured_at": site,
                        "activation_min": float(act.min()), "activation_max": float(act.max())}

    def after(self, ctx: DefenseContext, model: nn.Module, prune: torch.Tensor) -> dict:
        """Fine-tunes the pruned model in place on all the defense data (D_opt and D_val)."""
        c = self.config
        x, y = ctx.defense_set()
        if c.finetune_epochs > 0:
            with ctx.phase("fp finetune"):
                finetune_pruned(model, ctx.groups, prune, x, y, epochs=c.finetune_epochs, lr=c.finetune_lr,
                                batch_size=c.batch_size, seed=ctx.cfg.seed, progress=ctx.progress,
                                max_memory=ctx.cfg.activation_memory)
        return {"finetune": {"epochs": c.finetune_epochs, "lr": c.finetune_lr, "images": len(x)}}
