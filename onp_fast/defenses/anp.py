"""Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021), step by step as the official code
(github.com/csdongxian/ANP_backdoor, commit ec7b179: optimize_mask_cifar.py, models/anp_batchnorm.py).

Every affine norm channel (BatchNorm as in the official NoisyBatchNorm2d; LayerNorm / GroupNorm alike) gets a
mask m in [0, 1] (`neuron_mask`, init 1) and two noises, delta on the scale and delta_b on the shift
(`neuron_noise`, `neuron_noise_bias`). Perturbed, the layer's affine part is gamma * (m + delta) and
beta * (1 + delta_b); clean, gamma * m and beta. Each of `iterations` iterations:
  1. a batch of `batch_size` drawn with replacement from D_opt (the official RandomSampler(replacement=True));
  2. if eps > 0: delta, delta_b drawn uniformly in [-eps, eps] (`reset(rand_init=True)`), then `noise_steps`
     steps of SGD with lr eps / noise_steps on -CE(perturbed) whose gradient is replaced by its sign
     (`sign_grad`): delta <- delta + eps / noise_steps * sign(dCE / d delta). The official code does not clamp
     the noise after the step, so it ends anywhere in [-2 eps, 2 eps]; neither do we;
  3. one SGD step (lr mask_lr, momentum 0.9) on the masks for alpha * CE(clean) + (1 - alpha) * CE(perturbed),
     then the masks clipped to [0, 1] (`clip_mask`).
The official model runs in train mode throughout (`model.train()`: BN normalises with batch statistics and
updates its running statistics). We do the same on a deep copy, so the caller's model, its weights and running
statistics are never touched. A channel's score is 1 - m; a group's is the max over its norm channels (-inf
for a group with none: ANP cannot prune it). ANP's own rule (prune_neuron_cifar.py, `evaluate_by_threshold`:
a channel is pruned when its mask <= the threshold; 0.2 in the paper) is reported beside the shared rule.

ANPConfig fields (official value / behaviour first):
  eps          0.4    (--anp-eps) the noise budget of the random start.
  alpha        0.2    (--anp-alpha) the weight of the clean loss; 1 - alpha on the perturbed one.
  iterations   2000   (--nb-iter; 4 x --print-every 500 batches).
  mask_lr      0.2    (--lr) SGD, momentum 0.9, on the masks.
  batch_size   128    (--batch-size), drawn with replacement.
  noise_steps  1      (--anp-steps).
  threshold    0.2    ANP's own rule: prune channels whose mask <= threshold (reported only).
  noise_step   "sign" official: delta moves by eps / noise_steps * sign(grad), not clamped.
               "grad" ours before: delta moves by eps / noise_steps * grad, clamped to [-eps, eps].
  bn_mode      "train" official: the (copied) model in train mode, BN on batch statistics.
               "eval"  ours before: eval mode, BN on its running statistics.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from ..groups import NeuronGroups
from ..prepare import DefenseContext
from ..progress import bar
from .base import Defense, register

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass
class ANPConfig:
    eps: float = 0.4  # perturbation budget of the noise's random start
    alpha: float = 0.2  # weight of the clean loss; 1 - alpha on the perturbed loss
    iterations: int = 2000
    mask_lr: float = 0.2
    batch_size: int = 128
    noise_steps: int = 1
    threshold: float = 0.2  # ANP's own rule: prune masks <= it (reported beside the shared rule)
    noise_step: str = "sign"  # "sign" (official) | "grad" (ours before: eps/steps * grad, clamped to [-eps, eps])
    bn_mode: str = "train"  # "train" (official, on a copy) | "eval" (ours before)

    def check(self) -> None:
        """UserError (one line) for a mode that is not one of its choices."""
        check_mode("anp.noise_step", self.noise_step, ("sign", "grad"))
        check_mode("anp.bn_mode", self.bn_mode, ("train", "eval"))


def norm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every affine norm layer, in module order."""
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, _NORMS) and getattr(mod, "weight", None) is not None]


def check_mode(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise UserError(f"{field} must be one of {', '.join(allowed)}, not {value!r}")


def scaled_norm(mod: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`mod`'s own forward on x [N, C, ...] with its affine weight and bias replaced by `weight` and `bias` [C]:
    the arithmetic of the official NoisyBatchNorm2d / MaskBatchNorm2d (F.batch_norm of the input with the scaled
    parameters, running statistics and momentum handled as nn.BatchNorm does); F.layer_norm / F.group_norm for
    LayerNorm / GroupNorm."""
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm(x, mod.normalized_shape, weight, bias, mod.eps)
    if isinstance(mod, nn.GroupNorm):
        return F.group_norm(x, mod.num_groups, weight, bias, mod.eps)
    mod._check_input_dim(x)
    factor = 0.0 if mod.momentum is None else mod.momentum
    if mod.training and mod.track_running_stats and mod.num_batches_tracked is not None:
        mod.num_batches_tracked.add_(1)
        factor = 1.0 / float(mod.num_batches_tracked) if mod.momentum is None else mod.momentum
    batch_stats = mod.training or (mod.running_mean is None and mod.running_var is None)
    keep = not mod.training or mod.track_running_stats
    return F.batch_norm(x, mod.running_mean if keep else None, mod.running_var if keep else None, weight, bias,
                        batch_stats, factor, mod.eps)


class ScaledNorms:
    """Per-channel coefficients on the affine parameters of `model`'s norm layers: while installed, layer n
    computes scaled_norm(x, gamma * w_n, beta * b_n) with (w_n, b_n) = self.coefficients(n) (b_n None: beta
    unchanged). The layers' forward is replaced (not hooked), so the masked layer costs one norm pass, as the
    official layers do. masks [C] per layer: leaves, init 1. Use as a context manager (forwards restored on
    exit); only on a working copy."""

    def __init__(self, model: nn.Module, method: str):
        self.layers = norm_layers(model)
        if not self.layers:
            raise UserError(f"{method}: the model has no affine norm layer ({method.upper()} masks BatchNorm "
                            f"channels)")
        self.names = [n for n, _ in self.layers]
        self.masks = {n: torch.ones(m.weight.shape[0], device=m.weight.device, requires_grad=True)
                      for n, m in self.layers}
        for n, m in self.layers:
            m.forward = lambda x, m=m, n=n: self._forward(m, x, n)

    def coefficients(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    def _forward(self, mod: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
        w, b = self.coefficients(name)
        bias = mod.bias if mod.bias is None or b is None else mod.bias * b
        return scaled_norm(mod, x, mod.weight * w, bias)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for _, m in self.layers:
            del m.forward


class Perturbation(ScaledNorms):
    """ANP's NoisyBatchNorm2d on `model`'s affine norm layers: masks [C] (init 1), noise and noise_b [C] (init
    0). While `perturbed`, a layer's affine part is gamma * (mask + noise) and beta * (1 + noise_b); otherwise
    gamma * mask and beta, as the official layer computes them."""

    def __init__(self, model: nn.Module):
        super().__init__(model, "anp")
        self.noise = {n: torch.zeros_like(self.masks[n]).detach() for n in self.names}
        self.noise_b = {n: torch.zeros_like(self.masks[n]).detach() for n in self.names}
        self.perturbed = False

    def coefficients(self, name):
        if self.perturbed:
            return self.masks[name] + self.noise[name], 1.0 + self.noise_b[name]
        return self.masks[name], None


def batch_indices(n: int, batch_size: int, g: torch.Generator) -> torch.Tensor:
    """One ANP batch: [batch_size] indices into n images drawn with replacement (the official RandomSampler)."""
    return torch.randint(n, (batch_size,), generator=g)


def random_start(p: Perturbation, eps: float, g: torch.Generator) -> None:
    """The official `reset(rand_init=True)`: noise and noise_b uniform in [-eps, eps]."""
    for n in p.names:
        p.noise[n] = ((torch.rand(len(p.noise[n]), generator=g) * 2 - 1) * eps).to(p.noise[n].device)
        p.noise_b[n] = ((torch.rand(len(p.noise[n]), generator=g) * 2 - 1) * eps).to(p.noise[n].device)


def noise_step(model: nn.Module, p: Perturbation, xb: torch.Tensor, yb: torch.Tensor, cfg: ANPConfig) -> None:
    """One step of the official noise optimiser: SGD (lr eps / noise_steps) on -CE(perturbed), its gradient
    replaced by the sign ("sign", not clamped afterwards, as `sign_grad` + `noise_opt.step()`), or ours before
    ("grad": the raw gradient, the noise clamped to [-eps, eps])."""
    p.perturbed = True
    noisy = [p.noise[n].requires_grad_(True) for n in p.names] + [p.noise_b[n].requires_grad_(True)
                                                                  for n in p.names]
    grads = torch.autograd.grad(-F.cross_entropy(model(xb), yb), noisy, allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(noisy, grads)]  # e.g. a norm without shift
    lr = cfg.eps / cfg.noise_steps
    k = len(p.names)
    for i, n in enumerate(p.names):
        for store, gr in ((p.noise, grads[i]), (p.noise_b, grads[k + i])):
            if cfg.noise_step == "sign":
                store[n] = store[n].detach() - lr * torch.sign(gr)
            else:
                store[n] = (store[n].detach() - lr * gr).clamp(-cfg.eps, cfg.eps)


def working_copy(model: nn.Module, bn_mode: str) -> nn.Module:
    """A deep copy of `model`, its parameters frozen, in train mode ("train") or eval mode ("eval")."""
    work = copy.deepcopy(model)
    for q in work.parameters():
        q.requires_grad_(False)
    return work.train(bn_mode == "train")


def anp_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ANPConfig | None = None,
              seed: int = 0, progress: bool = False) -> dict[str, torch.Tensor]:
    """Optimises ANP's masks on (x [N, C, H, W] normalised, y [N] int64) -> {norm layer: mask [C] in [0, 1]}.
    Works on a deep copy: the model's weights and BN statistics are not changed. progress: a bar of the
    iterations on stderr (onp_fast.progress.bar)."""
    cfg = cfg or ANPConfig()
    cfg.check()
    if cfg.bn_mode == "train" and cfg.batch_size < 2 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise UserError("anp: bn_mode 'train' needs batch_size >= 2 (BatchNorm on batch statistics)")
    g = torch.Generator().manual_seed(seed)
    work = working_copy(model, cfg.bn_mode)
    with Perturbation(work) as p, bar(cfg.iterations, "anp masks", progress) as shown:
        opt = torch.optim.SGD(list(p.masks.values()), lr=cfg.mask_lr, momentum=0.9)
        for _ in range(cfg.iterations):
            idx = batch_indices(len(x), cfg.batch_size, g)
            xb, yb = x[idx], y[idx]
            loss_rob = torch.zeros((), device=x.device)
            if cfg.eps > 0:
                random_start(p, cfg.eps, g)
                for _ in range(cfg.noise_steps):
                    noise_step(work, p, xb, yb, cfg)
                p.perturbed = True
                loss_rob = F.cross_entropy(work(xb), yb)
            p.perturbed = False
            loss = cfg.alpha * F.cross_entropy(work(xb), yb) + (1 - cfg.alpha) * loss_rob
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for m in p.masks.values():
                    m.clamp_(0, 1)
            shown.update(1)
        return {n: m.detach().cpu().clone() for n, m in p.masks.items()}


def group_scores(groups: NeuronGroups, masks: dict[str, torch.Tensor]) -> torch.Tensor:
    """-> [G]: max over each group's norm channels of 1 - mask; -inf for a group with none."""
    keys = set(groups.point_keys)
    return groups.reduce([(groups.point_index((n, "out")), 1 - m) for n, m in masks.items() if (n, "out") in keys],
                         "max")


def own_rule_groups(groups: NeuronGroups, masks: dict[str, torch.Tensor], threshold: float) -> int:
    """How many groups have a norm channel whose mask <= threshold (the official pruning test)."""
    keys = set(groups.point_keys)
    hit = groups.reduce([(groups.point_index((n, "out")), (m <= threshold).float()) for n, m in masks.items()
                         if (n, "out") in keys], "max")
    return int((hit > 0).sum())


@register
class ANP(Defense):
    name = "anp"
    title = "ANP: adversarial neuron pruning (Wu & Wang 2021)"
    Config = ANPConfig

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> [G] in [0, 1] (1 - the lowest mask of the group's norm channels), -inf where a group has none."""
        c = self.config
        t0 = time.perf_counter()
        with ctx.phase("anp masks"):
            masks = anp_masks(ctx.model, ctx.x_opt, ctx.y_opt, c, seed=ctx.cfg.seed, progress=ctx.progress)
        per_iteration = (time.perf_counter() - t0) / max(c.iterations, 1)
        scores = group_scores(ctx.groups, masks)
        all_m = torch.cat(list(masks.values())) if masks else torch.zeros(0)
        return scores, {"norm_layers": len(masks), "channels": int(all_m.numel()),
                        "mask_min": float(all_m.min()) if all_m.numel() else None,
                        "own_rule": f"mask <= {c.threshold:g}",
                        "own_rule_groups": own_rule_groups(ctx.groups, masks, c.threshold),
                        "iterations": c.iterations, "seconds_per_iteration": per_iteration}
