"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Every affine norm channel (BatchNorm; LayerNorm / GroupNorm alike) gets a mask m in [0, 1] on its scale and,
while perturbed, the scale becomes gamma * (m + delta) and the shift beta * (1 + delta_b), |delta|, |delta_b|
<= eps. Each iteration draws a batch (with replacement) from D_opt, starts the noise uniformly in [-eps, eps],
takes `noise_steps` gradient-ascent steps on the clean loss (SGD, lr eps / noise_steps, clipped), then one SGD
step (momentum 0.9) on the masks for alpha * CE(clean) + (1 - alpha) * CE(perturbed), clipped to [0, 1].
Applied with forward hooks on a frozen model in eval mode (BN statistics are not updated, unlike ANP's
train-mode loop). A channel's score is 1 - m; a group's is the max over its norm channels (-inf for a group
with none: ANP cannot prune it).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..groups import NeuronGroups
from ..prepare import DefenseContext
from ..progress import bar
from ..torchutil import frozen
from .base import Defense, register

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class ANPConfig:
    eps: float = 0.4  # perturbation budget on the norm scale and shift
    alpha: float = 0.2  # weight of the clean loss; 1 - alpha on the perturbed loss
    iterations: int = 2000
    mask_lr: float = 0.2
    batch_size: int = 128
    noise_steps: int = 1
    threshold: float = 0.2  # ANP's own rule: prune masks below it (reported beside the shared rule)


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module, int]]:
    """(name, module, channel dim of its output) of every affine norm layer, in module order."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None:
            out.append((name, mod, -1 if isinstance(mod, nn.LayerNorm) else 1))
    return out


def anp_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ANPConfig | None = None,
              seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Optimises ANP's masks on (x [N, C, H, W] normalised, y [N] int64) -> {norm layer: mask [C] in [0, 1]}.
    The model's weights are not changed. progress: a bar of the iterations on stderr (onp_fast.progress.bar)."""
    cfg = cfg or ANPConfig()
    g = torch.Generator().manual_seed(seed)
    layers = norm_layers(model)
    if not layers:
        raise UserError("anp: the model has no affine norm layer (ANP perturbs BatchNorm channels)")
    names = [n for n, _, _ in layers]
    masks = {n: torch.ones(m.weight.shape[0], requires_grad=True) for n, m, _ in layers}
    noise = {n: torch.zeros(m.weight.shape[0]) for n, m, _ in layers}
    noise_b = {n: torch.zeros(m.weight.shape[0]) for n, m, _ in layers}
    state = {"perturbed": False}

    def hook(mod, inp, out, name, dim):
        shape = [1] * out.dim()
        shape[dim] = -1
        beta = mod.bias.view(shape) if mod.bias is not None else 0.0
        scale = masks[name] + noise[name] if state["perturbed"] else masks[name]
        shift = beta * (1 + noise_b[name].view(shape)) if state["perturbed"] else beta
        return (out - beta) * scale.view(shape) + shift

    handles = [m.register_forward_hook(lambda mod, i, o, n=n, d=d: hook(mod, i, o, n, d)) for n, m, d in layers]
    opt = torch.optim.SGD(list(masks.values()), lr=cfg.mask_lr, momentum=0.9)
    was_training = model.training
    model.eval()
    try:
        with frozen(model), bar(cfg.iterations, "anp masks", progress) as shown:
            for _ in range(cfg.iterations):
                idx = torch.randint(len(x), (cfg.batch_size,), generator=g)
                xb, yb = x[idx], y[idx]
                loss_rob = torch.zeros(())
                if cfg.eps > 0:
                    for n in names:
                        noise[n] = (torch.rand(len(noise[n]), generator=g) * 2 - 1) * cfg.eps
                        noise_b[n] = (torch.rand(len(noise[n]), generator=g) * 2 - 1) * cfg.eps
                    state["perturbed"] = True
                    for _ in range(cfg.noise_steps):
                        noisy = [noise[n].requires_grad_(True) for n in names] + [noise_b[n].requires_grad_(True)
                                                                                  for n in names]
                        grads = torch.autograd.grad(-F.cross_entropy(model(xb), yb), noisy)
                        step = cfg.eps / cfg.noise_steps
                        for i, n in enumerate(names):  # SGD on -CE: ascent on the clean loss
                            noise[n] = (noise[n].detach() - step * grads[i]).clamp(-cfg.eps, cfg.eps)
                            noise_b[n] = (noise_b[n].detach() - step * grads[len(names) + i]).clamp(-cfg.eps,
                                                                                                    cfg.eps)
                    loss_rob = F.cross_entropy(model(xb), yb)
                state["perturbed"] = False
                loss = cfg.alpha * F.cross_entropy(model(xb), yb) + (1 - cfg.alpha) * loss_rob
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    for m in masks.values():
                        m.clamp_(0, 1)
                shown.update(1)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: m.detach().clone() for n, m in masks.items()}


def group_scores(groups: NeuronGroups, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """-> [G]: max over each group's norm channels of 1 - mask; -inf for a group with none."""
    keys = set(groups.point_keys)
    return groups.reduce([(groups.point_index((n, "out")), 1 - m) for n, m in masks.items() if (n, "out") in keys],
                         "max")


@register
class ANP(Defense):
    name = "anp"
    title = "ANP: adversarial neuron pruning (Wu & Wang 2021)"
    Config = ANPConfig

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> [G] in [0, 1] (1 - the lowest mask of the group's norm channels), -inf where a group has none."""
        c = self.config
        with ctx.phase("anp masks"):
            masks = anp_masks(ctx.model, ctx.x_opt, ctx.y_opt, c, seed=ctx.cfg.seed, progress=ctx.progress)
        scores = group_scores(ctx.groups, masks)
        all_m = torch.cat(list(masks.values())) if masks else torch.zeros(0)
        return scores, {"norm_layers": len(masks), "channels": int(all_m.numel()),
                        "mask_min": float(all_m.min()) if all_m.numel() else None,
                        "own_rule": f"mask < {c.threshold:g}",
                        "own_rule_groups": int((scores > 1 - c.threshold).sum())}
