"""RNP (Li et al., ICML 2023): unlearn the model, then learn neuron masks that recover the unlearned model's
clean accuracy; neurons whose masks fall are backdoor-related. Step by step as the official code
(github.com/bboylyg/RNP, commit eeae192: main.py `train_step_unlearning`, `train_step_recovering`, `main`;
models/mask_batchnorm.py `MaskBatchNorm2d`).

1. Unlearning (stop_check "epoch", the official): a copy of the model in train mode, SGD (lr unlearn_lr,
   momentum 0.9, weight decay 5e-4, MultiStepLR x0.1 at unlearn_milestones) on -CE over D_opt in shuffled
   batches, for epochs 0 .. unlearn_epochs (the official `range(0, unlearning_epochs + 1)`). After each epoch
   the epoch's training accuracy (the batches' predictions before their steps, as the official `train_acc`) is
   compared with unlearn_target (`clean_threshold`): <= it stops the unlearning. No gradient clipping: the
   official calls clip_grad_norm_ before backward(), where it clips nothing (unlearn_clip > 0 clips for real).
2. Recovery: a mask per affine norm channel (`neuron_mask`, init 1) multiplying that channel's weight only,
   gamma * m, the shift beta untouched; SGD (lr recover_lr, momentum 0.9) on alpha * CE over D_opt in shuffled
   batches for recover_epochs epochs, in train mode (on a copy of the unlearned model), masks clipped to
   [0, 1] after each step.
3. A channel's score is 1 - m; a group's is the max over its norm channels (-inf for a group with none). RNP's
   own rule (the official `evaluate_by_threshold`: mask <= threshold; the script sweeps 0 .. 0.9, we report
   0.2) is reported beside the shared rule.
In train mode a trailing batch of a single sample is skipped (BatchNorm cannot normalise it).

RNPConfig fields (official value / behaviour first):
  unlearn_lr          0.01     (--unlearning_lr)
  unlearn_target      0.2      (--clean_threshold) stop when the unlearning accuracy is <= it.
  unlearn_epochs      20       (--unlearning_epochs) "epoch": epochs 0..20 (21 at most); "step": at most 20.
  unlearn_milestones  (10, 20) (--schedule) MultiStepLR, gamma 0.1 ("epoch" only).
  unlearn_clip        0.0      gradient-norm clip of the unlearning; 0 = none, what the official in effect does.
  recover_lr          0.2      (--recovering_lr)
  recover_epochs      20       (--recovering_epochs)
  alpha               0.2      (--alpha) the recovery loss is alpha * CE.
  batch_size          128      (--batch_size)
  threshold           0.2      RNP's own rule: prune channels whose mask <= threshold (reported only).
  stop_check          "epoch"  official: the unlearning loop above.
                      "step"   ours before: prepare's unlearn() (eval mode, accuracy on all of D_opt after every
                               step, clip 20, no schedule), shared with prepare when its settings match.
  bn_mode             "train"  official: unlearning ("epoch") and recovery in train mode (on copies).
                      "eval"   ours before: eval mode, BN on running statistics.
  mask_on             "norm_weight" official: one mask per norm channel on its weight (gamma) only.
                      "group"  ours before: one mask per neuron group on all its mask points, shift included.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups
from ..prepare import DefenseContext, unlearn
from ..progress import bar
from ..torchutil import done_training
from .anp import ScaledNorms, check_mode, group_scores, own_rule_groups, working_copy
from .base import Defense, register


@dataclass
class RNPConfig:
    unlearn_lr: float = 0.01  # gradient ascent on the clean loss ...
    unlearn_target: float = 0.2  # ... until the unlearning accuracy on D_opt is <= this
    unlearn_epochs: int = 20  # the official's argument: epochs 0..20 with stop_check "epoch"
    unlearn_milestones: tuple = (10, 20)  # MultiStepLR, gamma 0.1
    unlearn_clip: float = 0.0  # 0: no clipping (the official's clip runs before backward and does nothing)
    recover_lr: float = 0.2
    recover_epochs: int = 20
    alpha: float = 0.2
    batch_size: int = 128
    threshold: float = 0.2  # RNP's own rule: prune masks <= it (reported beside the shared rule)
    stop_check: str = "epoch"  # "epoch" (official) | "step" (ours before: prepare's unlearn())
    bn_mode: str = "train"  # "train" (official, on copies) | "eval" (ours before)
    mask_on: str = "norm_weight"  # "norm_weight" (official) | "group" (ours before)

    def check(self) -> None:
        """UserError (one line) for a mode that is not one of its choices."""
        check_mode("rnp.stop_check", self.stop_check, ("epoch", "step"))
        check_mode("rnp.bn_mode", self.bn_mode, ("train", "eval"))
        check_mode("rnp.mask_on", self.mask_on, ("norm_weight", "group"))


def _batch_count(n: int, batch_size: int, train: bool) -> int:
    """How many batches `_batches` gives an epoch, without drawing."""
    full, rest = divmod(n, batch_size)
    return full + (rest > 1 or (rest == 1 and not train))


def _batches(n: int, batch_size: int, g: torch.Generator, train: bool) -> list[torch.Tensor]:
    """One epoch's shuffled batches (DataLoader(shuffle=True)); in train mode without a trailing single sample."""
    order = torch.randperm(n, generator=g)
    out = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    return [b for b in out if len(b) > 1] if train else out


def rnp_unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: RNPConfig | None = None, seed: int = 0,
                progress: bool = False) -> tuple[nn.Module, dict]:
    """The official unlearning (stop_check "epoch") on a deep copy of `model` -> (U in eval mode, its
    parameters frozen; info: steps, epochs, accuracy (the last epoch's), epoch_accuracy (every epoch's),
    reached (whether accuracy <= unlearn_target)). x: [N, C, H, W] normalised; y: [N] int64."""
    cfg = cfg or RNPConfig()
    cfg.check()
    train = cfg.bn_mode == "train"
    u = copy.deepcopy(model).train(train)
    for p in u.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(u.parameters(), lr=cfg.unlearn_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(cfg.unlearn_milestones), gamma=0.1)
    g = torch.Generator().manual_seed(seed)
    per_epoch = _batch_count(len(x), cfg.batch_size, train)
    steps, epoch_acc = 0, []
    with bar((cfg.unlearn_epochs + 1) * per_epoch, "rnp unlearn", progress) as shown:
        for _ in range(cfg.unlearn_epochs + 1):
            correct = seen = 0
            for idx in _batches(len(x), cfg.batch_size, g, train):
                out = u(x[idx])
                loss = F.cross_entropy(out, y[idx])
                correct += int((out.detach().argmax(1) == y[idx]).sum())
                seen += len(idx)
                opt.zero_grad(set_to_none=True)
                (-loss).backward()
                if cfg.unlearn_clip > 0:
                    nn.utils.clip_grad_norm_(u.parameters(), cfg.unlearn_clip)
                opt.step()
                steps += 1
                shown.update(1)
            sched.step()
            epoch_acc.append(correct / max(1, seen))
            if epoch_acc[-1] <= cfg.unlearn_target:  # checked once per epoch, as the official
                break
    done_training(u.parameters())
    return u.eval(), {"steps": steps, "epochs": len(epoch_acc), "accuracy": epoch_acc[-1],
                      "epoch_accuracy": epoch_acc, "reached": epoch_acc[-1] <= cfg.unlearn_target,
                      "stop_check": "epoch"}


class WeightMasks(ScaledNorms):
    """The official MaskBatchNorm2d on `model`'s affine norm layers: each channel's output is gamma * m * x_hat +
    beta (the mask on the weight only; with shift=True, (gamma * x_hat + beta) * m, the shift masked too)."""

    def __init__(self, model: nn.Module, shift: bool = False):
        super().__init__(model, "rnp")
        self.shift = shift

    def coefficients(self, name):
        return self.masks[name], self.masks[name] if self.shift else None


def recover_masks(unlearned: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *, lr: float = 0.2,
                  epochs: int = 20, alpha: float = 0.2, batch_size: int = 128, seed: int = 0, progress: bool = False,
                  mask_on: str = "norm_weight", bn_mode: str = "train"):
    """RNP's recovery on a copy of U -> {norm layer: mask [C]} ("norm_weight") or the group masks [G]
    ("group"), in [0, 1]: initialised at 1, SGD (momentum 0.9) on alpha * CE over shuffled batches of
    (x [N, C, H, W] normalised, y [N]), clipped to [0, 1] after each step."""
    check_mode("rnp.mask_on", mask_on, ("norm_weight", "group"))
    check_mode("rnp.bn_mode", bn_mode, ("train", "eval"))
    train = bn_mode == "train"
    work = working_copy(unlearned, bn_mode)
    g = torch.Generator().manual_seed(seed)
    per_epoch = _batch_count(len(x), batch_size, train)
    if mask_on == "group":
        m = torch.ones(groups.num_groups, requires_grad=True)
        params, weight_masks = [m], None
    else:
        weight_masks = WeightMasks(work)
        params = list(weight_masks.masks.values())
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    try:
        with bar(epochs * per_epoch, "rnp recover", progress) as shown:
            for _ in range(epochs):
                for idx in _batches(len(x), batch_size, g, train):
                    if weight_masks is None:
                        with groups.masked(work, m):
                            loss = alpha * F.cross_entropy(work(x[idx]), y[idx])
                    else:
                        loss = alpha * F.cross_entropy(work(x[idx]), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    with torch.no_grad():
                        for p in params:
                            p.clamp_(0, 1)
                    shown.update(1)
    finally:
        if weight_masks is not None:
            weight_masks.__exit__()
    if weight_masks is None:
        return m.detach().float()
    return {n: v.detach().cpu().clone() for n, v in weight_masks.masks.items()}


def rnp_scores(unlearned: nn.Module, groups: NeuronGroups, x: torch.Tensor, y: torch.Tensor, *, lr: float = 0.2,
               epochs: int = 20, alpha: float = 0.2, batch_size: int = 128, seed: int = 0, progress: bool = False,
               mask_on: str = "norm_weight", bn_mode: str = "train") -> torch.Tensor:
    """RNP's recovery (recover_masks) -> prune scores [G] float32 = 1 - m (the max over a group's norm channels
    with "norm_weight", -inf for a group with none): higher = prune first. progress: a bar of the steps on
    stderr (onp_fast.progress.bar)."""
    masks = recover_masks(unlearned, groups, x, y, lr=lr, epochs=epochs, alpha=alpha, batch_size=batch_size,
                          seed=seed, progress=progress, mask_on=mask_on, bn_mode=bn_mode)
    return (1 - masks).float() if isinstance(masks, torch.Tensor) else group_scores(groups, masks)


def _prepare_unlearns_like(cfg: RNPConfig, ctx: DefenseContext) -> bool:
    """Whether prepare's unlearned copy (unlearn() on D_opt with ctx.cfg.unlearn_lr, the most epochs its info
    records and unlearn's other defaults) is exactly the one RNP's config asks for (only with stop_check "step":
    prepare's unlearning is ours before)."""
    d = {k: v.default for k, v in inspect.signature(unlearn).parameters.items()}
    return (cfg.stop_check == "step" and cfg.unlearn_lr == ctx.cfg.unlearn_lr
            and cfg.unlearn_target == d["target_acc"] and cfg.unlearn_epochs == ctx.unlearn_info.get("max_epochs")
            and cfg.batch_size == d["batch_size"])


@register
class RNP(Defense):
    name = "rnp"
    title = "RNP: reconstructive neuron pruning (Li et al. 2023)"
    Config = RNPConfig

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> [G] in [0, 1]: 1 - the recovered mask (the lowest of the group's norm channels with mask_on
        "norm_weight"; -inf for a group with none). Unlearning runs here (the official loop), or with
        stop_check "step" reuses prepare's copy when its settings match."""
        c = self.config
        if _prepare_unlearns_like(c, ctx):
            unlearned, info, shared = ctx.unlearned, ctx.unlearn_info, True
        else:
            with ctx.phase("rnp unlearn"):
                if c.stop_check == "epoch":
                    unlearned, info = rnp_unlearn(ctx.model, ctx.x_opt, ctx.y_opt, c, seed=ctx.cfg.seed,
                                                  progress=ctx.progress)
                else:
                    unlearned, info = unlearn(ctx.model, ctx.x_opt, ctx.y_opt, lr=c.unlearn_lr,
                                              target_acc=c.unlearn_target, max_epochs=c.unlearn_epochs,
                                              batch_size=c.batch_size, seed=ctx.cfg.seed, progress=ctx.progress)
            shared = False
        with ctx.phase("rnp recover"):
            masks = recover_masks(unlearned, ctx.groups, ctx.x_opt, ctx.y_opt, lr=c.recover_lr,
                                  epochs=c.recover_epochs, alpha=c.alpha, batch_size=c.batch_size,
                                  seed=ctx.cfg.seed, progress=ctx.progress, mask_on=c.mask_on, bn_mode=c.bn_mode)
        if isinstance(masks, torch.Tensor):
            scores, own = (1 - masks).float(), int((masks <= c.threshold).sum())
        else:
            scores, own = group_scores(ctx.groups, masks), own_rule_groups(ctx.groups, masks, c.threshold)
        return scores, {"unlearn": {**info, "shared_with_prepare": shared},
                        "own_rule": f"mask <= {c.threshold:g}",
                        "own_rule_groups": own}
