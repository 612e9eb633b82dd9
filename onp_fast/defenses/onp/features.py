"""Exposure features (onp.md section 2): per-group signals, from D_opt only, that set backdoor neurons apart.

Every feature is a column of a [G, F] float32 matrix, one row per group (see onp_fast.groups); the graph
builder standardises them per layer. Names are in FEATURE_NAMES.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...groups import NeuronGroups, norm_after
from ...memory import fit_batch
from ...prepare import TriggerProxy
from ...torchutil import frozen

FEATURE_NAMES = [
    "act_mean", "act_std", "act_max", "act_frac",  # activation statistics at the group's mask points
    "row_l1", "bn_gamma", "bn_beta", "clp",  # weight statistics
    "unlearn_change",  # relative weight change between the model and its unlearned copy
    "noise_sensitivity",  # |d loss / d scale| under random multiplicative noise (ANP's observation)
    "unlearn_sensitivity",  # the same gradient on the unlearned model (RNP's recovery signal)
    "trigger_shift",  # mean activation on trigger-proxy-stamped images minus on clean ones (0 without a proxy)
]


@torch.no_grad()
def activation_stats(model: nn.Module, groups: NeuronGroups, x: torch.Tensor, batch_size: int = 256,
                     max_memory: int | str | None = None) -> torch.Tensor:
    """[G, 4] (CPU): mean, std, max and fraction > 0 of each group's activations at its mask points over x
    ([N, C, H, W] normalised, on the model's device), averaged over the group's points; in batches of at most
    `batch_size`, fewer where `max_memory` (bytes or "512MB"; None: no budget) cannot hold them."""
    modules = dict(model.named_modules())
    keys = groups.point_keys
    sums = {k: None for k in keys}
    handles = []

    def record(key, t):
        dim = groups.point_dim(key)
        t = t.movedim(dim, -1).reshape(-1, t.shape[dim]).double()
        s = torch.stack([t.sum(0), (t * t).sum(0), t.amax(0), (t > 0).double().sum(0),
                         torch.full((t.shape[1],), float(t.shape[0]), dtype=torch.float64, device=t.device)])
        prev = sums[key]
        if prev is None:
            sums[key] = s
        else:
            prev[[0, 1, 3, 4]] += s[[0, 1, 3, 4]]
            prev[2] = torch.maximum(prev[2], s[2])

    for key in keys:
        name, site = key
        if site == "out":
            handles.append(modules[name].register_forward_hook(lambda m, i, o, k=key: record(k, o)))
        else:
            handles.append(modules[name].register_forward_pre_hook(lambda m, i, k=key: record(k, i[0])))
    batch_size = fit_batch(model, x, max_memory, batch_size)  # before the hooks: the probe must not record
    try:
        for i in range(0, len(x), batch_size):
            model(x[i:i + batch_size])
    finally:
        for h in handles:
            h.remove()
    parts = []
    for key in keys:
        s = sums[key].cpu()
        n = s[4].clamp(min=1)
        mean = s[0] / n
        std = (s[1] / n - mean * mean).clamp(min=0).sqrt()
        parts.append((groups.point_index(key), torch.stack([mean, std, s[2], s[3] / n], dim=1)))
    return groups.reduce(parts, "mean")


@torch.no_grad()
def weight_stats(model: nn.Module, groups: NeuronGroups) -> torch.Tensor:
    """[G, 4] (CPU): mean L1 norm of the group's weight rows; mean BN gamma and beta over its BN mask points (0 if
    none); CLP's channel Lipschitz bound, the max over the group's rows of sigma_max(W_row as [C_in, k*k]) times
    |gamma / sigma| of the BN that is the sole reader of that layer's output (`norm_after`; 1 when none)."""
    modules = dict(model.named_modules())
    pairs = norm_after(model)
    l1, lip, gamma, beta = [], [], [], []
    for name in groups.layers:
        w = modules[name].weight.detach().float()
        rows = w.reshape(w.shape[0], w.shape[1], -1) if w.dim() > 2 else w.unsqueeze(-1)
        scale = torch.ones(w.shape[0], device=w.device)
        bn = modules[pairs[name]] if name in pairs else None
        if bn is not None and bn.num_features == w.shape[0]:
            scale = (bn.weight.detach().float() / (bn.running_var.float() + bn.eps).sqrt()).abs()
        index = groups.layer_groups[name]
        l1.append((index, rows.abs().sum(dim=(1, 2))))
        lip.append((index, torch.linalg.matrix_norm(rows, ord=2) * scale))
    for key in groups.point_keys:
        mod = modules[key[0]]
        if isinstance(mod, nn.modules.batchnorm._BatchNorm) and key[1] == "out":
            gamma.append((groups.point_index(key), mod.weight.detach()))
            beta.append((groups.point_index(key), mod.bias.detach()))
    return torch.stack([groups.reduce(l1, "mean"), groups.reduce(gamma, "mean"), groups.reduce(beta, "mean"),
                        groups.reduce(lip, "max")], dim=1)


@torch.no_grad()
def unlearn_change(model: nn.Module, unlearned: nn.Module, groups: NeuronGroups) -> torch.Tensor:
    """[G] (CPU): mean over the group's weight rows and norm points of ||p_U - p_B||_1 / (||p_B||_1 + 1e-8)."""
    mb, mu = dict(model.named_modules()), dict(unlearned.named_modules())
    parts = []
    for name in groups.layers:
        wb, wu = mb[name].weight.detach().flatten(1), mu[name].weight.detach().flatten(1)
        parts.append((groups.layer_groups[name], (wu - wb).abs().sum(1) / (wb.abs().sum(1) + 1e-8)))
    for key in groups.point_keys:
        mod_b, mod_u = mb[key[0]], mu[key[0]]
        if key[1] != "out" or not isinstance(mod_b, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            continue
        rel = ((mod_u.weight - mod_b.weight).abs() + (mod_u.bias - mod_b.bias).abs()) / (
            mod_b.weight.abs() + mod_b.bias.abs() + 1e-8)
        parts.append((groups.point_index(key), rel.detach()))
    return groups.reduce(parts, "mean")


def noise_sensitivity(model: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *,
                      eps: float = 0.4, draws: int = 4, seed: int = 0, batch_size: int = 256,
                      max_memory: int | str | None = None) -> torch.Tensor:
    """[G] (CPU): mean over `draws` random multiplicative noises keep = 1 + U(-eps, eps) of |d CE / d keep_g| on
    (x [N, C, H, W] normalised, y [N], on the model's device). Large for neurons whose scaling moves the loss
    most (ANP). The noises are drawn on the CPU (the same on every device); the gradient is summed over batches
    of at most `batch_size` images, fewer where `max_memory` (bytes or "512MB"; None: no budget) cannot hold
    them."""
    g = torch.Generator().manual_seed(seed)
    batch_size = fit_batch(model, x, max_memory, batch_size)
    total = torch.zeros(groups.num_groups)
    with frozen(model):
        for _ in range(draws):
            keep = (1 + (torch.rand(groups.num_groups, generator=g) * 2 - 1) * eps).requires_grad_(True)
            grad = torch.zeros(groups.num_groups)
            for i in range(0, len(x), batch_size):
                with groups.masked(model, keep):
                    loss = F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size], reduction="sum")
                (gk,) = torch.autograd.grad(loss, keep)
                grad += gk
            total += (grad / len(x)).abs()
    return total / draws


def exposure_features(model: nn.Module, unlearned: nn.Module, groups: NeuronGroups, x: torch.Tensor,
                      y: torch.Tensor, seed: int = 0, trigger: TriggerProxy | None = None,
                      max_memory: int | str | None = None) -> torch.Tensor:
    """[G, len(FEATURE_NAMES)] float32 on the CPU: every exposure feature of every group, from (x, y) = D_opt
    (on the models' device) and the flagged trigger proxy when given (else trigger_shift is 0); non-finite
    values become 0. The passes over x are chunked to `max_memory` (bytes or "512MB"; None: no budget)."""
    model.eval()
    act = activation_stats(model, groups, x, max_memory=max_memory)
    if trigger is not None:
        stamped = trigger.apply(x[y != trigger.target])
        shift = activation_stats(model, groups, stamped, max_memory=max_memory)[:, :1] - act[:, :1]
    else:
        shift = torch.zeros(groups.num_groups, 1)
    cols = [
        act,
        weight_stats(model, groups),
        unlearn_change(model, unlearned, groups).unsqueeze(1),
        noise_sensitivity(model, groups, x, y, seed=seed, max_memory=max_memory).unsqueeze(1),
        noise_sensitivity(unlearned, groups, x, y, seed=seed, max_memory=max_memory).unsqueeze(1),
        shift,
    ]
    feats = torch.cat(cols, dim=1).float()
    return torch.nan_to_num(feats, nan=0.0, posinf=0.0, neginf=0.0)

