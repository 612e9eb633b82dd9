"""RNP's first step: unlearn the model by gradient ascent on clean cross-entropy."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..memory import fit_batch, micro_batch
from ..progress import bar
from ..torchutil import done_training, gradient_order


@torch.no_grad()
def accuracy_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                max_memory: int | str | None = None) -> float:
    """x: [N, C, H, W] normalised float32, y: [N] int64, both on the model's device -> top-1 accuracy in [0, 1].
    Batches of at most `batch_size` images, fewer where `max_memory` (bytes or "512MB"; None: no budget)
    cannot hold them (`memory.fit_batch`)."""
    if len(x) == 0:
        return 0.0
    batch_size = fit_batch(model, x, max_memory, batch_size)
    correct = 0
    for i in range(0, len(x), batch_size):
        correct += (model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum().item()
    return correct / max(1, len(x))


def unlearn(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, lr: float = 0.01, target_acc: float = 0.2,
            max_epochs: int = 20, batch_size: int = 128, seed: int = 0,
            progress: bool = False, max_memory: int | str | None = None) -> tuple[nn.Module, dict]:
    """Returns (U, info): a copy of `model` trained to *maximise* CE on (x, y) until its accuracy on (x, y)
    is <= target_acc (checked after every step), at most `max_epochs` epochs. BN statistics stay frozen
    (eval mode); weights, BN scales and shifts move. x: [N, C, H, W] normalised; y: [N] int64.
    info: steps, epochs, max_epochs, final accuracy, micro_batch (images per forward of a step: the step's batch when it
    is not split). progress: a bar on stderr (onp_fast.progress.bar) of the most steps it may take, max_epochs x
    batches per epoch (its ETA is an upper bound; it ends early at target_acc).
    max_memory (bytes or "512MB"; None: no budget): a step whose batch it cannot hold runs as micro-batches of
    the most images it holds (`memory.micro_batch`, at least one: BatchNorm is in eval mode), the gradient of
    -sum CE(chunk) / batch accumulated over them, the same step as the whole batch's up to float rounding (then
    clipped and taken once); UserError before the first step when not even one image fits (`memory.micro_batch`).
    A batch the budget holds (or no budget) runs whole, bit for bit as without one. The accuracy checks are
    chunked to it. The shuffles come from a CPU generator whatever the device, so a seed gives the same batches
    on every device."""
    micro = micro_batch(model, x, min(batch_size, len(x)), max_memory, "unlearning", min_size=1)
    layout = gradient_order(model, x)
    u = copy.deepcopy(model).eval()
    for p in u.parameters():
        p.requires_grad_(True)
    opt = torch.optim.SGD(u.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(seed)
    steps, acc = 0, accuracy_of(u, x, y, max_memory=max_memory)
    epoch = 0
    with bar(max_epochs * -(-len(x) // batch_size), "unlearn", progress) as shown:
        while acc > target_acc and epoch < max_epochs:
            epoch += 1
            order = torch.randperm(len(x), generator=g).to(x.device)
            for i in range(0, len(x), batch_size):
                idx = order[i:i + batch_size]
                if len(idx) <= micro:  # the whole batch at once: as without a budget
                    loss = -F.cross_entropy(u(layout(x[idx])), y[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                else:  # micro-batches: BatchNorm is frozen, so the summed gradients are the whole batch's
                    opt.zero_grad(set_to_none=True)
                    for part in idx.split(micro):
                        loss = -F.cross_entropy(u(layout(x[part])), y[part], reduction="sum") / len(idx)
                        loss.backward()
                nn.utils.clip_grad_norm_(u.parameters(), 20.0)
                opt.step()
                steps += 1
                acc = accuracy_of(u, x, y, max_memory=max_memory)
                shown.update(1)
                if acc <= target_acc:
                    break
    done_training(u.parameters())
    return u, {"steps": steps, "epochs": epoch, "max_epochs": max_epochs, "accuracy": acc, "micro_batch": micro}
