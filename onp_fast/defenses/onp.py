"""ONP itself behind the Defense interface: the GNN policy's prune probabilities (onp_fast.repair.onp_scores).
Its hyper-parameters are the shared RepairConfig's (iterations, samples, reward weights, ...)."""
from __future__ import annotations

import torch

from ..repair.pipeline import DefenseContext, onp_scores
from .base import Defense, register


@register
class ONP(Defense):
    name = "onp"
    title = "ONP: GNN policy trained by RL on the defense reward"

    def config_dict(self, ctx: DefenseContext) -> dict:
        cfg = ctx.cfg
        return {"iterations": cfg.iterations, "samples": cfg.samples, "algorithm": cfg.algorithm, "conv": cfg.conv}

    def scores(self, ctx: DefenseContext) -> tuple[torch.Tensor, dict]:
        """-> the trained policy's prune probabilities [G] in (0, 1)."""
        return onp_scores(ctx)
