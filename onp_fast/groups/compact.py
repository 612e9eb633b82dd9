"""Physically remove pruned channels: a smaller, faster model that computes what the masked model computes."""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from .find import NeuronGroups

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm)


def _keep_index(groups_of: np.ndarray | None, drop: np.ndarray) -> torch.Tensor | None:
    """Channels to keep given their groups ([C] int64, -1 none) and the dropped groups (bool [G])."""
    if groups_of is None:
        return None
    pruned = (groups_of >= 0) & drop[np.clip(groups_of, 0, None)]
    return torch.as_tensor(np.nonzero(~pruned)[0], dtype=torch.long)


@torch.no_grad()
def compact(model: nn.Module, groups: NeuronGroups, prune: torch.Tensor) -> nn.Module:
    """A copy of `model` with the channels of pruned groups (prune [G] bool) removed from every conv, linear
    and norm that carries them (outputs and inputs alike). Attention heads are not removed (UserError)."""
    drop = prune.cpu().numpy().astype(bool)
    if any(drop[g.index] and g.kind == "head" for g in groups.groups):
        raise UserError("--compact cannot remove attention heads yet; repair without --compact")
    out = copy.deepcopy(model)
    for name, mod in out.named_modules():
        if name not in groups.module_channels:
            continue
        g_in, g_out = groups.module_channels[name]
        keep_in, keep_out = _keep_index(g_in, drop), _keep_index(g_out, drop)
        held = next(iter([*mod.parameters(recurse=False), *mod.buffers(recurse=False)]), None)
        dev = held.device if held is not None else torch.device("cpu")  # index where the weights are
        keep_in, keep_out = (None if k is None else k.to(dev) for k in (keep_in, keep_out))
        if isinstance(mod, nn.Conv2d | nn.Conv1d):
            depthwise = mod.groups > 1 and mod.groups == mod.in_channels == mod.out_channels
            if depthwise:
                mod.weight = nn.Parameter(mod.weight[keep_out].clone())
                mod.in_channels = mod.out_channels = mod.groups = len(keep_out)
            else:
                if mod.groups != 1:
                    continue
                w = mod.weight[keep_out][:, keep_in]
                mod.weight = nn.Parameter(w.clone())
                mod.out_channels, mod.in_channels = len(keep_out), len(keep_in)
            if mod.bias is not None:
                mod.bias = nn.Parameter(mod.bias[keep_out].clone())
        elif isinstance(mod, nn.Linear):
            keep_out = keep_out if keep_out is not None else torch.arange(mod.out_features, device=dev)
            keep_in = keep_in if keep_in is not None else torch.arange(mod.in_features, device=dev)
            mod.weight = nn.Parameter(mod.weight[keep_out][:, keep_in].clone())
            if mod.bias is not None:
                mod.bias = nn.Parameter(mod.bias[keep_out].clone())
            mod.out_features, mod.in_features = len(keep_out), len(keep_in)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            for attr in ("weight", "bias"):
                if getattr(mod, attr) is not None:
                    setattr(mod, attr, nn.Parameter(getattr(mod, attr)[keep_out].clone()))
            mod.running_mean = mod.running_mean[keep_out].clone()
            mod.running_var = mod.running_var[keep_out].clone()
            mod.num_features = len(keep_out)
        elif isinstance(mod, nn.LayerNorm) and mod.weight is not None and len(mod.normalized_shape) == 1:
            if len(keep_out) != mod.normalized_shape[0]:
                raise UserError("--compact cannot remove channels normalised by a LayerNorm; repair without --compact")
    return out
