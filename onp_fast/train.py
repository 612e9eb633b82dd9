"""The shared training loop: seeded, deterministic clean (or poisoned) training on in-memory tensors.

Pixels stay in [0, 1] until the batch is fed to the model: an optional `transform(xb, yb, generator)` hook
(e.g. WaNet noise mode, augmentation) runs on pixel batches, then `normalize(x, mean, std)`.
Optimiser: SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a one-cycle learning-rate schedule.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import normalize
from .errors import UserError
from .memory import fit_batch
from .seed import seed_everything

Transform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def random_crop_flip(pad: int = 2, flip: bool = False) -> Transform:
    """A transform: random translation by up to `pad` pixels (zero padding) and, if `flip`, horizontal flips.

    xb: [B, C, H, W] float32 pixels; the generator makes it seeded."""

    def transform(xb: torch.Tensor, yb: torch.Tensor, g: torch.Generator):
        b, c, h, w = xb.shape
        dev = xb.device
        padded = F.pad(xb, (pad, pad, pad, pad))
        oy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(dev)
        ox = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(dev)
        rows = (oy.view(b, 1, 1, 1) + torch.arange(h, device=dev).view(1, 1, h, 1))    # [B, 1, H, 1]
        cols = (ox.view(b, 1, 1, 1) + torch.arange(w, device=dev).view(1, 1, 1, w))    # [B, 1, 1, W]
        out = padded[torch.arange(b, device=dev).view(b, 1, 1, 1), torch.arange(c, device=dev).view(1, c, 1, 1),
                     rows, cols]
        if flip:
            mask = (torch.rand(b, generator=g) < 0.5).to(xb.device)
            out = torch.where(mask.view(b, 1, 1, 1), out.flip(3), out)
        return out, yb

    return transform


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, mean, std,
                     batch_size: int = 128, lr: float = 0.05, weight_decay: float = 5e-4, seed: int = 0,
                     progress: bool = True, desc: str = "train", transform: Transform | None = None) -> nn.Module:
    """Trains `model` in place with cross-entropy; returns it in eval mode.

    x: [N, C, H, W] float32 pixels in [0, 1] (CPU or the model's device); y: [N] int64 labels;
    mean, std: [C] normalisation. Same seed, same inputs -> same weights (batch order, transform and
    dropout are seeded). `transform(xb, yb, generator) -> (xb, yb)` runs on each pixel batch before
    normalisation. The model's device is used for compute.
    """
    if epochs < 0:
        raise UserError(f"epochs must be >= 0, got {epochs}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise UserError(f"training data has {x.shape[0]} images and {y.shape[0]} labels")
    g = seed_everything(seed)
    device = _device(model)
    n = x.shape[0]
    batch_size = max(1, min(batch_size, n))
    steps_per_epoch = n // batch_size + (1 if n % batch_size >= 2 else 0)  # a 1-image tail would break BN
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15,
                                                anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0)
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device)
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
    for _ in bar:
        model.train()
        order = torch.randperm(n, generator=g)
        seen, correct, loss_sum = 0, 0, 0.0
        for step in range(steps_per_epoch):
            idx = order[step * batch_size:(step + 1) * batch_size]
            xb, yb = x[idx], y[idx]
            if transform is not None:
                xb, yb = transform(xb, yb, g)
            xb = normalize(xb.to(device, non_blocking=True), mean_t, std_t)
            yb = yb.to(device, non_blocking=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            seen += yb.shape[0]
            loss_sum += float(loss.detach()) * yb.shape[0]
            correct += int((logits.detach().argmax(1) == yb).sum())
        bar.set_postfix(loss=f"{loss_sum / max(seen, 1):.3f}", acc=f"{correct / max(seen, 1):.3f}")
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, mean, std, batch_size: int = 512,
            max_memory: int | str | None = None) -> torch.Tensor:
    """Logits of `model` (eval mode) for pixels x: [N, C, H, W] float32 in [0, 1] (any device; batches go to the
    model's) -> [N, K] float32 (CPU). Batches of at most `batch_size` images, fewer where `max_memory` (bytes or
    "512MB"; None: no budget) cannot hold their activations (`memory.fit_batch`)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    out = []
    try:
        batch_size = fit_batch(model, x, max_memory, batch_size)
        for start in range(0, x.shape[0], batch_size):
            xb = normalize(x[start:start + batch_size].to(device), mean, std)
            out.append(model(xb).float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mean, std, batch_size: int = 512,
             max_memory: int | str | None = None) -> float:
    """Top-1 accuracy as a fraction in [0, 1]. x: [N, C, H, W] float32 pixels in [0, 1]; y: [N] int64; batches
    as `predict`'s."""
    if x.shape[0] == 0:
        return float("nan")
    pred = predict(model, x, mean, std, batch_size, max_memory).argmax(1)
    return float((pred == y.cpu()).float().mean())
