"""Fine-tuning of a pruned model with the pruned channels held at zero: the clean fine-tune (also the re-activation
check), sharpness-aware fine-tuning (FT-SAM's step, for purification), and the retuning attack's all-weight tune."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups
from ..memory import check_batch, fit_batch
from ..progress import bar


FINETUNE_BATCH = 64  # images per step of finetune_pruned (purification, the clean fine-tune, FP's and re-activation)


def finetune_pruned(model: nn.Module, groups: NeuronGroups, prune: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    *, epochs: int, lr: float = 0.01, batch_size: int = FINETUNE_BATCH, seed: int = 0, rho: float = 0.0,
                    label_smoothing: float = 0.0, cosine_t_max: int | None = None, sam_bn_frozen: bool = False,
                    augment=None, after_epoch=None,
                    teacher: nn.Module | None = None, temperature: float = 2.0,
                    max_grad_norm: float | None = None, hard_weight: float = 0.0, labels_where_wrong: bool = False,
                    progress: bool = False, max_memory: int | str | None = None) -> nn.Module:
    """Fine-tunes `model` in place on (x [N, C, H, W] normalised, y [N]) with SGD (momentum 0.9, weight decay
    5e-4); after every step the pruned groups (prune [G] bool) are zeroed again, so they stay exactly zero.
    BatchNorm in training mode (batch statistics, running statistics updated; why: docs/design.md). Batches of
    one image are skipped. rho > 0: each step is adaptive sharpness-aware (ASAM, Kwon et al. 2021; FT-SAM's
    step): the gradient is taken at w + e, e_i = rho |w_i|^2 g_i / ||(|w| g)||, then applied at w; sam_bn_frozen:
    the pass at w + e leaves the BatchNorm running statistics alone (momentum 0, as FT-SAM's code does).
    label_smoothing s: the target puts 1 - s on the true class and s / (n - 1) on each other one (FT-SAM's
    `smooth_crossentropy`). cosine_t_max: None keeps lr; 0 anneals it from lr to 0 over all steps; T > 0 is
    CosineAnnealingLR(T_max=T) stepped after every batch, lr (1 + cos(pi t / T)) / 2 at step t, periodic (as
    FT-SAM's code steps it). augment: optional callable (xb, yb, generator) -> (xb', yb')
    applied to every batch before the step (purification adds proxy-stamped copies there). after_epoch: optional
    callable(epoch) run after each epoch (1-based), the model in eval mode (purification's held-out check).
    teacher (an eval-mode model): the loss on the batch's own images is the distillation term
    T^2 KL(softmax(t / T) || softmax(s / T)) (t: the teacher's logits on x, computed once; s: the model's;
    T = temperature) in place of their cross-entropy, plus the cross-entropy of the copies `augment` appends
    weighted by their share of the batch; hard_weight = a in [0, 1] mixes the batch's own true labels in:
    (1 - a) KD + a CE(s, y) on its own images. labels_where_wrong: an image whose label is not the teacher's class
    takes CE(s, y) in place of its distillation term (the teacher is kept only where it is right). Without a
    teacher the loss is the cross-entropy over the whole batch.
    max_grad_norm: each step's gradient (after the sharpness-aware step, before weight decay and momentum) is
    rescaled to at most this L2 norm over all parameters. progress: a bar of the steps on stderr
    (onp_fast.progress.bar).
    Device: x, y on the model's device; the shuffles and `augment`'s draws use a CPU generator, so a seed
    gives the same batches on every device. max_memory (bytes or "512MB"; None: no budget): a step's batch
    (with `augment`'s copies) is never split, BatchNorm normalising over it: UserError before the first step
    when it does not fit (`memory.check_batch`); the teacher's pass is chunked to it.
    Returns the model in eval mode, its parameters not requiring grad."""
    g = torch.Generator().manual_seed(seed)
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * sum(1 for i in range(0, len(x), batch_size) if min(batch_size, len(x) - i) >= 2)
    sched = None if cosine_t_max is None else \
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, cosine_t_max or max(1, steps))
    keep = ~prune
    soft = wrong = None
    if teacher is not None:
        with torch.no_grad():
            tb = fit_batch(teacher, x, max_memory, 256)
            soft = torch.cat([teacher(x[i:i + tb]) for i in range(0, len(x), tb)]).div_(temperature)
            soft = F.softmax(soft, dim=1)
        wrong = soft.argmax(1) != y if labels_where_wrong else None

    def loss_of(xb, yb, sb, wb):
        out = model(xb)
        if sb is None:
            return smooth_cross_entropy(out, yb, label_smoothing)
        n, total = len(sb), len(xb)
        log_p = F.log_softmax(out[:n] / temperature, dim=1)
        if wb is not None and bool(wb.any()):  # the labels' cross-entropy in place of the distillation term on those images
            per_image = torch.where(wb, F.cross_entropy(out[:n], yb[:n], reduction="none") / temperature ** 2,
                                    F.kl_div(log_p, sb, reduction="none").sum(1))
            loss = temperature ** 2 * per_image.mean()
        else:
            loss = temperature ** 2 * F.kl_div(log_p, sb, reduction="batchmean")
        if hard_weight:
            loss = (1 - hard_weight) * loss + hard_weight * smooth_cross_entropy(out[:n], yb[:n], label_smoothing)
        if total > n:
            loss = loss + (total - n) / total * smooth_cross_entropy(out[n:], yb[n:], label_smoothing)
        return loss

    shown = bar(steps, "fine-tune", progress)
    checked = False
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm in training mode needs two images
                continue
            xb, yb = x[idx], y[idx]
            sb = soft[idx] if soft is not None else None
            wb = wrong[idx] if wrong is not None else None
            if augment is not None:
                xb, yb = augment(xb, yb, g)
            if not checked:  # the first batch is the largest (a later one is only ever a shorter tail)
                check_batch(model, xb, len(xb), max_memory, "fine-tuning")
                checked = True
            opt.zero_grad(set_to_none=True)
            loss_of(xb, yb, sb, wb).backward()
            if rho > 0:
                with _running_stats_frozen(model, sam_bn_frozen):
                    _sharpness_aware_gradient(params, rho, lambda: loss_of(xb, yb, sb, wb))
            if max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            if sched is not None:
                sched.step()
            groups.prune_(model, keep)
            shown.update(1)
        if after_epoch is not None:
            model.eval()
            with torch.no_grad():
                after_epoch(epoch + 1)
            model.train()
    shown.close()
    for p in params:
        p.requires_grad_(False)
    return model.eval()


def smooth_cross_entropy(logits: torch.Tensor, y: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits [B, n] against y [B] with the target 1 - s on the true class and s / (n - 1)
    on each other one (s = smoothing; 0: plain cross-entropy). FT-SAM's `smooth_crossentropy` up to the target's
    entropy (a constant)."""
    if not smoothing:
        return F.cross_entropy(logits, y)
    n = logits.shape[1]
    target = torch.full_like(logits, smoothing / (n - 1)).scatter_(1, y.unsqueeze(1), 1.0 - smoothing)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


class _running_stats_frozen:
    """Within: every BatchNorm of `model` has momentum 0 (batch statistics still used, running ones not updated)
    when `on`; the momenta are put back on exit."""

    def __init__(self, model: nn.Module, on: bool):
        self.norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] if on else []

    def __enter__(self):
        self.saved = [m.momentum for m in self.norms]
        for m in self.norms:
            m.momentum = 0.0

    def __exit__(self, *exc):
        for m, mom in zip(self.norms, self.saved):
            m.momentum = mom


def _sharpness_aware_gradient(params: list[torch.Tensor], rho: float, loss_fn) -> None:
    """Replaces each parameter's .grad (the gradient at w) by the gradient at w + e, the adaptive ascent step of
    radius rho (e_i = rho |w_i|^2 g_i / ||(|w| g)||_2); the weights are back at w afterwards."""
    with torch.no_grad():
        live = [p for p in params if p.grad is not None]
        scaled = [p.abs() * p.grad for p in live]
        norm = torch.sqrt(sum((s * s).sum() for s in scaled)).clamp(min=1e-12)
        steps = [rho * p.abs() * s / norm for p, s in zip(live, scaled)]
        for p, e in zip(live, steps):
            p.add_(e)
    for p in live:
        p.grad = None
    loss_fn().backward()
    with torch.no_grad():
        for p, e in zip(live, steps):
            p.sub_(e)
