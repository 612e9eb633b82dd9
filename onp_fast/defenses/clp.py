"""Channel Lipschitzness-based Pruning (Zheng, Zhang, Li, Zhao, Jia; ECCV 2022): data-free.

The upper bound of channel k's Lipschitz constant (UCLC) is sigma_max(W_k) * |gamma_k / sigma_k|: W_k the
conv's kernel for output channel k as a [C_in, kh * kw] matrix, gamma_k and sigma_k = sqrt(running_var + eps)
of the BatchNorm that normalises that conv's output. CLP standardises UCLC per layer and prunes channels
above mean + u * std (u = 3).

The BN is found through the traced graph (torch.fx), not by module order: a conv is paired with a BN only when
that BN is the sole reader of the conv's output. Module-order pairing (CLP's own code) breaks on
pre-activation nets, where a BN reads a residual sum and the conv before it in module order is not its input
(rkteddy/channel-Lipschitzness-based-pruning issue #2). A conv (or linear) layer without such a BN gets
sigma_max(W_k) alone. A group's score is the max over its rows of the per-layer standardised UCLC.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import UserError
from ..groups import NeuronGroups
from ..repair.pipeline import DefenseContext
from .base import Defense, per_group_max, register

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class CLPConfig:
    u: float = 3.0  # CLP's own threshold: prune standardised UCLC > u (reported beside the shared rule)


class _Tracer(fx.Tracer):
    """nn modules and attention blocks (anything with `num_heads`) stay leaves, as in onp_fast.groups."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return hasattr(m, "num_heads") or super().is_leaf_module(m, qualname)


def bn_pairs(model: nn.Module) -> dict[str, str]:
    """{conv or linear module name: name of the BatchNorm that is the sole reader of its output} from the
    traced graph. A module called at several places is paired only when every call has the same BN."""
    try:
        graph = _Tracer().trace(model)
    except Exception as exc:  # noqa: BLE001 - fx raises many types
        raise UserError(f"clp: cannot trace the model with torch.fx: {str(exc).splitlines()[0]}") from None
    modules = dict(model.named_modules())
    found: dict[str, set] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), _WEIGHTED):
            continue
        users = list(node.users)
        bn = None
        if len(users) == 1 and users[0].op == "call_module":
            cand = modules.get(users[0].target)
            if isinstance(cand, nn.modules.batchnorm._BatchNorm) and cand.affine and cand.track_running_stats:
                bn = users[0].target
        found.setdefault(node.target, set()).add(bn)
    return {name: next(iter(bns)) for name, bns in found.items() if len(bns) == 1 and None not in bns}


@torch.no_grad()
def channel_lipschitz(model: nn.Module, groups: NeuronGroups, pairs: dict[str, str] | None = None
                      ) -> dict[str, torch.Tensor]:
    """{layer: UCLC of each output row [C_out] float32} for every layer of `groups.layers` with prunable rows;
    `pairs`: bn_pairs(model), computed when not given."""
    modules = dict(model.named_modules())
    pairs = bn_pairs(model) if pairs is None else pairs
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
            pairs = bn_pairs(ctx.model)
            bounds = channel_lipschitz(ctx.model, ctx.groups, pairs)
            z = {n: standardise(v) for n, v in bounds.items()}
            scores = per_group_max(ctx.groups, [(ctx.groups.layer_groups[n], v) for n, v in z.items()])
        own = int((scores > self.config.u).sum())
        return scores, {"clp": {"layers": len(bounds), "bn_paired_layers": sum(n in pairs for n in bounds),
                                "own_rule": f"UCLC > mean + {self.config.u:g} std per layer",
                                "own_rule_groups": own}}
