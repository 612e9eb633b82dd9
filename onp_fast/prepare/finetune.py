"""Fine-tuning of a pruned model with the pruned channels held at zero: the clean fine-tune (also the re-activation
check), sharpness-aware fine-tuning (FT-SAM's step, for purification), and the retuning attack's all-weight tune."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..groups import NeuronGroups
from ..memory import fit_batch, micro_batch, train_mode_min
from ..progress import bar
from ..torchutil import done_training, gradient_order


FINETUNE_BATCH = 64  # images per step of finetune_pruned (purification, the clean fine-tune, FP's and re-activation)


def finetune_pruned(model: nn.Module, groups: NeuronGroups, prune: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                    *, epochs: int, lr: float = 0.01, batch_size: int = FINETUNE_BATCH, seed: int = 0, rho: float = 0.0,
                    label_smoothing: float = 0.0, cosine_t_max: int | None = None, sam_bn_frozen: bool = False,
                    augment=None, after_epoch=None,
                    teacher: nn.Module | None = None, temperature: float = 2.0,
                    max_grad_norm: float | None = None, hard_weight: float = 0.0, labels_where_wrong: bool = False,
                    path: float = 0.0, progress: bool = False, max_memory: int | str | None = None,
                    info: dict | None = None) -> nn.Module:
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
    rescaled to at most this L2 norm over all parameters. path = a > -1, not 0: a path-aware step (after Min et
    al. 2024's path-aware minimisation, in our own form): each step's gradient (and the sharpness-aware one on
    top of it) is taken at w0 + (1 + a)(w - w0), w0 the weights the fine-tuning started from, then applied at w
    (the first step, at w = w0, is a plain one). Where the loss has a minimum w*, the steps settle (weight decay
    aside) where that point reaches it, w = w0 + (w* - w0) / (1 + a): a < 0 carries the weights further from w0
    along the way fine-tuning moves them, a > 0 holds them nearer. progress: a bar of the steps on stderr
    (onp_fast.progress.bar).
    Device: x, y on the model's device; the shuffles and `augment`'s draws use a CPU generator, so a seed
    gives the same batches on every device. max_memory (bytes or "512MB"; None: no budget): a step's batch
    (with `augment`'s copies) that it holds, or any batch without a budget, runs whole, bit for bit as before
    budgets split steps. One it cannot hold is split into micro-batches of at most the images it holds
    (`memory.micro_batch`, at least 2 with BatchNorm, else 1), each with a near-equal share of the batch's own
    images and of the copies; the gradient (and the sharpness-aware one at w + e) is accumulated over them,
    each micro-batch's loss weighted so that the sum is the whole batch's loss (the own images' mean terms by
    own_k / own, the copies' cross-entropy by copies_k / total; without a teacher CE by size_k / total), then
    clipped and stepped once. The one approximation: BatchNorm in training mode normalises over each micro-batch ("ghost
    batch" statistics, Hoffer et al. 2017) and updates its running statistics once per micro-batch; without
    BatchNorm in training mode the step is the whole batch's up to float rounding. UserError before the first
    step when not even that least micro-batch fits. The teacher's pass is chunked to it. info: optional dict filled at the
    first step (left as it is when no step is taken) with {"batch": images of that step, the largest,
    "micro_batch": images in its largest micro-batch (= batch when not split), "micro_batches": their count}.
    Returns the model in eval mode, its parameters not requiring grad and without gradients."""
    g = torch.Generator().manual_seed(seed)
    layout = gradient_order(model, x)
    model.train()
    params = [p for p in model.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    steps = epochs * sum(1 for i in range(0, len(x), batch_size) if min(batch_size, len(x) - i) >= 2)
    sched = None if cosine_t_max is None else \
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, cosine_t_max or max(1, steps))
    keep = ~prune
    origin = [p.detach().clone() for p in params] if path else None
    least = train_mode_min(model)  # the fewest images of a micro-batch
    soft = wrong = None
    if teacher is not None:
        with torch.no_grad():
            tb = fit_batch(teacher, x, max_memory, 256)
            soft = torch.cat([teacher(x[i:i + tb]) for i in range(0, len(x), tb)]).div_(temperature)
            soft = F.softmax(soft, dim=1)
        wrong = soft.argmax(1) != y if labels_where_wrong else None

    def loss_of(xb, yb, sb, wb, whole=None):
        """The step's loss on (xb, yb): own images first (sb, wb: their teacher's softmax and labels_where_wrong
        flags, or None), then augment's copies. whole: None for the step's whole batch; for a micro-batch,
        (own images, images) of the whole batch, each term then weighted by its share of the whole (own_k / own
        for the own images' means, copies_k / total for the copies', size_k / total without a teacher), so that
        the micro-batches' losses add up to the whole batch's."""
        out = model(layout(xb))
        if sb is None:
            loss = smooth_cross_entropy(out, yb, label_smoothing)
            return loss if whole is None else len(xb) / whole[1] * loss
        n, total = len(sb), len(xb)
        if n == 0:  # a micro-batch of copies only (more copies than micro-batches have own images)
            return (total - n) / whole[1] * smooth_cross_entropy(out, yb, label_smoothing)
        log_p = F.log_softmax(out[:n] / temperature, dim=1)
        if wb is not None and bool(wb.any()):  # the labels' cross-entropy in place of the distillation term on those images
            per_image = torch.where(wb, F.cross_entropy(out[:n], yb[:n], reduction="none") / temperature ** 2,
                                    F.kl_div(log_p, sb, reduction="none").sum(1))
            loss = temperature ** 2 * per_image.mean()
        else:
            loss = temperature ** 2 * F.kl_div(log_p, sb, reduction="batchmean")
        if hard_weight:
            loss = (1 - hard_weight) * loss + hard_weight * smooth_cross_entropy(out[:n], yb[:n], label_smoothing)
        if whole is not None:
            loss = n / whole[0] * loss
        if total > n:
            loss = loss + (total - n) / (total if whole is None else whole[1]) * \
                smooth_cross_entropy(out[n:], yb[n:], label_smoothing)
        return loss

    def gradient(xb, yb, sb, wb, own, micro):
        """Backward of the step's loss into .grad: the whole batch at once when `micro` holds it, else over
        micro-batches (`_micro_batches`), the gradients accumulating."""
        if len(xb) <= micro:
            loss_of(xb, yb, sb, wb).backward()
            return
        for mine, part in _micro_batches(own, len(xb), micro, xb.device, least):
            loss_of(xb[part], yb[part], None if sb is None else sb[mine], None if wb is None else wb[mine],
                    (own, len(xb))).backward()

    shown = bar(steps, "fine-tune", progress)
    micro = None
    for epoch in range(epochs):
        order = torch.randperm(len(x), generator=g).to(x.device)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            if len(idx) < 2:  # BatchNorm in training mode needs two images
                continue
            xb, yb = x[idx], y[idx]
            sb = soft[idx] if soft is not None else None
            wb = wrong[idx] if wrong is not None else None
            own = len(idx)
            if augment is not None:
                xb, yb = augment(xb, yb, g)
            if micro is None:  # the first batch is the largest (a later one is only ever a shorter tail)
                micro = micro_batch(model, xb, len(xb), max_memory, "fine-tuning")
                if info is not None:
                    parts = ([p for _, p in _micro_batches(own, len(xb), micro, least=least)] if len(xb) > micro
                             else [xb])
                    info.update(batch=len(xb), micro_batch=max(len(p) for p in parts), micro_batches=len(parts))
            opt.zero_grad(set_to_none=True)
            with _along_path(params, origin, path):
                gradient(xb, yb, sb, wb, own, micro)
                if rho > 0:
                    with _running_stats_frozen(model, sam_bn_frozen):
                        _sharpness_aware_gradient(params, rho, lambda: gradient(xb, yb, sb, wb, own, micro))
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
    done_training(params)
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


class _along_path:
    """Within: every parameter w of `params` is moved to w0 + (1 + a)(w - w0) (w0: `origin`, a list matching
    `params`, or None for no move; a = `path`); the weights are put back exactly on exit."""

    def __init__(self, params: list[torch.Tensor], origin: list[torch.Tensor] | None, path: float):
        self.pairs = list(zip(params, origin)) if origin is not None else []
        self.path = path

    def __enter__(self):
        with torch.no_grad():
            self.kept = [p.detach().clone() for p, _ in self.pairs]
            for p, p0 in self.pairs:
                p.add_(p - p0, alpha=self.path)

    def __exit__(self, *exc):
        with torch.no_grad():
            for (p, _), w in zip(self.pairs, self.kept):
                p.copy_(w)


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


def _micro_batches(own: int, total: int, size: int, device=None, least: int = 2
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The micro-batches of a step's batch of `total` images whose first `own` are its own images and the rest
    augment's copies: [(own positions, all positions: those own ones then its copies' positions)] on `device`.
    k = ceil(total / size) micro-batches, at most total // least so that each has the `least` images a
    micro-batch needs (2 for BatchNorm in training mode: `memory.train_mode_min`; only where size is 2 and
    total odd does one then hold 3); each takes a near-equal share of the own images and of the copies, the
    larger shares of one paired with the smaller of the other, so that sizes differ by at most one."""
    k = max(1, min(-(-total // size), total // least))
    mine = torch.arange(own, device=device).tensor_split(k)
    copies = torch.arange(own, total, device=device).tensor_split(k)[::-1]
    return [(a, torch.cat([a, b])) for a, b in zip(mine, copies)]


def _sharpness_aware_gradient(params: list[torch.Tensor], rho: float, grad_fn) -> None:
    """Replaces each parameter's .grad (the gradient at w) by the gradient at w + e, the adaptive ascent step of
    radius rho (e_i = rho |w_i|^2 g_i / ||(|w| g)||_2); the weights are back at w afterwards. grad_fn(): computes
    the gradient at the current weights into .grad (accumulating, e.g. over micro-batches) and returns None, or
    returns a loss, which is then backpropagated."""
    with torch.no_grad():
        live = [p for p in params if p.grad is not None]
        for p in live:
            p.grad.mul_(p.abs())  # |w| g, in the gradient's own storage
        norm = torch.sqrt(sum((p.grad * p.grad).sum() for p in live)).clamp(min=1e-12)
        steps = []
        for p in live:  # each gradient is freed as its step is made: one copy of the weights at a time
            steps.append(rho * p.abs() * p.grad / norm)
            p.add_(steps[-1])
            p.grad = None
    loss = grad_fn()
    if loss is not None:
        loss.backward()
    with torch.no_grad():
        for p, e in zip(live, steps):
            p.sub_(e)
