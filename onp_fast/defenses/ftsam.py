"""FT-SAM (Zhu, Wei, Shen, Fan, Wu; ICCV 2023): fine-tuning with sharpness-aware minimization, which shrinks
the large weight norms of backdoor-related neurons that plain fine-tuning leaves in place. Fine-tuning only:
nothing is pruned.

Defaults: BackdoorBench's FT-SAM configuration (SGD lr 0.01, momentum 0.9, weight decay 5e-4, cosine
schedule, 100 epochs, radius rho 2.0 with the adaptive (ASAM) step, label smoothing 0.1), on all the defense
images; its batch of 256 over 5% of the training set becomes 128 here, so a 500-image defense set still takes
four steps an epoch.
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


@register
class FTSAM(Defense):
    name = "ftsam"
    title = "FT-SAM: sharpness-aware fine-tuning (Zhu et al. 2023)"
    Config = FTSAMConfig
    prunes = False

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> -inf for every group: FT-SAM prunes nothing."""
        return torch.full((ctx.groups.num_groups,), -float("inf")), {}

    def after(self, ctx: DefenseContext, model: nn.Module, prune: torch.Tensor) -> dict:
        """Sharpness-aware fine-tuning of the whole model on all the defense data (D_opt and D_val)."""
        c = self.config
        x, y = ctx.defense_set()
        with ctx.phase("ftsam finetune"):
            finetune_pruned(model, ctx.groups, prune, x, y, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size,
                            seed=ctx.cfg.seed, rho=c.rho, label_smoothing=c.label_smoothing, cosine=True,
                            progress=ctx.progress)
        return {"finetune": {"epochs": c.epochs, "lr": c.lr, "rho": c.rho, "images": len(x)}}
