"""FT-SAM (Zhu, Wei, Shen, Fan, Wu; ICCV 2023): fine-tuning with sharpness-aware minimization, which shrinks
the large weight norms of backdoor-related neurons that plain fine-tuning leaves in place. Fine-tuning only:
nothing is pruned.

Defaults: BackdoorBench's FT-SAM (defense/ft-sam.py, config/defense/ft-sam/cifar10.yaml, SCLBD/BackdoorBench @
f02e353): SGD lr 0.01, momentum 0.9, weight decay 5e-4, 100 epochs, CosineAnnealingLR(T_max=100) stepped after
every batch (so the rate is periodic over the run), adaptive SAM (ASAM) of radius rho 2.0 whose second pass
leaves the BatchNorm running statistics alone, label smoothing 0.1 in their form (1 - s on the true class,
s / (n - 1) elsewhere), and their training transform: a random crop after 4 pixels of zero padding. Their batch of
256 over 5% of the training set becomes 128 here, so a 500-image defense set still takes four steps an epoch.
Differences: all the defense images instead of a class-balanced 5% draw; the padding is each channel's lowest
value over the defense images (a black pixel where the data have one) since the normalisation is not known here;
no horizontal flip (theirs flips CIFAR-10 only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..prepare import DefenseContext, finetune_pruned
from .base import Defense, register


@dataclass
class FTSAMConfig:
    epochs: int = 100
    lr: float = 0.01
    batch_size: int = 128
    rho: float = 2.0
    label_smoothing: float = 0.1
    t_max: int = 100  # cosine period in steps, stepped after every batch (0: anneal once over the whole run)
    crop_padding: int = 4  # random crop after this much padding (0: no augmentation)
    bn_frozen_second_pass: bool = True  # the SAM pass at w + e does not update BN running statistics


@register
class FTSAM(Defense):
    name = "ftsam"
    title = "FT-SAM: sharpness-aware fine-tuning (Zhu et al. 2023)"
    Config = FTSAMConfig
    prunes = False
    splits_training = True  # its fine-tune is finetune_pruned

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> -inf for every group: FT-SAM prunes nothing."""
        return torch.full((ctx.groups.num_groups,), -float("inf")), {}

    def after(self, ctx: DefenseContext, model: nn.Module, prune: torch.Tensor) -> dict:
        """Sharpness-aware fine-tuning of the whole model on all the defense data (D_opt and D_val)."""
        c = self.config
        x, y = ctx.defense_set()
        fill = x.amin(dim=(0, 2, 3))
        augment = None if not c.crop_padding else \
            (lambda xb, yb, gen: (random_crop(xb, c.crop_padding, fill, gen), yb))
        with ctx.phase("ftsam finetune"):
            finetune_pruned(model, ctx.groups, prune, x, y, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                            seed=ctx.cfg.seed, rho=c.rho, label_smoothing=c.label_smoothing, cosine_t_max=c.t_max,
                            sam_bn_frozen=c.bn_frozen_second_pass, augment=augment, progress=ctx.progress)
        return {"finetune": {"epochs": c.epochs, "lr": c.lr, "rho": c.rho, "images": len(x), "t_max": c.t_max,
                             "crop_padding": c.crop_padding}}


def random_crop(x: torch.Tensor, padding: int, fill: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, H, W]: each image padded by `padding` on every side with fill [C] and cropped
    back to H x W at an offset drawn uniformly from [0, 2 padding]^2 (torchvision's RandomCrop(padding=p)); the
    offsets are drawn from gen (a CPU generator) whatever x's device."""
    b, c, h, w = x.shape
    big = fill.view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    big[:, :, padding:padding + h, padding:padding + w] = x
    off = torch.randint(0, 2 * padding + 1, (b, 2), generator=gen).to(x.device)  # gen: a CPU generator
    rows = (off[:, 0, None] + torch.arange(h, device=x.device)).view(b, 1, h, 1).expand(b, c, h, w + 2 * padding)
    big = big.gather(2, rows)
    cols = (off[:, 1, None] + torch.arange(w, device=x.device)).view(b, 1, 1, w).expand(b, c, h, w)
    return big.gather(3, cols)
