"""Channel Lipschitzness-based Pruning (Zheng, Zhang, Li, Zhao, Jia; ECCV 2022): data-free.

The upper bound of channel k's Lipschitz constant (UCLC) is sigma_max(W_k) * |gamma_k / sigma_k|: W_k the
conv's kernel for output channel k as a [C_in, kh * kw] matrix, gamma_k and sigma_k = sqrt(running_var + eps)
of the BatchNorm that normalises that conv's output. CLP standardises UCLC per layer and prunes channels
above mean + u * std (u = 3).

The BN is found through the traced graph (onp_fast.groups.norm_after), not by module order: a conv is paired
with a BN only when that BN is the sole reader of the conv's output. Module-order pairing (CLP's own code)
breaks on pre-activation nets, where a BN reads a residual sum and the conv before it in module order is not
its input (rkteddy/channel-Lipschitzness-based-pruning issue #2). A conv (or linear) layer without such a BN gets
sigma_max(W_k) alone. A group's score is the max over its rows of the per-layer standardised UCLC.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..groups import NeuronGroups, norm_after
from ..prepare import DefenseContext
from .base import Defense, register


@dataclass
class CLPConfig:
    u: float = 3.0  # CLP's own threshold: prune standardised UCLC > u (reported beside the shared rule)


@torch.no_grad()
def channel_lipschitz(model: nn.Module, groups: NeuronGroups, pairs: dict[str, str] | None = None
                      ) -> dict[str, torch.Tensor]:
    """{layer: UCLC of each output row [C_out] float32} for every layer of `groups.layers` with prunable rows;
    `pairs`: norm_after(model), computed when not given."""
    modules = dict(model.named_modules())
    pairs = norm_after(model) if pairs is None else pairs
    out = {}
    for name in groups.layers:
        if not (groups.layer_groups[name] >= 0).any():
            continue
        w = modules[name].weight.detach().float()
        rows = w.reshape(w.shape[0], w.shape[1], -1)
        ub = torch.linalg.matrix_norm(rows, ord=2)
        if name in pairs:
            bn = modules[pairs[name]]
            if bn.num_features == w.shape[0]:
                ub = ub * (bn.weight.detach().float() / (bn.running_var.float() + bn.eps).sqrt()).abs()
        out[name] = ub
    return out


def standardise(v: torch.Tensor) -> torch.Tensor:
    """[C] -> (v - mean) / std (unbiased std, as CLP's torch.std); zeros when std is 0 or C < 2."""
    if v.numel() < 2:
        return torch.zeros_like(v)
    std = v.std()
    return (v - v.mean()) / std if std > 0 else torch.zeros_like(v)


@register
class CLP(Defense):
    name = "clp"
    title = "CLP: channel Lipschitzness-based pruning (Zheng et al. 2022)"
    Config = CLPConfig

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> [G]: max over each group's rows of the per-layer standardised UCLC; -inf for a group with no row
        (an attention head)."""
        with ctx.phase("clp bounds"):
            pairs = norm_after(ctx.model)
            bounds = channel_lipschitz(ctx.model, ctx.groups, pairs)
            z = {n: standardise(v) for n, v in bounds.items()}
            scores = ctx.groups.reduce([(ctx.groups.layer_groups[n], v) for n, v in z.items()], "max")
        own = int((scores > self.config.u).sum())
        return scores, {"layers": len(bounds), "bn_paired_layers": sum(n in pairs for n in bounds),
                        "own_rule": f"UCLC > mean + {self.config.u:g} std per layer",
                        "own_rule_groups": own}
